"""Run `python -m backend.cli` as a user would: a real process, in the project folder."""

import os
import subprocess
import sys

from backend.core.config import PROJECT_ROOT


def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI with the test's environment on top of this one; output captured as text, never raises."""
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
