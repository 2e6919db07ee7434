"""How near-duplicate detection is measured, and how NEAR_DUPLICATE_THRESHOLD was chosen.

Each original image gets edited copies (re-encoded as JPEG, resized, slightly cropped, brightened,
mirrored): those pairs are near-duplicates. Every other image of the same category is not: pairs of
distinct look-alikes, the hard case a duplicate finder gets wrong. For every threshold, precision (of the
pairs at or above it, the share that are copies) and recall (of the copies, the share at or above it),
with the embedding's cosine and, when `imagehash` is installed, a perceptual hash (1 - Hamming / 64).

    python -m backend.evaluation.duplicates --per-category 30 [--dataset cifar10 fashion-mnist] [--json]
"""

import argparse
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from backend.core.config import Settings, get_settings
from backend.embedding.embedder import Embedder
from backend.sources.datasets import Dataset, load_dataset

THRESHOLDS = np.round(np.arange(0.80, 1.0001, 0.01), 2)
TARGET_PRECISION = 0.99  # the default threshold is the lowest one measured at this precision


def _jpeg(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=70)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _resize(image: Image.Image) -> Image.Image:
    return image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC)


def _crop(image: Image.Image) -> Image.Image:
    dx, dy = max(1, round(image.width * 0.05)), max(1, round(image.height * 0.05))
    return image.crop((dx, dy, image.width - dx, image.height - dy))  # 90 % of each side kept


def _brighten(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.2)


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg": _jpeg,
    "resize": _resize,
    "crop": _crop,
    "brighten": _brighten,
    "flip": ImageOps.mirror,
}


@dataclass(frozen=True)
class Pairs:
    scores: np.ndarray  # similarity of each pair
    duplicate: np.ndarray  # bool: an image and its edited copy
    edit: list[str]  # the edit that made the copy; "" for distinct images

    def at(self, threshold: float) -> tuple[float, float]:
        """(precision, recall) of calling the pairs at or above `threshold` near-duplicates."""
        found = self.scores >= threshold
        precision = float((found & self.duplicate).sum() / max(1, found.sum()))
        return precision, float((found & self.duplicate).sum() / max(1, self.duplicate.sum()))

    def recall_by_edit(self, threshold: float) -> dict[str, float]:
        edits = np.asarray(self.edit)
        return {e: float((self.scores[edits == e] >= threshold).mean()) for e in EDITS}


def edited_copies(images: list[Image.Image]) -> tuple[list[Image.Image], list[int], list[str]]:
    """Every edit of every image: the copies, the index of their original, the edit's name."""
    copies, source, names = [], [], []
    for i, image in enumerate(images):
        for name, edit in EDITS.items():
            copies.append(edit(image))
            source.append(i)
            names.append(name)
    return copies, source, names


def pairs(
    similarity: Callable[[np.ndarray, np.ndarray], np.ndarray],
    originals: np.ndarray,
    copies: np.ndarray,
    labels: list[str],
    source: list[int],
    names: list[str],
) -> Pairs:
    """Copy-vs-original pairs and every same-category pair of distinct originals, scored by `similarity`
    (rows of the first argument against rows of the second)."""
    label_of = np.asarray(labels)
    dup = np.array([similarity(copies[k : k + 1], originals[i : i + 1])[0, 0] for k, i in enumerate(source)])
    distinct = []
    for label in np.unique(label_of):
        members = np.flatnonzero(label_of == label)
        block = similarity(originals[members], originals[members])
        distinct.append(block[np.triu_indices(len(members), k=1)])
    other = np.concatenate(distinct)
    return Pairs(
        np.concatenate([dup, other]),
        np.concatenate([np.ones(len(dup), bool), np.zeros(len(other), bool)]),
        list(names) + [""] * len(other),
    )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a @ b.T


def phash_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - normalised Hamming distance between rows of 64-bit hashes (as bool arrays)."""
    return 1.0 - (a[:, None, :] != b[None, :, :]).mean(axis=2)


def measure(dataset: Dataset, embedder: Embedder) -> dict[str, Pairs]:
    images = [Image.open(io.BytesIO(s.load())).convert("RGB") for s in dataset.samples]
    labels = [s.label for s in dataset.samples]
    copies, source, names = edited_copies(images)
    out = {"cosine": pairs(cosine, embedder.embed(images), embedder.embed(copies), labels, source, names)}
    try:
        import imagehash
    except ImportError:
        return out
    hashes = lambda xs: np.array([imagehash.phash(x).hash.ravel() for x in xs])  # noqa: E731
    out["phash"] = pairs(phash_similarity, hashes(images), hashes(copies), labels, source, names)
    return out


def chosen_threshold(measured: list[Pairs]) -> float:
    """The lowest threshold at which every dataset measures at least TARGET_PRECISION."""
    for t in THRESHOLDS:
        if all(p.at(float(t))[0] >= TARGET_PRECISION for p in measured):
            return float(t)
    return 1.0


def report(settings: Settings, datasets: list[str], per_category: int) -> dict:
    from backend.embedding.cache import model_cache

    embedder = model_cache.get(settings)
    results: dict[str, dict[str, Pairs]] = {}
    for name in datasets:
        data = load_dataset(name, None, "test", per_category * 10, settings)
        results[name] = measure(data, embedder)
    out: dict = {"model": embedder.model_id, "per_category": per_category, "datasets": {}}
    for method in ("cosine", "phash"):
        measured = [r[method] for r in results.values() if method in r]
        if not measured:
            continue
        t = chosen_threshold(measured)
        out.setdefault("threshold", {})[method] = t
        for name, r in results.items():
            p = r[method]
            out["datasets"].setdefault(name, {})[method] = {
                "pairs": {"copies": int(p.duplicate.sum()), "distinct": int((~p.duplicate).sum())},
                "curve": {f"{x:.2f}": p.at(float(x)) for x in THRESHOLDS},
                "at_threshold": {"precision_recall": p.at(t), "recall_by_edit": p.recall_by_edit(t)},
            }
    if len(out.get("threshold", {})) == 2:  # either method at its own threshold (same pairs, same order)
        for name, r in results.items():
            c, h = r["cosine"], r["phash"]
            t_c, t_h = out["threshold"]["cosine"], out["threshold"]["phash"]
            both = Pairs(np.where((c.scores >= t_c) | (h.scores >= t_h), 1.0, 0.0), c.duplicate, c.edit)
            out["datasets"][name]["either"] = {
                "at_threshold": {"precision_recall": both.at(1.0), "recall_by_edit": both.recall_by_edit(1.0)}
            }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", default=["cifar10", "fashion-mnist"])
    parser.add_argument("--per-category", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = report(get_settings(), args.dataset, args.per_category)
    if args.json:
        print(json.dumps(out))
        return
    for method, t in out["threshold"].items():
        print(f"{method}: threshold {t:.2f} (lowest with precision >= {TARGET_PRECISION} on every dataset)")
        for name, by_method in out["datasets"].items():
            m = by_method[method]
            precision, recall = m["at_threshold"]["precision_recall"]
            edits = ", ".join(f"{e} {r:.3f}" for e, r in m["at_threshold"]["recall_by_edit"].items())
            print(f"  {name}: precision {precision:.4f} recall {recall:.4f} ({m['pairs']}); recall by edit: {edits}")
            print("    curve: " + " ".join(f"{x}:{p:.3f}/{r:.3f}" for x, (p, r) in m["curve"].items()))
    for name, by_method in out["datasets"].items():
        if "either" in by_method:
            m = by_method["either"]["at_threshold"]
            edits = ", ".join(f"{e} {r:.3f}" for e, r in m["recall_by_edit"].items())
            precision, recall = m["precision_recall"]
            print(f"cosine or phash, {name}: precision {precision:.4f} recall {recall:.4f}; recall by edit: {edits}")


if __name__ == "__main__":
    main()
