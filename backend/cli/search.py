"""`python -m backend.cli search`: query images given as files or http(s) URLs, with the API's parameters
and bounds (backend.core.search_params); `--json` prints the API's answer (backend.schemas.SearchResponse)."""

import argparse
import json
from pathlib import Path

from backend.cli.argtypes import int_in, number_in
from backend.cli.common import Command, open_services
from backend.core import search_params as sp
from backend.core.config import Settings
from backend.core.errors import AppError


def add_search_command(command: Command) -> None:
    p = command("search", cmd_search, "find images similar to the given image files or URLs")
    p.add_argument("images", nargs="+", help="image files, or http(s) URLs (downloaded like URL ingestion)")
    p.add_argument("--limit", type=int_in(sp.LIMIT_MIN, sp.LIMIT_MAX), help=sp.LIMIT_HELP)
    p.add_argument("--top-categories", type=int_in(sp.TOP_CATEGORIES_MIN, sp.TOP_CATEGORIES_MAX), help=sp.TOP_CATEGORIES_HELP)
    p.add_argument("--nprobe", type=int_in(sp.NPROBE_MIN, sp.NPROBE_MAX), help=sp.NPROBE_HELP)
    p.add_argument("--offset", type=int_in(sp.OFFSET_MIN, sp.OFFSET_MAX), help=sp.OFFSET_HELP)
    p.add_argument("--min-score", type=number_in(float, sp.MIN_SCORE_MIN, sp.MIN_SCORE_MAX), help=sp.MIN_SCORE_HELP)
    p.add_argument("--category", dest="categories", action="append", metavar="NAME", help=sp.CATEGORIES_HELP + "; repeat")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--no-prototypes", dest="use_prototypes", action="store_false", default=None, help="exact search over all vectors"
    )
    group.add_argument("--prototypes", dest="use_prototypes", action="store_true", help="two-stage search")
    p.add_argument("--json", action="store_true", help="one JSON object per query image per line")


def cmd_search(args: argparse.Namespace, settings: Settings) -> None:
    from backend.imaging import DecodedImage, decode_image
    from backend.schemas import SearchResponse
    from backend.sources.query_images import image_from_url, is_url

    params = sp.SearchParams.resolve(
        settings, args.limit, args.top_categories, args.use_prototypes, args.nprobe, args.offset, args.min_score, args.categories
    )
    images: list[DecodedImage] = []
    for name in args.images:
        if is_url(name):
            images.append(image_from_url(name, settings))
            continue
        try:
            data = Path(name).read_bytes()
        except OSError as exc:
            raise AppError(f"{name}: cannot read ({exc.strerror})") from exc
        images.append(decode_image(data, settings.max_image_pixels, name=str(name)))
    results = open_services(settings).search.search([i.rgb for i in images], params, [i.sha256 for i in images])
    for name, result in zip(args.images, results, strict=True):
        if args.json:  # the API's search answer, with the query's name
            print(json.dumps({"query": str(name), **SearchResponse.of(result, params).model_dump(mode="json")}))
            continue
        mode = f"two-stage, top {params.top_categories} categories" if params.use_prototypes else "exact"
        scanned = f"scanned {result.vectors_scanned}/{result.vectors_total} vectors"
        print(f"{name}  ({mode}; {scanned}; {result.timings_ms['total']:.1f} ms)")
        ranking = ", ".join(f"{c.category}{'*' if c.searched else ''} {c.score:.3f}" for c in result.categories[:5])
        print(f"  categories: {ranking}")
        for hit in result.results:
            print(f"  {hit.rank:>3}. image {hit.image_id:<8} {hit.category or '-':<14} cosine {hit.score:.4f}")
