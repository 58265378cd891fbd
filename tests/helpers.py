"""Small helpers for racing real threads."""
from __future__ import annotations

import threading
from typing import Callable


def race(n_threads: int, body: Callable[[int], object]) -> list[object]:
    """Run body(i) in n_threads threads released together by a Barrier; return results in order.
    Re-raises the first exception a thread raised."""
    barrier = threading.Barrier(n_threads)
    results: list[object] = [None] * n_threads
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = body(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a racing thread hung"
    if errors:
        raise errors[0]
    return results
