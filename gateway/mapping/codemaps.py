"""Code maps: local codes of a legacy system to FHIR / NHS codes, kept as separate data.

Each map has an explicit policy for a local code it does not list:

* ``omit``    — the element is left out (a debug-level log line names the map and the code);
* ``default`` — the declared default target is used;
* ``error``   — the request fails with 502 UNMAPPED_SOURCE_CODE (use where a wrong answer
  would be worse than none).

The reverse direction (FHIR code → local codes) serves token searches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway import metrics
from gateway.errors import UnmappableData
from gateway.logging import DebugLog

# unmapped codes under omit are met on hot paths: a debug line must cost nothing when off
log = DebugLog("gateway.codemaps")

Policy = Literal["omit", "default", "error"]


@dataclass(frozen=True, slots=True)
class Target:
    code: str
    display: str | None = None


@dataclass(slots=True)
class CodeMap:
    name: str
    target_system: str | None
    unmapped: Policy
    entries: dict[str, Target]
    default: Target | None = None
    source: str = ""
    no_target: frozenset[str] = frozenset()
    """Local codes listed with no target: a decision, so left out without a log line."""
    _reverse: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rev: dict[str, list[str]] = {}
        for local, target in self.entries.items():
            rev.setdefault(target.code, []).append(local)
        if self.unmapped == "default" and self.default is not None:
            rev.setdefault(self.default.code, [])
        self._reverse = {k: tuple(v) for k, v in rev.items()}

    def lookup(self, local: Any) -> Target | None:
        key = str(local).strip()
        hit = self.entries.get(key)
        if hit is not None:
            return hit
        if key in self.no_target:
            return None
        if self.unmapped == "default":
            return self.default
        if self.unmapped == "error":
            raise UnmappableData(f"a source value has no entry in code map '{self.name}'")
        log.debug("unmapped_code", codemap=self.name)
        metrics.UNMAPPED_DROPPED.labels(self.name).inc()  # never silently: counted
        return None

    def local_codes(self, code: str) -> tuple[str, ...]:
        """Local codes that map to ``code`` (empty if none: the search matches nothing)."""
        return self._reverse.get(code, ())

    def target_codes(self) -> list[Target]:
        seen: dict[str, Target] = {}
        for t in self.entries.values():
            seen.setdefault(t.code, t)
        return list(seen.values())
