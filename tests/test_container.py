"""The container files cannot be run here (no container daemon): check that they agree with the settings."""

import re

import yaml

from backend.core.config import PROJECT_ROOT, Settings

NOT_SETTINGS = {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}


def test_compose_sets_only_real_settings() -> None:
    compose = yaml.safe_load((PROJECT_ROOT / "compose.yaml").read_text())
    api = compose["services"]["api"]
    assert api["build"] == "."
    names = set(api["environment"])
    assert names and {n.lower() for n in names} <= set(Settings.model_fields), names
    # The values parse as settings too.
    Settings(_env_file=None, **{k.lower(): v for k, v in api["environment"].items()})  # type: ignore[arg-type]
    assert compose["services"]["db"]["image"].startswith("postgres:16")


def test_dockerfile_sets_only_real_settings_and_runs_as_a_user() -> None:
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    env_names = {m for line in re.findall(r"^ENV (.+)$", text, re.M) for m in re.findall(r"(\w+)=", line)}
    assert {n.lower() for n in env_names - NOT_SETTINGS} <= set(Settings.model_fields), env_names
    assert "ONNX_CACHE_DIR" in env_names  # the export baked in at build time is where the server looks
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    for copied in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (PROJECT_ROOT / copied).exists(), copied
