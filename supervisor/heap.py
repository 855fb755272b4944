"""How often the daemon's process runs Python's cyclic garbage collector.

CPython runs a *young* collection every time 700 more container objects were made than
freed (``gc.get_threshold()[0]``), an older one every 10 young ones, and a *full* one
(every tracked object: the modules, trio, prometheus-client, the policies, every
session) when enough objects survived. Decisions in flight hold a few objects each
(their Notification; a waiting read's job and record), so with a hundred containers
calling at once the count crosses 700 again and again, and what survives those
collections brings the full ones on. Measured on the benchmark's 2-vCPU VM, the
``guard mkdirat/256`` row of ``bench/run.py`` at K=100 (24,000 guarded calls), with
CPython's 700 against 7,000:

* 621 young, 56 middle and 5 full collections, 180 ms in all (~7.5 µs per call), the
  full ones up to 24 ms each, the event loop stopped for every container meanwhile;
* against 69, 6 and 0: 21 ms in all, the longest collection 2.3 ms;
* ~144,000 instructions per guarded call against ~133,000 (callgrind), p99 of the
  calls 22.6 ms against 11.6 (median of 4 runs).

The daemon makes few cycles (a handler's exception with its traceback, an ended
session), so collecting them later holds little memory: at most the objects of 7,000
allocations more. Only the ``serve`` command's process sets this; tests and embedders
keep their own settings. ``python_gc_collections_total`` on ``/metrics`` counts the
collections by generation.
"""

from __future__ import annotations

import gc
from typing import Final

#: Container objects made (net) between two young collections; CPython's default is 700.
YOUNG_THRESHOLD: Final = 7000


def tune() -> None:
    """Set the young threshold; the older generations keep their thresholds."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
