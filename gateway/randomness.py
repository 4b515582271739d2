"""Random bytes for ids and nonces, from the OS generator, a block at a time.

``os.urandom`` is a system call that releases the GIL; on the event loop thread, with the
database's worker threads busy, getting the GIL back can wait on them. A request took three
(request id, Bundle id, paging-link nonce). Here one ``os.urandom(4096)`` serves 256 of
them: the same generator's bytes, each handed out once. A forked child starts with an empty
block (it must not hand out its parent's bytes again).

Not for keys: keys come from ``os.urandom`` / ``secrets`` directly, once.
"""

from __future__ import annotations

import os
import threading

_BLOCK = 4096
_lock = threading.Lock()
_block = b""
_pos = 0


def random_bytes(n: int) -> bytes:
    """``n`` (at most 4,096) bytes of ``os.urandom`` output, never handed out before."""
    global _block, _pos
    with _lock:
        end = _pos + n
        if end > len(_block):
            _block, _pos, end = os.urandom(max(_BLOCK, n)), 0, n
        out = _block[_pos:end]
        _pos = end
    return out


def random_hex(n: int) -> str:
    """``n`` random bytes as 2n hex digits."""
    return random_bytes(n).hex()


def uuid4() -> str:
    """A random (version 4) UUID in its text form, as ``str(uuid.uuid4())``."""
    b = bytearray(random_bytes(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _forget() -> None:
    global _block, _pos, _lock
    _block, _pos, _lock = b"", 0, threading.Lock()  # the parent's lock may be held


os.register_at_fork(after_in_child=_forget)
