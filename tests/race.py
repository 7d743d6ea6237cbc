"""Run one callable from many threads released at the same instant; count the calls that won."""
from __future__ import annotations

import threading


def winners(action, threads: int = 20) -> int:
    results = []
    barrier = threading.Barrier(threads)

    def run():
        barrier.wait()
        results.append(action())

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(result is not None for result in results)
