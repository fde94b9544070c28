"""index/rwlock.py: readers share, a writer is alone, and a waiting writer holds new readers back."""

from __future__ import annotations

import threading

from index.rwlock import ReadWriteLock


def wait_until(condition, seconds: float = 10) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds / 0.005)):
        if condition():
            return True
        threading.Event().wait(0.005)
    return condition()


def test_readers_share_the_lock_and_a_writer_waits_for_them() -> None:
    lock = ReadWriteLock()
    assert lock.acquire_read() and lock.acquire_read(blocking=False)  # two readers at once
    wrote = threading.Event()

    def write() -> None:
        with lock.write():
            wrote.set()

    writer = threading.Thread(target=write)
    writer.start()
    assert wait_until(lambda: lock._writers_waiting == 1)
    assert not lock.acquire_read(blocking=False)  # a waiting writer holds new readers back
    lock.release_read()
    assert not wrote.is_set()  # one reader is still in
    lock.release_read()
    writer.join(10)
    assert wrote.is_set() and lock.acquire_read(blocking=False)  # and readers come back once it is done
    lock.release_read()


def test_a_writer_is_alone_and_blocked_readers_go_on_after_it() -> None:
    lock = ReadWriteLock()
    read: list[str] = []
    with lock.write():
        assert not lock.acquire_read(blocking=False)
        reader = threading.Thread(target=lambda: (lock.acquire_read(), read.append("in"), lock.release_read()))
        reader.start()
        assert not wait_until(lambda: bool(read), seconds=0.2)  # it waits for the writer
    reader.join(10)
    assert read == ["in"] and (lock._readers, lock._writing, lock._writers_waiting) == (0, False, 0)
