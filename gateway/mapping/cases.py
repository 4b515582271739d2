"""Mapping test cases: golden cases an operations engineer keeps beside the mappings.

``<mapping dir>/cases/<ResourceType>/<case>.yaml`` (or ``.json``) holds one case; a type with
several sources keeps the cases of a source with an ``id_prefix`` in
``cases/<ResourceType>.<prefix>/`` (``Encounter.op/``), as the golden files do::

    description: what the case is about            # optional
    input:                                         # SQL: one source record as the adapter
      p.PATNT_REFNO: 100001                        #   reads it (alias.COLUMN keys, children
      p.SURNAME: SMITH                             #   as "@name": [rows])
      "@addresses": [{a.LINE1: 1 High Street}]
    # or, over HL7 v2, the message as it arrives (one resource per PID group):
    message: |
      MSH|^~\\&|PAS|...
    expected: {resourceType: Patient, ...}         # the resource; a list for several

``careconnect-gateway mappings test [DIR]`` runs every case through the mapping for its
resource type — no server, no database, no network — and prints each difference as
``file:line: path: expected ..., got ...``. ``mappings check`` runs them too.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.mapping.loader import CompiledMapping
from gateway.mapping.yamlfile import YamlError, line_of, load

CASES_DIR = "cases"
SUFFIXES = (".yaml", ".yml", ".json")
MAX_DIFFERENCES = 25


@dataclass
class CaseResult:
    file: Path
    resource_type: str
    problems: list[str] = field(default_factory=list)
    """Each a finished line: ``file:line: path: message``."""

    @property
    def ok(self) -> bool:
        return not self.problems


def case_files(directory: Path) -> list[Path]:
    root = directory / CASES_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*") if p.suffix in SUFFIXES and p.is_file())


def _plain(value: Any) -> Any:
    """YAML's dates as the strings FHIR JSON has (``birthDate: 1965-04-12`` unquoted)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def _load(path: Path) -> Any:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return load(path)


def run_case(path: Path, mappings: dict[str, CompiledMapping]) -> CaseResult:
    folder = path.parent.name  # the type, or type.prefix for one of several sources
    rtype = folder.split(".", 1)[0]
    result = CaseResult(path, folder)

    def problem(line: int, text: str) -> CaseResult:
        result.problems.append(f"{path}:{line}: {text}" if line else f"{path}: {text}")
        return result

    try:
        doc = _load(path)
    except YamlError as exc:
        return problem(exc.line, exc.message)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return problem(getattr(exc, "lineno", 0), f"cannot read the case: {exc}")
    if not isinstance(doc, dict):
        return problem(0, "a case is a mapping with 'input' (or 'message') and 'expected'")
    unknown = set(doc) - {"description", "input", "message", "expected"}
    if unknown:
        return problem(line_of(doc, [sorted(unknown)[0]]),
                       f"unknown key(s) {', '.join(sorted(unknown))}: a case has description, "
                       "input or message, and expected")
    mapping = mappings.get(folder)
    if mapping is None:
        return problem(0, f"no mapping for {folder} in this directory (the folder name under "
                       f"{CASES_DIR}/ is the resource type, and for a source with an id_prefix "
                       f"the type, a dot and the prefix: {', '.join(sorted(mappings))})")
    if "expected" not in doc:
        return problem(0, "'expected' is missing: the resource the mapping must make")
    if ("input" in doc) == ("message" in doc):
        return problem(0, "give either 'input' (a source record) or 'message' (HL7 v2)")
    try:
        actual: Any = _build(mapping, doc)  # a list of resources
    except CaseError as exc:
        return problem(line_of(doc, ["message" if "message" in doc else "input"]), str(exc))
    expected = _plain(doc["expected"])
    if isinstance(expected, dict):
        if len(actual) != 1:
            return problem(line_of(doc, ["expected"]), f"the mapping made {len(actual)} "
                           "resources of the message; give 'expected' as a list of them")
        actual = actual[0]
    for where, message in differences(expected, actual, rtype if isinstance(expected, dict)
                                      else ""):
        if len(result.problems) >= MAX_DIFFERENCES:
            result.problems.append(f"{path}: ... more differences not shown")
            break
        problem(_line(doc, where), f"{where}: {message}")
    return result


class CaseError(Exception):
    """The mapping could not make a resource of the case's input."""


def _build(mapping: CompiledMapping, doc: dict[str, Any]) -> list[dict[str, Any]]:
    from gateway.errors import GatewayError
    from gateway.providers import Provider

    provider = Provider(mapping)
    try:
        if "input" in doc:
            record = doc["input"]
            if not isinstance(record, dict):
                raise CaseError("'input' must be one source record (a mapping of columns)")
            if provider.key and record.get(provider.key) is None:
                raise CaseError(f"the input needs the record's key, {provider.key} (columns "
                                "left out are read as null)")
            return [provider.resource(provider.as_record(record))]
        return _from_message(provider, doc["message"])
    except CaseError:
        raise
    except GatewayError as exc:
        raise CaseError(f"the mapping failed on this input: {exc.error_code}: {exc.message}"
                        ) from None
    except Exception as exc:  # a record the mapping cannot read: reported, not raised
        raise CaseError(f"the mapping failed on this input ({type(exc).__name__}: {exc})"
                        ) from None


def _from_message(provider: Any, text: Any) -> list[dict[str, Any]]:
    records = getattr(provider.mapping.adapter, "records", None)
    if records is None:
        raise CaseError(f"'message' is for HL7 v2 mappings; {provider.mapping.file.name} "
                        "reads records: use 'input'")
    if not isinstance(text, str) or not text.strip():
        raise CaseError("'message' must be the HL7 v2 message text")
    from adapters.hl7v2 import er7

    try:
        message = er7.parse(text.strip().replace("\n", "\r"))
    except er7.Er7Error as exc:
        raise CaseError(f"the message cannot be read: {exc}") from None
    return [provider.resource(r) for r in records(provider.mapping.prepared, message)]


# -- differences, by FHIR path ------------------------------------------------------------------


def differences(expected: Any, actual: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, what differs): missing and unexpected elements, different values, array items."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key, value in expected.items():
            where = f"{path}.{key}" if path else key
            if key not in actual:
                yield where, f"expected {_show(value)}, but the mapping leaves it out"
            else:
                yield from differences(value, actual[key], where)
        for key in actual.keys() - expected.keys():
            where = f"{path}.{key}" if path else key
            yield where, f"not expected, but the mapping makes {_show(actual[key])}"
        return
    if isinstance(expected, list) and isinstance(actual, list):
        for i, (e, a) in enumerate(zip(expected, actual, strict=False)):
            yield from differences(e, a, f"{path}[{i}]")
        for i in range(len(actual), len(expected)):
            yield f"{path}[{i}]", f"expected {_show(expected[i])}, but the mapping makes " \
                                  f"only {len(actual)} item(s)"
        for i in range(len(expected), len(actual)):
            yield f"{path}[{i}]", f"not expected, but the mapping makes {_show(actual[i])}"
        return
    # JSON's true is not 1 and 1 is not 1.0: compare the JSON text as well as the value
    if expected != actual or json.dumps(expected) != json.dumps(actual):
        yield path or "(resource)", f"expected {_show(expected)}, got {_show(actual)}"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=False)
    return text if len(text) <= 160 else text[:157] + "..."


def _line(doc: Any, where: str) -> int:
    """The line of the deepest ``expected`` node along a FHIR path (``Patient.name[0].use``)."""
    parts: list[Any] = ["expected"]
    body = where.split(".", 1)[1] if "." in where and where[:1].isupper() else where
    for piece in body.replace("[", ".[").split("."):
        if not piece:
            continue
        parts.append(int(piece[1:-1]) if piece.startswith("[") else piece)
    return line_of(doc, parts)


# -- the command ----------------------------------------------------------------------------------


def run_all(directory: Path, mappings: list[CompiledMapping]) -> list[CaseResult]:
    from gateway.profiles.golden import golden_name

    by_type = {golden_name(m): m for m in mappings}
    return [run_case(path, by_type) for path in case_files(directory)]


def report(results: list[CaseResult], out: Callable[[str], None] = print) -> int:
    """Print each case and a summary; the number of failed cases."""
    failed = 0
    for r in results:
        name = f"{r.resource_type}/{r.file.name}"
        if r.ok:
            out(f"ok   case {name}")
            continue
        failed += 1
        out(f"FAIL case {name}")
        for line in r.problems:
            out(f"  {line}")
    out(f"{len(results)} mapping case(s): {len(results) - failed} passed, {failed} failed")
    return failed
