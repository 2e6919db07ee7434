"""`api-key create|list|revoke|ensure-admin` (backend.services.keys)."""

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from backend.cli.common import Command, require_schema
from backend.core.config import Settings
from backend.services.keys import SCOPES

if TYPE_CHECKING:
    from backend.services.keys import Keys


def cmd_api_key(args: argparse.Namespace, settings: Settings) -> None:
    from backend.services.keys import Keys
    from backend.storage.engine import get_engine

    require_schema()
    keys = Keys(settings, get_engine())
    if args.action == "create":
        info, key = keys.create(args.name, args.scope)
        print(f"API key {info.prefix} '{info.name}' with scopes {', '.join(info.scopes)} (shown once, store it now):")
        print(key)
    elif args.action == "list":
        _list(keys, args.all, args.json)
    elif args.action == "revoke":
        info = keys.revoke(args.key)
        print(f"API key {info.prefix} '{info.name}' revoked")
    else:  # ensure-admin: the one-command start's key, created once and kept where only this user reads it
        _ensure_admin(keys, args.file or settings.admin_key_file)


def _list(keys: "Keys", include_revoked: bool, as_json: bool) -> None:
    found = keys.listing(include_revoked)
    if as_json:
        print(json.dumps([asdict(k) for k in found], default=str))
        return
    print(f"{'id':>4}  {'prefix':<8}  {'name':<20} {'scopes':<24} {'created':<20} {'last used':<20} revoked")
    for k in found:
        when = [t.strftime("%Y-%m-%d %H:%M:%S") if t else "-" for t in (k.created_at, k.last_used_at, k.revoked_at)]
        print(f"{k.id:>4}  {k.prefix:<8}  {k.name:<20} {','.join(k.scopes):<24} {when[0]:<20} {when[1]:<20} {when[2]}")


def _ensure_admin(keys: "Keys", path: Path) -> None:
    if not keys.ensure_admin(path):
        print(f"admin API key: {path} (send it as X-API-Key; the web page asks for it when a change needs it)")
        return
    print(f"created an admin API key and saved it to {path} (readable only by you). Use it with")
    print(f'  curl -H "X-API-Key: $(cat {path})" ...')
    print("and paste it into the web page when it asks (it is kept until the tab is closed).")


def add_key_commands(command: Command) -> None:
    p = command("api-key", cmd_api_key, "create, list and revoke API keys")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", help="a new key, printed once")
    k.add_argument("--name", required=True)
    k.add_argument("--scope", action="append", required=True, choices=SCOPES, help="repeat for several scopes")
    k = keys.add_parser("list", help="keys with name, scopes, creation and last use (never the keys themselves)")
    k.add_argument("--all", action="store_true", help="include revoked keys")
    k.add_argument("--json", action="store_true")
    k = keys.add_parser("revoke", help="revoke a key by id, prefix or name")
    k.add_argument("key")
    k = keys.add_parser("ensure-admin", help="create an admin key saved to a file (mode 600) unless the file holds a valid one")
    k.add_argument("--file", type=Path, help="default: DATA_DIR/admin.key")
