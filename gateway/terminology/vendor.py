"""Regenerate ``gateway/terminology/data/careconnect.json`` from ``../shared`` (a developer
tool, never at run time)::

    python -m gateway.terminology.vendor [--shared ../shared]

It takes the Care Connect ValueSets that the vendored profiles bind to (any strength; those
published in ``shared/careconnect/valuesets``), the ValueSets they import, and the Care Connect
CodeSystems they draw codes from (``shared/careconnect/codesystems``), converted from the
published XML to FHIR JSON by fhir.resources. The narrative (``text``) is left out to keep the
package data small; everything else is as published.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import orjson
from fhir.resources.STU3.codesystem import CodeSystem
from fhir.resources.STU3.valueset import ValueSet
from lxml import etree

from gateway.profiles.vendor import DATA_DIR as PROFILE_DATA

OUT = Path(__file__).resolve().parent / "data" / "careconnect.json"
_URL = "{http://hl7.org/fhir}url"


def _index(folder: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.glob("*.xml")):
        url = etree.parse(str(path)).getroot().find(_URL)
        if url is not None and url.get("value"):
            out[url.get("value")] = path
    return out


def _convert(model: Any, path: Path) -> dict[str, Any]:
    resource: dict[str, Any] = orjson.loads(model.model_validate_xml(path.read_bytes())
                                            .model_dump_json())
    resource.pop("text", None)
    return resource


def bound_valuesets() -> set[str]:
    sds = json.loads((PROFILE_DATA / "structuredefinitions.json").read_text())
    return {el["binding"]["valueSet"] for sd in sds["structureDefinitions"].values()
            for el in sd["elements"] if (el.get("binding") or {}).get("valueSet")}


def vendor(shared: Path, out: Path = OUT) -> dict[str, int]:
    cc = shared / "careconnect"
    vs_index, cs_index = _index(cc / "valuesets"), _index(cc / "codesystems")
    valuesets: dict[str, Any] = {}
    codesystems: dict[str, Any] = {}
    pending = sorted(u for u in bound_valuesets() if u in vs_index)
    while pending:
        url = pending.pop(0)
        if url in valuesets or url not in vs_index:
            continue
        vs = valuesets[url] = _convert(ValueSet, vs_index[url])
        compose = vs.get("compose") or {}
        for part in compose.get("include", []) + compose.get("exclude", []):
            system = part.get("system")
            if system in cs_index and system not in codesystems:
                codesystems[system] = _convert(CodeSystem, cs_index[system])
            pending += part.get("valueSet", [])
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"valueSets": [valuesets[k] for k in sorted(valuesets)],
            "codeSystems": [codesystems[k] for k in sorted(codesystems)]}
    out.write_text(json.dumps(body, separators=(",", ":"), ensure_ascii=False)
                   + "\n", encoding="utf-8")
    return {"valueSets": len(valuesets), "codeSystems": len(codesystems)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path,
                    default=Path(__file__).resolve().parents[2].parent / "shared")
    args = ap.parse_args(argv)
    print(vendor(args.shared), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
