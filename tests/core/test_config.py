"""Settings checked at start-up."""

import pytest
from pydantic import ValidationError

from backend.core.config import Settings


def test_the_shard_grace_period_outlasts_an_epoch_check_and_two_deadlines() -> None:
    """The old epoch is killed after SHARD_GRACE_SECONDS: shorter than a router's switch, searches would fail."""
    assert Settings(_env_file=None, shard_deadline_seconds=2, shard_grace_seconds=5).shard_grace_seconds == 5  # type: ignore[call-arg]
    for grace in (0, 4.9):
        with pytest.raises(ValidationError, match="SHARD_GRACE_SECONDS"):
            Settings(_env_file=None, shard_deadline_seconds=2, shard_grace_seconds=grace)  # type: ignore[call-arg]
