"""One round of a point: issue its requests (closed loop or at a request rate) and time them.

Closed loop (no rate): ``concurrency`` workers each send their next request as soon as the
previous one finished. Open loop (a rate in requests/s): requests are due at Poisson arrival
times and sent by at most ``concurrency`` workers; a request's clock starts at its due time, so
waiting for a free worker counts as latency, as it would for a user.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmopt.bench.targets.base import Timing

Request = Callable[[float], Timing]  # issued (perf_counter) -> Timing


@dataclass
class Round:
    timings: list[Timing]
    wall_s: float  # first send -> last response

    @property
    def output_tokens(self) -> int:
        return sum(t.output_tokens for t in self.timings)

    @property
    def sequences(self) -> int:
        return sum(t.sequences for t in self.timings)


def run_round(request: Request, requests: int, concurrency: int, rate: float | None,
              rng: random.Random) -> Round:
    started = time.perf_counter()
    if concurrency == 1 and rate is None:
        timings = [request(time.perf_counter()) for _ in range(requests)]
        return Round(timings, time.perf_counter() - started)
    due: list[float] | None = None
    if rate is not None:
        at, due = 0.0, []
        for _ in range(requests):
            due.append(started + at)
            at += rng.expovariate(rate)
    lock = threading.Lock()
    queue = list(range(requests))
    results: list[Timing | None] = [None] * requests
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not queue or errors:
                    return
                index = queue.pop(0)
            issued = time.perf_counter()
            if due is not None:
                time.sleep(max(0.0, due[index] - issued))
                issued = due[index]
            try:
                results[index] = request(issued)
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
                with lock:
                    errors.append(exc)
                return

    threads = [threading.Thread(target=worker, name=f"bench-worker-{i}", daemon=True)
               for i in range(min(concurrency, requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    wall = time.perf_counter() - started
    return Round([t for t in results if t is not None], wall)
