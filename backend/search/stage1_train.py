"""`python -m backend.search.stage1_train MODEL DIM`: stage 1 trained and stored in a process of its own (the
server's background retrain, `Stage1.retrain_apart`), on the database named by IMSRC_STAGE1_DATABASE_URL.
Its last line of output is `trained`, or why nothing could be trained."""

import os
import sys

from sqlalchemy.engine import make_url

from backend.search.stage1 import TRAIN_DATABASE_ENV, TRAINED, train_and_store
from backend.storage.engine import make_engine

BACKGROUND_NICENESS = 10  # on 2 cores the training would otherwise take a core from the server's requests


def main() -> None:
    model, dim = sys.argv[1], int(sys.argv[2])
    if hasattr(os, "nice"):  # not on Windows
        os.nice(BACKGROUND_NICENESS)
    engine = make_engine(make_url(os.environ[TRAIN_DATABASE_ENV]))
    try:
        print(train_and_store(engine, model, dim) or TRAINED)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
