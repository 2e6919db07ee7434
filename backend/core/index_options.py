"""The index options a setting can name: index kinds, codecs, re-rank codecs, the auto threshold.

Plain vocabulary and its parsing, so the settings validate them without importing the index package
(`backend.index.layout` builds the layout from them).
"""

import re
from typing import Literal, get_args

IndexKind = Literal["flat", "ivf", "fastscan", "auto"]
INDEX_KINDS: tuple[IndexKind, ...] = get_args(IndexKind)
RerankCodec = Literal["none", "float32", "float16"]
RERANK_CODECS: tuple[RerankCodec, ...] = get_args(RerankCodec)
# auto: an exact flat scan of the top categories below this many vectors, fastscan from it (README, "auto").
AUTO_FASTSCAN_FROM = 10_000
# The names users of the original design know (FAISS_INDEX_TYPE=flatl2|ivfflat|hnsw).
INDEX_KIND_ALIASES = {"flatl2": "flat", "ivfflat": "ivf"}
CODEC_PATTERN = re.compile(r"^(float32|float16|sq8|pq([1-9][0-9]*))$")
CODEC_CHOICES = "choose float32, float16, sq8 or pq<M> with M dividing the dimension (e.g. pq64)"


def parse_kind(value: object) -> object:
    """FAISS_INDEX_TYPE as given: trimmed, lower case, the original design's names mapped; hnsw refused."""
    if not isinstance(value, str):
        return value
    value = value.strip().lower()
    if value == "hnsw":
        raise ValueError(
            "hnsw is not offered: per-category HNSW graphs were slower than ivf sub-lists and cannot remove "
            "vectors (README, 'Index types'); use ivf"
        )
    return INDEX_KIND_ALIASES.get(value, value)


def parse_codec(value: str) -> str:
    """VECTOR_CODEC as given: trimmed, lower case, one of the known codecs."""
    codec = value.strip().lower()
    if not CODEC_PATTERN.match(codec):
        raise ValueError(f"unknown vector codec {value!r}; {CODEC_CHOICES}")
    return codec


def pq_m(codec: str) -> int | None:
    """The sub-quantizers of a pq<M> codec; None for the others."""
    match = CODEC_PATTERN.match(codec)
    return int(match.group(2)) if match and match.group(2) else None
