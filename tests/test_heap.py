"""supervisor/heap.py: the garbage collector's young threshold, set by `serve` only."""

from __future__ import annotations

import gc
from pathlib import Path

from supervisor import heap

from .soak import config_text, daemon_process


def test_tune_raises_the_young_threshold_only() -> None:
    before = gc.get_threshold()
    try:
        heap.tune()
        assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)


def test_the_serve_process_runs_with_it_and_shows_its_collections(tmp_path: Path) -> None:
    assert gc.get_threshold()[0] != heap.YOUNG_THRESHOLD  # this process keeps its own
    with daemon_process(tmp_path, config_text(tmp_path)) as d:
        d.start()
        collector = d.status()["garbage_collector"]
        assert collector["young_threshold"] == heap.YOUNG_THRESHOLD
        assert len(collector["collections"]) == 3
        # /metrics counts the same collections (some more may have run since).
        metrics = d.metrics()
        for generation, before in enumerate(collector["collections"]):
            counted = metrics[("python_gc_collections_total",
                               (("generation", str(generation)),))]
            assert counted >= before
        assert ("python_gc_objects_collected_total", (("generation", "2"),)) in metrics
