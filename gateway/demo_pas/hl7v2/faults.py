"""Scripted faults: what goes wrong with the next replies (delays, drops, NAKs, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.hl7v2.mllp_server import Reply


@dataclass
class Faults:
    """Faults for upcoming messages: each ``*_count`` is how many of the next messages get it
    (decremented as used). Several faults may hit the same message."""

    delay_seconds: float = 0.0
    delay_count: int = 0
    """Hold the reply back ``delay_seconds`` (beyond the client's reply timeout: a timeout)."""
    drop_count: int = 0
    """Process the message, then close the connection without replying (a lost ACK)."""
    nak_ae_count: int = 0
    """Do not process; reply AE with ERR 207."""
    nak_ar_count: int = 0
    """Do not process; reply AR with ERR 207."""
    split_count: int = 0
    """Send the reply in three TCP writes."""
    missing_cr_count: int = 0
    """Leave out the CR ending the last segment and the CR after the MLLP end block."""
    wrong_msa2_count: int = 0
    """Put another control id in MSA-2."""
    only: str | None = None
    """Fault only messages of this MSH-9.1 kind (``QBP``: the read after a write; ``ADT``)."""
    every: int = 1
    """Fault only every n-th message (of the ``only`` kind): NAK every third, and so on."""
    seen: int = field(default=0, compare=False)
    """Messages (of the ``only`` kind) seen so far: counts towards ``every``."""

    def applies(self, kind: str) -> bool:
        """Whether this message (MSH-9.1 ``kind``) is one the faults are for; counts it."""
        if self.only is not None and kind != self.only:
            return False
        self.seen += 1
        return self.seen % max(self.every, 1) == 0


def deliver(f: Faults, payload: bytes, control: str, due: bool = True) -> bytes | Reply:
    """The reply as the faults due say it goes out (none unless ``due``)."""
    if not due:
        return payload
    if f.wrong_msa2_count > 0:
        f.wrong_msa2_count -= 1
        payload = _replace_msa2(payload, "WRONG" + control[:15])
    delay = drop = split = omit = False
    if f.delay_count > 0:
        f.delay_count -= 1
        delay = True
    if f.drop_count > 0:
        f.drop_count -= 1
        drop = True
    if f.split_count > 0:
        f.split_count -= 1
        split = True
    if f.missing_cr_count > 0:
        f.missing_cr_count -= 1
        omit = True
    if not (delay or drop or split or omit):
        return payload
    if omit and payload.endswith(b"\r"):
        payload = payload[:-1]
    return Reply(None if drop else payload, delay=f.delay_seconds if delay else 0.0,
                 drop_connection=drop, split_into=3 if split else 1, omit_final_cr=omit)


def _replace_msa2(payload: bytes, control: str) -> bytes:
    lines = payload.split(b"\r")
    for i, line in enumerate(lines):
        if line.startswith(b"MSA|"):
            parts = line.split(b"|")
            while len(parts) < 3:
                parts.append(b"")
            parts[2] = control.encode()
            lines[i] = b"|".join(parts)
    return b"\r".join(lines)
