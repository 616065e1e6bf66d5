"""This machine's read-bandwidth limit, measured in the same run as the models.

Batch-1 decode streams every weight once per token, so ``bytes/token x tokens/s`` cannot
exceed the rate at which the cores can read memory. The probe reads a buffer much larger than
the last-level cache with vectorized NumPy reductions (sum, max), split over the same number of
threads the models use (NumPy releases the interpreter lock inside them), and keeps the best
pass: the least disturbed read on a shared machine, so a fair ceiling.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_BYTES = 512 * 2**20  # >> any CPU's last-level cache


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float  # best pass
    median_bytes_per_s: float
    buffer_bytes: int
    threads: int
    passes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_read_bandwidth(threads: int = 1, buffer_bytes: int = DEFAULT_BYTES,
                           passes: int = 5) -> Bandwidth:
    """Read ``buffer_bytes`` ``passes`` times per reduction on ``threads`` threads."""
    buffer = np.ones(max(buffer_bytes // 8, threads), dtype=np.float64)  # pages touched
    parts = np.array_split(buffer, threads)
    rates = []
    for reduce in (np.sum, np.max):
        for _ in range(passes):
            rates.append(buffer.nbytes / _timed(reduce, parts))
    del buffer, parts
    return Bandwidth(max(rates), float(np.median(rates)), int(buffer_bytes), threads,
                     len(rates))


def _timed(reduce: Any, parts: list[np.ndarray]) -> float:
    workers = [threading.Thread(target=reduce, args=(p,)) for p in parts]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


def fraction_of_limit(bytes_per_token: float, tokens_per_s: float,
                      bandwidth_bytes_per_s: float) -> float:
    """The share of the read-bandwidth limit a decode rate uses (1.0: memory-bound at the
    limit; well below: time goes elsewhere, compute or overhead)."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError("bandwidth must be positive")
    return bytes_per_token * tokens_per_s / bandwidth_bytes_per_s
