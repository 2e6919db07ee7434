"""How hard a vector set is for approximate search: why fastscan and HNSW pass recall@10 0.97 on the real
embeddings and not on the synthetic ones. Per query (exact search, inner product on unit vectors):
- the local intrinsic dimensionality (LID): the maximum-likelihood estimate from the distances of the 100
  nearest neighbours (Amsaleg et al., 2015); ANN benchmarks use it to rank datasets by difficulty;
- the score gaps between the 10th and the 100th / 1,000th neighbour: the smaller they are, the more rows
  a 4-bit code's ranking must hand to the exact re-ranking to keep the true top 10 among them.

`python -m benchmarks.sections.hardness [--datasets cifar10,fashion-mnist] [--synthetic 1000000]`
"""

import argparse
import json

import faiss
import numpy as np

from backend.core.config import get_settings
from benchmarks.harness import hardware
from benchmarks.sections import indexes

LID_K, DEEP = 100, 1000


def measure(name: str, x: np.ndarray, q: np.ndarray) -> dict:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores = index.search(q, min(DEEP, len(x)))[0]
    distances = np.sqrt(np.maximum(2 - 2 * scores[:, :LID_K], 1e-12))  # L2 between unit vectors
    lid = -1 / np.mean(np.log(distances[:, :-1] / distances[:, -1:]), axis=1)
    out = {
        "name": name,
        "vectors": len(x),
        "queries": len(q),
        "lid_median": float(np.median(lid)),
        "gap_10_100_median": float(np.median(scores[:, 9] - scores[:, 99])),
        "score_10th_median": float(np.median(scores[:, 9])),
    }
    if scores.shape[1] >= DEEP:
        out["gap_10_1000_median"] = float(np.median(scores[:, 9] - scores[:, DEEP - 1]))
    indexes.log(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cifar10", help="real sets (embeddings cached under DATA_DIR/cache)")
    parser.add_argument("--synthetic", default="60000,1000000", help="synthetic catalogue sizes")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    rows = []
    for dataset in filter(None, args.datasets.split(",")):
        stored, q, _ = indexes.real(get_settings(), dataset, args.queries)
        rows.append(measure(dataset, stored.vectors, q))
    for n in (int(v) for v in filter(None, args.synthetic.split(","))):
        rows.append(
            measure(f"synthetic {n:,}", indexes.synthetic_catalogue(n).vectors, indexes.synthetic_queries(args.queries)[0])
        )
    print(json.dumps({"hardware": hardware(), "sets": rows}, indent=1))


if __name__ == "__main__":
    main()
