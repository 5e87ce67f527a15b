"""Process tuning for message-heavy services: the cyclic garbage collector.

Every record allocates a few dozen short-lived objects (record, headers, event model, context,
futures).  With CPython's default thresholds (700 allocations) the collector runs thousands
of times per second and regularly walks the whole heap — with torch and transformers loaded,
hundreds of thousands of long-lived objects.  Measured on the bus benchmark's consumer: 35% of
its CPU.  So a service freezes what exists at start-up (`gc.freeze`: those objects are never
scanned again) and collects the young generation every `gen0` allocations instead.
"""

from __future__ import annotations

import gc

__all__ = ["tune_gc"]

_tuned = False


def tune_gc(gen0: int) -> None:
    """Apply once per process; ``gen0 <= 0`` keeps Python's defaults."""
    global _tuned  # noqa: PLW0603 - one process-wide switch
    if _tuned or gen0 <= 0:
        return
    _tuned = True
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, max(gen1, 50), max(gen2, 50))
