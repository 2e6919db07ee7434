import gc

from backend.core.memory import freeze_startup_objects


def test_objects_alive_after_start_up_are_left_out_of_later_collections() -> None:
    """A full collection walks every tracked object; after the freeze it walks none of those alive at start-up."""
    gc.unfreeze()
    tracked = len(gc.get_objects())
    freeze_startup_objects()
    try:
        assert gc.get_freeze_count() >= tracked * 0.9
        assert len(gc.get_objects()) < tracked * 0.1
    finally:
        gc.unfreeze()  # other tests' objects are collected as usual
