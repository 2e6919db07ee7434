"""The command line's parser: one subcommand per command, each registered by the module that runs it."""

import argparse
from collections.abc import Callable
from typing import NoReturn

from backend.cli.catalogue import add_backup_commands, add_catalogue_commands, add_status_command
from backend.cli.cluster import add_cluster_command
from backend.cli.duplicates import add_duplicates_command
from backend.cli.evaluation import add_benchmark_command, add_evaluate_command
from backend.cli.keys import add_key_commands
from backend.cli.search import add_search_command
from backend.cli.server import add_serve_command, add_worker_commands
from backend.core.config import Settings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One `error:` line and exit status 2, like every other mistake (`--help` shows the usage)."""
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m backend.cli", description="Image similarity search")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace, Settings], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    # In the order `--help` lists them.
    add_catalogue_commands(command)
    add_search_command(command)
    add_worker_commands(command)
    add_status_command(command)
    add_duplicates_command(command)
    add_serve_command(command)
    add_evaluate_command(command)
    add_key_commands(command)
    add_backup_commands(command)
    add_benchmark_command(command)
    add_cluster_command(command)
    return parser
