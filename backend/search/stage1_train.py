"""`python -m backend.search.stage1_train MODEL DIM`: stage 1 trained and stored in a process of its own (the
server's background retrain, `Stage1.retrain_apart`), on the database named by IMSRC_STAGE1_DATABASE_URL.
Its last line of output is `trained`, or why nothing could be trained."""

import os
import sys

import faiss
from sqlalchemy.engine import make_url
from threadpoolctl import threadpool_limits

from backend.search.stage1 import TRAIN_DATABASE_ENV, TRAINED, train_and_store
from backend.storage.engine import make_engine


def run_in_the_background() -> None:
    """Take only what the server leaves: the idle scheduling class on Linux (a CPU runs it only when nothing
    else wants it; elsewhere, or where it is not allowed, niceness 19) and one thread (BLAS and FAISS's
    OpenMP). Measured at 1M images on 2 cores, the server's query embedding p50 in one run: 7.9 ms with no
    training, 11.7 ms beside a training at niceness 19 on two threads, 8.0 ms beside one in the idle class
    on one thread."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused (a seccomp profile)
        if hasattr(os, "nice"):  # not on Windows
            os.nice(19)
    threadpool_limits(1)
    faiss.omp_set_num_threads(1)


def main() -> None:
    model, dim = sys.argv[1], int(sys.argv[2])
    run_in_the_background()
    engine = make_engine(make_url(os.environ[TRAIN_DATABASE_ENV]))
    try:
        print(train_and_store(engine, model, dim) or TRAINED)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
