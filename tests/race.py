"""Races: one callable from many threads released at the same instant (count the calls that won), and another
writer slipped in between a read and the write that follows it."""
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


def write_after_read(monkeypatch, collection, filter: dict, write) -> list[dict]:
    """Every read of ``collection`` by exactly ``filter`` is followed at once by ``write()`` (another writer moving
    between that read and whatever the reader writes next); returns the list of filters it fired on."""
    read = type(collection).find
    fired = []

    def then_written_meanwhile(self, query=None, *args, **kwargs):
        found = read(self, query, *args, **kwargs)
        if self.name == collection.name and query == filter:
            found = list(found)
            write()
            fired.append(query)
        return found

    monkeypatch.setattr(type(collection), "find", then_written_meanwhile)
    return fired
