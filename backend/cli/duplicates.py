"""`python -m backend.cli duplicates backfill`: near-duplicate links for every image stored without them (a
catalogue from before the links, or one filled by `populate` and workers while no server ran), in chunks,
each committed with the watermark: an interrupted run resumes where it stopped. A running server does the
same in the background, a chunk per tick; both may run at once (each chunk is linked by one of them)."""

import argparse
import time

from backend.cli.argtypes import int_in
from backend.cli.common import Command, open_services
from backend.core.config import Settings


def add_duplicates_command(command: Command) -> None:
    p = command(
        "duplicates", cmd_duplicates, "near-duplicate links: compute the missing ones (backfill), or say how far behind they are"
    )
    p.add_argument("action", choices=["backfill", "status"])
    p.add_argument("--chunk", type=int_in(1, 100_000), help="images linked per transaction (default NEAR_DUPLICATE_LINK_CHUNK)")


def cmd_duplicates(args: argparse.Namespace, settings: Settings) -> None:
    from backend.search import near_duplicates

    if args.chunk:
        settings = settings.model_copy(update={"near_duplicate_link_chunk": args.chunk})
    service = open_services(settings).lifecycle
    if args.action == "status":
        now = near_duplicates.progress(service.engine, service.model)
        print(f"near-duplicate links as of change {now.as_of_seq}: {now.behind} images behind")
        return
    service.sync_index()  # links are searched in the live index, built or loaded here
    start, linked, links = time.perf_counter(), 0, 0
    while True:
        done = service.link_duplicates()
        if not done.linked:
            service.cache.refresh()  # what others wrote meanwhile is linked too; then nothing is left
            done = service.link_duplicates()
            if not done.linked:
                break
        linked, links = linked + done.linked, links + done.links
        rate = linked / (time.perf_counter() - start)
        print(
            f"linked {linked} images ({links} new links, {rate:.0f}/s); as of change {done.as_of_seq}, {done.behind} behind",
            flush=True,
        )
    print(f"done: {linked} images linked, {links} new links; as of change {done.as_of_seq}, {done.behind} behind")
