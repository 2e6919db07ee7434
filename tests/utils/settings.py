"""Settings and data locations for tests."""

import os
from pathlib import Path

from sqlalchemy import Engine

from backend.core.config import PROJECT_ROOT, Settings

CIFAR_SUBSET = Path(os.environ.get("CIFAR10_SUBSET", PROJECT_ROOT.parent / "shared/datasets/cifar-10-subset/cifar-10-batches-py"))
CATALOGUE_SIZE = 600  # train-split images in the shared catalogue: 60 per category
QUERY_COUNT = 100  # test-split query images: 10 per category


def make_settings(tmp: Path, engine: Engine | None = None, **overrides: object) -> Settings:
    """Settings for a test: no .env, its own DATA_DIR, the given database and the CIFAR-10 subset."""
    url = engine.url.render_as_string(hide_password=False) if engine is not None else None
    overrides.setdefault("allowed_hosts", ["testserver"])  # the host name of Starlette's TestClient
    return Settings(_env_file=None, database_url=url, data_dir=tmp, cifar10_dir=CIFAR_SUBSET, **overrides)  # type: ignore[call-arg]
