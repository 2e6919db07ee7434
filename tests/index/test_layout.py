"""The index layout (backend/index/layout.py): one model, validated once, built from the settings, resolved
by catalogue size, stored in the cache header and read back from it."""

import pytest
from pydantic import ValidationError

from backend.core.errors import ConfigurationError
from backend.core.index_options import AUTO_FASTSCAN_FROM
from backend.index.layout import IndexDescription, IndexLayout, layout_from_settings
from tests.utils.settings import make_settings


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="compressed"):
        IndexLayout("ivf", "float32", rerank="float32")
    with pytest.raises(ValueError, match="re-ranking codec"):
        IndexLayout("ivf", "pq8", rerank="sq4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown index type"):
        IndexLayout("hnsw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown vector codec"):
        IndexLayout("ivf", "int4")
    with pytest.raises(ValueError, match="4-bit PQ codes"):
        IndexLayout("fastscan", "sq8")
    with pytest.raises(ValueError, match="does not divide"):
        IndexLayout("ivf", "pq8").check_dim(30)


def test_auto_resolves_by_size_to_a_concrete_layout() -> None:
    auto = IndexLayout("auto", fastscan_m=320, auto_threshold=1000)
    assert auto.resolved(999) == IndexLayout("flat")
    assert auto.resolved(1000) == IndexLayout("fastscan", "pq320")
    fastscan = IndexLayout("fastscan", "pq320", 6)
    assert fastscan.resolved(0) is fastscan
    # The auto-only fields do not make two builds of the same lists differ.
    assert IndexLayout("ivf", "sq8", fastscan_m=64, auto_threshold=5).resolved(10) == IndexLayout("ivf", "sq8")


def test_settings_build_the_layout(tmp_path) -> None:
    settings = make_settings(tmp_path, faiss_index_type=" FlatL2 ", vector_codec="SQ8", faiss_list_size=64)
    assert (settings.faiss_index_type, settings.vector_codec) == ("flat", "sq8")
    assert layout_from_settings(settings, 1280) == IndexLayout("flat", "sq8", 64, "none", 320, AUTO_FASTSCAN_FROM)
    fastscan = make_settings(tmp_path, faiss_index_type="fastscan", fastscan_m=160)
    assert layout_from_settings(fastscan, 1280) == IndexLayout("fastscan", "pq160", 256, "none", 160, AUTO_FASTSCAN_FROM)
    with pytest.raises(ValidationError, match="use ivf"):
        make_settings(tmp_path, faiss_index_type="hnsw")
    with pytest.raises(ValidationError, match="unknown vector codec"):
        make_settings(tmp_path, vector_codec="int4")
    with pytest.raises(ConfigurationError, match="unset VECTOR_CODEC and RERANK"):
        layout_from_settings(make_settings(tmp_path, faiss_index_type="fastscan", vector_codec="sq8"), 1280)
    with pytest.raises(ConfigurationError, match="FASTSCAN_M=7: 7 does not divide the vector dimension 1280"):
        layout_from_settings(make_settings(tmp_path, fastscan_m=7), 1280)


def test_the_description_round_trips_and_refuses_a_bad_layout() -> None:
    description = IndexDescription(
        model="m",
        dim=8,
        category_ids=[1, 2],
        layout=IndexLayout("ivf", "sq8", 30, "float16"),
        lists_per_category=[2, 1],
        trained_sizes=[60, 0],
        codec_trained_on=60,
    )
    again = IndexDescription.model_validate_json(description.model_dump_json())
    assert again == description and again.layout == IndexLayout("ivf", "sq8", 30, "float16")
    raw = description.model_dump(mode="json")
    with pytest.raises(ValidationError):
        IndexDescription.model_validate({**raw, "layout": {**raw["layout"], "kind": "hnsw"}})
    with pytest.raises(ValidationError):
        IndexDescription.model_validate({**raw, "layout": {**raw["layout"], "codec": "float32", "rerank": "float16"}})
    with pytest.raises(ValueError, match="list layout does not match"):
        description.model_copy(update={"lists_per_category": [1]}).check_lists()
