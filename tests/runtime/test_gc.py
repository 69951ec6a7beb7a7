"""The runtime settles its collector once started (runtime.app.settle_garbage_collector)."""

from __future__ import annotations

import gc

from runtime.app import settle_garbage_collector


def test_what_the_process_holds_is_left_out_of_later_collections() -> None:
    held = [[n] for n in range(10_000)]  # containers, tracked by the collector
    gc.unfreeze()
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() >= len(held)
        scanned = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
        assert not any(id(item) in scanned for item in held)
    finally:
        gc.unfreeze()
