"""Failpoints: `IMSRC_FAILPOINT=name:n` kills this process with SIGKILL the n-th time the code passes the
point `name`, so that fault tests crash a real process at an exact step (as FoundationDB's and TiKV's
failpoints do) instead of guessing a moment. Unset (always, outside tests), a pass costs one comparison."""

import os
import signal

_SPEC = os.environ.get("IMSRC_FAILPOINT", "")
_NAME, _, _AT = _SPEC.partition(":")
_passes: dict[str, int] = {}


def failpoint(name: str) -> None:
    if name != _NAME:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(_AT or 1):
        os.kill(os.getpid(), signal.SIGKILL)
