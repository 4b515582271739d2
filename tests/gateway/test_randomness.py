from __future__ import annotations

import os
import re
import threading
import uuid

from gateway import randomness


def test_bytes_are_never_handed_out_twice() -> None:
    seen = {randomness.random_bytes(16) for _ in range(3000)}  # crosses several blocks
    assert len(seen) == 3000
    assert all(len(b) == 16 for b in seen)
    assert len(randomness.random_bytes(4096)) == 4096  # a whole block at once


def test_threads_get_distinct_bytes() -> None:
    out: list[list[bytes]] = [[] for _ in range(8)]

    def draw(slot: list[bytes]) -> None:
        slot.extend(randomness.random_bytes(12) for _ in range(2000))

    threads = [threading.Thread(target=draw, args=(slot,)) for slot in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [b for slot in out for b in slot]
    assert len(set(every)) == len(every) == 16000


def test_uuid4_is_a_version_4_uuid() -> None:
    for _ in range(200):
        text = randomness.uuid4()
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert re.fullmatch(r"[0-9a-f]{32}", randomness.random_hex(16))


def test_a_forked_child_does_not_repeat_its_parents_bytes() -> None:
    randomness.random_bytes(16)  # the parent holds a partly used block
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it draws next
        try:
            os.write(write_end, randomness.random_bytes(16))
        finally:
            os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    parent = randomness.random_bytes(16)  # what the parent hands out next
    assert len(child) == 16 and child != parent
