"""`cluster up --nodes N` / `cluster down`: a Ray cluster on loopback for trying and testing; `cluster
rebalance`: the categories packed again over a new number of groups and the nodes there are now
(docs/cluster.md)."""

import argparse

from backend.cli.argtypes import int_in
from backend.cli.common import Command, open_services
from backend.core.config import Settings
from backend.core.errors import AppError


def cmd_cluster(args: argparse.Namespace, settings: Settings) -> None:
    from backend.cluster import local

    if args.action == "up":
        cluster = local.up(settings.data_dir, args.nodes, args.port)
        print(f"cluster up: {args.nodes} node(s); serve with RAY_ADDRESS={cluster.address}", flush=True)
        print(cluster.address)
    elif args.action == "down":
        stopped = local.down(settings.data_dir)
        print(f"cluster down: {stopped} process(es) stopped")
    else:
        rebalance(args, settings)


def rebalance(args: argparse.Namespace, settings: Settings) -> None:
    if not settings.ray_address:
        raise AppError("cluster rebalance needs RAY_ADDRESS (the cluster the servers use)")
    from backend.cluster.epochs import ShardFleet, connect
    from backend.cluster.rebalance import rebalance

    search = open_services(settings).search
    connect(settings.ray_address)
    fleet = ShardFleet.of(settings, search.engine, search.model, search.embedder.dim, search.layout)
    done = rebalance(fleet, args.groups, args.timeout, not args.no_wait, lambda line: print(line, flush=True))
    print(f"rebalanced: epoch {done.old} -> {done.new}, {done.groups} groups x {done.replicas} replicas")


def add_cluster_command(command: Command) -> None:
    what = "start (up) or stop (down) a Ray cluster on this machine, on loopback; rebalance the shards at RAY_ADDRESS"
    p = command("cluster", cmd_cluster, what)
    p.add_argument("action", choices=("up", "down", "rebalance"))
    p.add_argument("--nodes", type=int_in(1, 16), default=3, help="up: nodes, the head included (default 3)")
    p.add_argument("--port", type=int_in(1024, 65535), default=6390, help="up: the head's port (default 6390)")
    p.add_argument("--groups", type=int_in(1, 1024), help="rebalance: category groups (default SHARD_GROUPS, else 2 per node)")
    p.add_argument("--timeout", type=float, default=3600, help="rebalance: seconds the new replicas may take to build")
    p.add_argument("--no-wait", action="store_true", help="rebalance: return once active; the servers retire the old epoch")
