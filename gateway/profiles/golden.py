"""Golden inputs through their mappings, and the output through the profile validator.

``<golden>/<ResourceType>/<case>.input.json`` holds a raw source record (``"p.SURNAME"`` keys,
children under ``"@addresses"``); a source with an ``id_prefix`` (one of several sources of
its type) has its own directory, ``<ResourceType>.<prefix>`` (``Encounter.op``).
``careconnect-gateway mappings check`` maps each with its mapping and validates the result
against the mapping's profile.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import GatewayError
from gateway.mapping.loader import CompiledMapping, LoadedSet
from gateway.profiles.validator import Issue, validate

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_GOLDEN = PACKAGE_DIR.parent / "tests" / "golden"
DEMO_MAPPINGS = PACKAGE_DIR.parent / "mappings" / "demo-pas"


@dataclass
class CaseResult:
    resource_type: str
    name: str
    issues: list[Issue] = field(default_factory=list)
    failure: str | None = None
    """The mapping itself failed on the record (e.g. an unmapped code with policy error)."""

    @property
    def errors(self) -> int:
        return (self.failure is not None) + sum(i.severity == "error" for i in self.issues)


def default_golden_dir(mapping_dir: Path) -> Path | None:
    """``<mapping dir>/golden`` if present; the repository's tests/golden for its demo."""
    local = mapping_dir / "golden"
    if local.is_dir():
        return local
    if REPO_GOLDEN.is_dir() and DEMO_MAPPINGS.is_dir() and \
            mapping_dir.resolve() == DEMO_MAPPINGS.resolve():
        return REPO_GOLDEN
    return None


def golden_name(m: CompiledMapping) -> str:
    """The golden directory of a mapping's cases: its type, and its id prefix if it has one."""
    prefix = (m.spec.id_prefix or "").rstrip("-.")
    return f"{m.resource_type}.{prefix}" if prefix else m.resource_type


def run_golden(mappings: Iterable[CompiledMapping], golden: Path) -> list[CaseResult]:
    from gateway.providers import Provider

    results = []
    for m in mappings:
        cases = sorted((golden / golden_name(m)).glob("*.input.json"))
        if not cases:
            continue
        provider = Provider(m)
        for case in cases:
            result = CaseResult(golden_name(m), case.name.removesuffix(".input.json"))
            try:
                record = json.loads(case.read_text(encoding="utf-8"))
                resource = provider.resource(provider.as_record(record))
            except GatewayError as exc:
                result.failure = f"the mapping failed on this record: {exc.error_code}"
            except Exception as exc:  # a bad record or a mapping bug: reported, not raised
                result.failure = f"the mapping failed on this record ({type(exc).__name__})"
            else:
                result.issues = validate(resource, m.spec.profile)
            results.append(result)
    return results


def print_results(results: list[CaseResult], out: Callable[[str], None] = print) -> int:
    """Print per case; return the number of errors."""
    errors = 0
    for r in results:
        shown = [i for i in r.issues if i.severity != "information"]
        status = "ok  " if r.errors == 0 else "FAIL"
        warnings = sum(i.severity == "warning" for i in r.issues)
        out(f"{status} golden {r.resource_type}/{r.name}: {r.errors} error(s), "
            f"{warnings} warning(s)")
        if r.failure:
            out(f"       error  {r.failure}")
        for i in shown:
            out(f"       {i.severity:<7}{i.expression}: {i.message} [{i.code}]")
        errors += r.errors
    return errors


def check_cli(loaded: LoadedSet, golden: Path | None) -> int:
    """``mappings check``, after loading: the golden inputs (if any) → exit status."""
    directory = golden if golden is not None else default_golden_dir(loaded.directory)
    if directory is None:
        return 0
    if not directory.is_dir():
        print(f"golden directory not found: {directory}")
        return 1
    import structlog

    from gateway import logging as gateway_logging

    if not structlog.is_configured():  # mapping debug lines would drown the report
        gateway_logging.configure("warning")
    results = run_golden(loaded.mappings, directory)
    errors = print_results(results)
    print(f"{len(results)} golden case(s) validated against their profiles: {errors} error(s)")
    return 1 if errors else 0
