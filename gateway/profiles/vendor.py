"""Regenerate ``gateway/profiles/data/`` from the reference material in ``../shared``.

Run from the repository root (a developer tool, never at run time)::

    python -m gateway.profiles.vendor [--shared ../shared]

It reads the Care Connect StructureDefinitions (snapshots), ValueSets and CodeSystems the
gateway's five resource profiles need from ``shared/careconnect`` (XML, as published by HL7 UK)
and writes them in a compact JSON form that loads in milliseconds:

``structuredefinitions.json``
    the five resource profiles and every extension definition they reference (transitively):
    snapshot elements reduced to what validation and coverage use.
``terminology.json``
    the ValueSets bound ``required`` or ``extensible`` that can be vendored, and the local
    CodeSystems those include whole. A ``required`` binding on a ``code`` element to a FHIR core
    ValueSet is vendored as the enumeration the official FHIR STU3 JSON schema
    (``shared/fhir-stu3/fhir.schema.json``) gives for that element.
``base-stu3.json``
    the FHIR STU3 base types and resources (element names, types, cardinality, choice groups,
    reference targets, required code enumerations) for elements a profile leaves unconstrained;
    structure from the fhir.resources STU3 models (generated from the STU3 StructureDefinitions),
    code enumerations from the official STU3 JSON schema.
``NOTICE.md``
    where each file came from (branch and commit from ``PROVENANCE.tsv``) and the licences.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lxml import etree

NS = {"f": "http://hl7.org/fhir"}
F = "{http://hl7.org/fhir}"
DATA_DIR = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parents[2]
RESOURCE_PROFILES = ["Patient", "Practitioner", "Organization", "Location", "Encounter",
                     "Condition", "AllergyIntolerance", "Flag", "Procedure", "PractitionerRole",
                     "Medication", "MedicationRequest", "MedicationStatement", "Immunization",
                     "Observation", "List"]
# Profiles taken from careconnect/later-corrections (same canonical URL, a later version):
# Immunization-1 1.2.0 fixes notGiven to false, so a vaccine offered and refused could not be
# recorded at all; 1.4.0 lifts that.
LATER_CORRECTIONS = ["CareConnect-Immunization-1.v1.4.0.xml"]
CC = "https://fhir.hl7.org.uk/STU3/StructureDefinition/"
CORE_SD = "http://hl7.org/fhir/StructureDefinition/"

_PRIMITIVE_META = {
    "Id": "id", "Uri": "uri", "Code": "code", "Date": "date", "DateTime": "dateTime",
    "Instant": "instant", "Integer": "integer", "PositiveInt": "positiveInt",
    "UnsignedInt": "unsignedInt", "Decimal": "decimal", "Base64Binary": "base64Binary",
    "EncodedBytes": "base64Binary", "Markdown": "markdown", "Oid": "oid", "Time": "time",
    "String": "string", "Boolean": "boolean", "Xhtml": "xhtml", "Uuid": "uuid",
}
PRIMITIVES = sorted(set(_PRIMITIVE_META.values()))


def _v(el: Any, tag: str) -> str | None:
    x = el.find(F + tag)
    return None if x is None else x.get("value")


# --- base STU3 definitions ---------------------------------------------------------------------


def _schema_index(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name.replace("_", ""): d for name, d in schema["definitions"].items()}


def _unwrap(annotation: Any) -> tuple[str, bool]:
    """(type name, is list) of a fhir.resources field annotation."""
    is_list = False
    a = annotation
    while True:
        origin = typing.get_origin(a)
        if origin is typing.Union or type(a).__name__ == "UnionType":
            args = [x for x in typing.get_args(a) if x is not type(None)]
            if len(args) != 1:
                raise ValueError(f"unexpected union {annotation!r}")
            a = args[0]
        elif origin is list:
            is_list = True
            a = typing.get_args(a)[0]
        elif origin is typing.Annotated:
            meta = type(typing.get_args(a)[1]).__name__
            if meta not in _PRIMITIVE_META:
                raise ValueError(f"unknown primitive marker {meta} in {annotation!r}")
            return _PRIMITIVE_META[meta], is_list
        elif a is bool:
            return "boolean", is_list
        elif a is str:
            return "string", is_list
        else:
            name = getattr(a, "__name__", "")
            if not name.endswith("Type"):
                raise ValueError(f"unexpected annotation {annotation!r}")
            return name[: -len("Type")], is_list


class _BaseBuilder:
    def __init__(self, schema: dict[str, Any]) -> None:
        from fhir.resources.STU3 import get_fhir_model_class

        self.model = get_fhir_model_class
        self.schema = _schema_index(schema)
        self.resources = sorted(
            r["$ref"].rsplit("/", 1)[-1] for r in schema["definitions"]["ResourceList"]["oneOf"]
        )
        self.datatypes = sorted(
            n for n, d in schema["definitions"].items()
            if "_" not in n and n not in self.resources and n != "ResourceList"
            and "properties" in d
        )

    def elements(self, class_name: str) -> dict[str, Any]:
        cls = self.model(class_name)
        sdef = self.schema.get(class_name, {}).get("properties", {})
        out: dict[str, Any] = {}
        choices: dict[str, dict[str, Any]] = {}
        for fname, f in cls.model_fields.items():
            if fname in ("fhir_comments", "resource_type") or fname.endswith("__ext"):
                continue
            key = f.alias or fname
            tname, is_list = _unwrap(f.annotation)
            extra: dict[str, Any] = (dict(f.json_schema_extra)
                                     if isinstance(f.json_schema_extra, dict) else {})
            if not extra.get("element_property"):
                continue
            typ: dict[str, Any] = {"code": tname}
            el: dict[str, Any] = {"min": 0, "max": "*" if is_list else "1"}
            if extra.get("element_required") or f.is_required():
                el["min"] = 1
            if tname == "Reference" and extra.get("enum_reference_types"):
                typ["targets"] = sorted(extra["enum_reference_types"])
            if tname not in PRIMITIVES and tname not in self.datatypes and tname not in (
                "Resource",) and tname.startswith(class_name) and tname != class_name:
                typ["code"] = "BackboneElement"
                el["elements"] = self.elements(tname)
            prop = sdef.get(key, {})
            enum = prop.get("enum") or prop.get("items", {}).get("enum")
            if enum and tname == "code":
                el["codes"] = list(enum)
            group = extra.get("one_of_many")
            if group:
                c = choices.setdefault(group, {"min": 0, "max": "1", "types": []})
                if extra.get("one_of_many_required"):
                    c["min"] = 1
                c["types"].append(typ)
                continue
            el["types"] = [typ]
            out[key] = el
        for group, c in choices.items():
            out[group + "[x]"] = c
        return out

    def build(self) -> dict[str, Any]:
        types: dict[str, Any] = {p: {"kind": "primitive"} for p in PRIMITIVES}
        for name in self.datatypes:
            if name in PRIMITIVES:
                continue
            types[name] = {"kind": "complex", "elements": self.elements(name)}
        types["BackboneElement"] = {"kind": "complex",
                                    "elements": self.elements("BackboneElement")}
        for name in self.resources:
            types[name] = {"kind": "resource", "elements": self.elements(name)}
        return types


# --- StructureDefinitions ----------------------------------------------------------------------


def _json_value(el: Any, base: dict[str, Any], type_code: str) -> Any:
    """A fixed[x]/pattern[x] element as FHIR JSON (primitives, or complex types via base)."""
    if type_code in PRIMITIVES:
        raw = el.get("value")
        if type_code == "boolean":
            return raw == "true"
        if type_code in ("integer", "positiveInt", "unsignedInt"):
            return int(raw)
        if type_code == "decimal":
            return float(raw)
        return raw
    out: dict[str, Any] = {}
    elements = base[type_code]["elements"]
    for child in el:
        if not isinstance(child.tag, str):
            continue
        name = etree.QName(child).localname
        spec = elements[name]
        value = _json_value(child, base, spec["types"][0]["code"])
        if spec["max"] == "*":
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    return out


def _compact_element(el: Any, base: dict[str, Any]) -> dict[str, Any] | None:
    types = []
    for t in el.findall("f:type", NS):
        code = _v(t, "code")
        if code is None:  # the primitive's own value (typed by a json-type extension)
            return None
        entry: dict[str, Any] = {"code": code}
        profile = _v(t, "profile")
        if profile:
            entry["profile"] = profile
        target = _v(t, "targetProfile")
        if target:
            entry["targetProfile"] = target
        types.append(entry)
    out: dict[str, Any] = {"id": el.get("id"), "path": _v(el, "path"),
                           "min": int(_v(el, "min") or 0), "max": _v(el, "max") or "*"}
    slice_name = _v(el, "sliceName")
    if slice_name:
        out["sliceName"] = slice_name
    base_el = el.find("f:base", NS)
    if base_el is not None:
        out["baseMax"] = _v(base_el, "max")
    if types:
        out["types"] = types
    for child in el:
        if not isinstance(child.tag, str):
            continue
        tag = etree.QName(child).localname
        for kind in ("fixed", "pattern"):
            if tag.startswith(kind) and tag != kind:
                tcode = tag[len(kind):]
                tcode = tcode[0].lower() + tcode[1:] if tcode[:1].lower() + tcode[1:] in \
                    PRIMITIVES else tcode
                out[kind] = {"type": tcode, "value": _json_value(child, base, tcode)}
    binding = el.find("f:binding", NS)
    if binding is not None:
        ref = binding.find("f:valueSetReference/f:reference", NS)
        uri = binding.find("f:valueSetUri", NS)
        vs = (ref if ref is not None else uri)
        out["binding"] = {"strength": _v(binding, "strength"),
                          "valueSet": vs.get("value") if vs is not None else None}
    slicing = el.find("f:slicing", NS)
    if slicing is not None:
        out["slicing"] = {
            "discriminator": [[_v(d, "type"), _v(d, "path")]
                              for d in slicing.findall("f:discriminator", NS)],
            "rules": _v(slicing, "rules") or "open",
            "ordered": _v(slicing, "ordered") == "true",
        }
    cref = _v(el, "contentReference")
    if cref:
        out["contentReference"] = cref
    if _v(el, "mustSupport") == "true":
        out["mustSupport"] = True
    if _v(el, "isModifier") == "true":
        out["isModifier"] = True
    short = _v(el, "short")
    if short:
        out["short"] = short
    return out


def _read_sd(path: Path, base: dict[str, Any]) -> dict[str, Any]:
    root = etree.parse(str(path)).getroot()
    elements = [c for c in (_compact_element(e, base)
                            for e in root.findall("f:snapshot/f:element", NS)) if c]
    return {
        "url": _v(root, "url"), "name": _v(root, "name"), "version": _v(root, "version"),
        "type": _v(root, "type"), "kind": _v(root, "kind"),
        "baseDefinition": _v(root, "baseDefinition"), "elements": elements,
    }


# --- terminology -------------------------------------------------------------------------------


def _read_valueset(path: Path) -> dict[str, Any]:
    root = etree.parse(str(path)).getroot()

    def part(inc: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        system = _v(inc, "system")
        if system:
            out["system"] = system
        concepts = [_v(c, "code") for c in inc.findall("f:concept", NS)]
        if concepts:
            out["concept"] = concepts
        filters = [{"property": _v(x, "property"), "op": _v(x, "op"), "value": _v(x, "value")}
                   for x in inc.findall("f:filter", NS)]
        if filters:
            out["filter"] = filters
        value_sets = [x.get("value") for x in inc.findall("f:valueSet", NS)]
        if value_sets:
            out["valueSet"] = value_sets
        return out

    compose = root.find("f:compose", NS)
    return {
        "url": _v(root, "url"), "name": _v(root, "name"), "version": _v(root, "version"),
        "compose": {
            "include": [part(i) for i in compose.findall("f:include", NS)],
            "exclude": [part(i) for i in compose.findall("f:exclude", NS)],
        } if compose is not None else {"include": [], "exclude": []},
    }


def _read_codesystem(path: Path) -> dict[str, Any]:
    root = etree.parse(str(path)).getroot()
    codes = [_v(c, "code") for c in root.iter(F + "concept")]
    return {"url": _v(root, "url"), "name": _v(root, "name"), "version": _v(root, "version"),
            "content": _v(root, "content"), "concept": codes}


# --- driver ------------------------------------------------------------------------------------


def _index(folder: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.glob("*.xml")):
        root = etree.parse(str(path)).getroot()
        url = _v(root, "url")
        if url:
            out[url] = path
    return out


def _base_element(base: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The base definition of a snapshot path (slice names already stripped)."""
    parts = path.split(".")
    elements = base.get(parts[0], {}).get("elements")
    el = None
    for name in parts[1:]:
        if elements is None or name not in elements:
            return None
        el = elements[name]
        elements = el.get("elements")
        if elements is None:
            code = el.get("types", [{}])[0].get("code", "")
            elements = base.get(code, {}).get("elements")
    return el


def vendor(shared: Path, out_dir: Path) -> dict[str, Any]:
    cc = shared / "careconnect"
    schema = json.loads((shared / "fhir-stu3" / "fhir.schema.json").read_text())
    base = _BaseBuilder(schema).build()

    provenance: dict[str, tuple[str, str]] = {}
    with (cc / "PROVENANCE.tsv").open() as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if len(row) >= 3:
                provenance[row[0]] = (row[1], row[2])

    sd_index = _index(cc / "constraints")
    for name in LATER_CORRECTIONS:
        corrected = cc / "later-corrections" / name
        sd_index[_v(etree.parse(str(corrected)).getroot(), "url") or ""] = corrected
    vs_index = _index(cc / "valuesets")
    cs_index = _index(cc / "codesystems")
    used_files: list[str] = []

    sds: dict[str, Any] = {}
    todo = [CC + f"CareConnect-{t}-1" for t in RESOURCE_PROFILES]
    while todo:
        url = todo.pop(0)
        if url in sds:
            continue
        path = sd_index.get(url)
        if path is None:
            print(f"not available locally: {url}", file=sys.stderr)
            continue
        sd = _read_sd(path, base)
        sds[url] = sd
        used_files.append(f"{path.parent.name}/{path.name}")
        for el in sd["elements"]:
            for t in el.get("types", []):
                if t["code"] == "Extension" and t.get("profile"):
                    todo.append(t["profile"])

    # Which profile a targetProfile names: its resource type.
    profile_types: dict[str, str] = {}
    for sd in sds.values():
        for el in sd["elements"]:
            for t in el.get("types", []):
                target = t.get("targetProfile")
                if not target or target in profile_types:
                    continue
                if target in sd_index:
                    root = etree.parse(str(sd_index[target])).getroot()
                    profile_types[target] = _v(root, "type") or ""
                elif target.startswith(CORE_SD):
                    profile_types[target] = target[len(CORE_SD):]

    # ValueSets bound required/extensible, with their CodeSystems.
    valuesets: dict[str, Any] = {}
    codesystems: dict[str, Any] = {}
    wanted: dict[str, list[dict[str, Any]]] = {}
    for sd in sds.values():
        for el in sd["elements"]:
            b = el.get("binding")
            if b and b["valueSet"] and b["strength"] in ("required", "extensible"):
                wanted.setdefault(b["valueSet"], []).append(el)
    pending = list(wanted)
    while pending:
        url = pending.pop(0)
        if url in valuesets:
            continue
        if url in vs_index:
            vs = _read_valueset(vs_index[url])
            valuesets[url] = vs
            used_files.append(f"valuesets/{vs_index[url].name}")
            for part in vs["compose"]["include"] + vs["compose"]["exclude"]:
                system = part.get("system")
                if system and system in cs_index and system not in codesystems:
                    codesystems[system] = _read_codesystem(cs_index[system])
                    used_files.append(f"codesystems/{cs_index[system].name}")
                pending += part.get("valueSet", [])
            continue
        # A FHIR core ValueSet on code elements: the STU3 schema's enumeration of the codes.
        codes: list[str] | None = None
        for el in wanted.get(url, []):
            if not any(t["code"] == "code" for t in el.get("types", [])):
                codes = None
                break
            el_path = ".".join(p.split(":")[0] for p in el["id"].split("."))
            base_el = _base_element(base, el_path)
            found = base_el.get("codes") if base_el else None
            if found is None or (codes is not None and codes != found):
                codes = None
                break
            codes = found
        if codes:
            valuesets[url] = {"url": url, "name": url.rsplit("/", 1)[-1], "version": "3.0.1",
                              "source": "FHIR STU3 JSON schema enumeration",
                              "compose": {"include": [{"concept": codes}], "exclude": []}}

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "structuredefinitions.json": {"profileTypes": profile_types, "structureDefinitions": sds},
        "terminology.json": {"valueSets": valuesets, "codeSystems": codesystems},
        "base-stu3.json": {"fhirVersion": "3.0.1", "types": base},
    }
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, separators=(",", ":"), sort_keys=True)
                                    + "\n", encoding="utf-8")
    (out_dir / "NOTICE.md").write_text(_notice(sorted(used_files), provenance, shared),
                                       encoding="utf-8")
    return {"structureDefinitions": len(sds), "valueSets": len(valuesets),
            "codeSystems": len(codesystems), "baseTypes": len(base)}


def _notice(files: Iterable[str], provenance: dict[str, tuple[str, str]], shared: Path) -> str:
    fhir_prov = (shared / "fhir-stu3" / "PROVENANCE.txt").read_text().strip()
    lines = [
        "# Vendored Care Connect conformance resources",
        "",
        "Generated by `python -m gateway.profiles.vendor` from the project's `shared/` reference",
        "material; do not edit by hand. The XML originals were converted to a compact JSON form",
        "(snapshot elements, ValueSet compose, CodeSystem codes) so they load in milliseconds.",
        "",
        "## Care Connect (HL7 UK)",
        "",
        "Source: the GitHub repository nhsconnect/CareConnect-profiles-STU3 (HL7 UK Care Connect",
        "STU3 profiles), as copied into `shared/careconnect/` with `PROVENANCE.tsv`.",
        "",
        "Copyright © 2016+ HL7 UK. Licensed under the Apache License, Version 2.0",
        "(http://www.apache.org/licenses/LICENSE-2.0). HL7® FHIR® standard Copyright © 2011+ HL7,",
        "used under the FHIR license (https://www.hl7.org/fhir/license.html). HL7 and FHIR are",
        "registered trademarks of Health Level Seven International.",
        "",
        "| file (in shared/careconnect) | branch | commit |",
        "|---|---|---|",
    ]
    for f in files:
        branch, commit = provenance.get(f, ("?", "?"))
        lines.append(f"| {f} | {branch} | {commit} |")
    lines += [
        "",
        "## FHIR STU3 base definitions (`base-stu3.json`, core enumerations in `terminology.json`)",
        "",
        "Element structure (names, types, cardinality, choice groups, reference targets) of the",
        "FHIR STU3 (3.0.x) base types and resources, read from the fhir.resources STU3 models",
        "(BSD-3-Clause; generated from the HL7 FHIR STU3 StructureDefinitions); code",
        "enumerations of required bindings from the official FHIR STU3 JSON schema",
        f"(`shared/fhir-stu3/fhir.schema.json`: {fhir_prov}). HL7 FHIR specification content is",
        "CC0 (public domain).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--out", type=Path, default=DATA_DIR)
    args = p.parse_args(argv)
    counts = vendor(args.shared, args.out)
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
