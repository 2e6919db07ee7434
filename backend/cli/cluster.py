"""`cluster up --nodes N` / `cluster down`: a Ray cluster on loopback for trying and testing (docs/cluster.md)."""

import argparse

from backend.cli.argtypes import int_in
from backend.cli.common import Command
from backend.core.config import Settings


def cmd_cluster(args: argparse.Namespace, settings: Settings) -> None:
    from backend.cluster import local

    if args.action == "up":
        cluster = local.up(settings.data_dir, args.nodes, args.port)
        print(f"cluster up: {args.nodes} node(s); serve with RAY_ADDRESS={cluster.address}", flush=True)
        print(cluster.address)
    else:
        stopped = local.down(settings.data_dir)
        print(f"cluster down: {stopped} process(es) stopped")


def add_cluster_command(command: Command) -> None:
    p = command("cluster", cmd_cluster, "start (up) or stop (down) a Ray cluster on this machine, on loopback")
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--nodes", type=int_in(1, 16), default=3, help="nodes, the head included (default 3)")
    p.add_argument("--port", type=int_in(1024, 65535), default=6390, help="the head's port (default 6390)")
