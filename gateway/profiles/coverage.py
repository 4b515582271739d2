"""Which elements of its profile a mapping fills, derived from the mapping's ``output`` tree.

The output tree is walked with the same compiled profile the validator uses, so a key lands on
the element (or slice) a resource built from it would be checked against: ``deceasedDateTime``
on ``Patient.deceased[x]``, an identifier whose literal ``system`` is the NHS number system on
``Patient.identifier:nhsNumber``, an extension on the slice for its url. A discriminator read
through a code map counts for every slice the code map can produce.

Rows: every top-level element and slice of the profile, and the children of filled elements
(``id``/``extension`` noise left out unless filled or sliced); elements the profile prohibits
(max 0) are not listed. Output as a rich table or as a standalone HTML page.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.mapping.codemaps import CodeMap
from gateway.mapping.loader import CompiledMapping, LoadedSet
from gateway.mapping.model import EXPR_KEYS, with_where
from gateway.profiles.structure import Complex, Prop
from gateway.profiles.validator import Profiles, load_profiles

_NOISE = ("id", "extension", "modifierExtension")


@dataclass
class Row:
    id: str
    card: str
    must_support: bool
    filled: bool
    short: str
    depth: int
    sources: list[str] = field(default_factory=list)
    """Where the value comes from: ``PATIENTS.SURNAME (p.SURNAME) | title_case``, ``PID-5.1``,
    ``codemap sex (unmapped: error)``, ``each: addresses``, or a fixed value."""

    @property
    def required(self) -> bool:
        return not self.card.startswith("0..")


@dataclass
class Coverage:
    file: str
    resource_type: str
    profile: str
    rows: list[Row] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    """Output keys the profile has no element for (the validator would reject them)."""
    anchor: str = ""
    """The mapping's section in the HTML page: its type, and for one of several sources of a
    type its id prefix too (``Encounter.op``), as the golden files and cases are named."""

    @property
    def key(self) -> str:
        return self.anchor or self.resource_type

    @property
    def top_level(self) -> tuple[int, int]:
        top = [r for r in self.rows if r.depth == 1]
        return sum(r.filled for r in top), len(top)

    @property
    def must_support(self) -> tuple[int, int]:
        ms = [r for r in self.rows if r.must_support]
        return sum(r.filled for r in ms), len(ms)


def _is_expr(node: Any) -> bool:
    return isinstance(node, dict) and bool(EXPR_KEYS & node.keys())


def _tables(source: Any) -> dict[str, str]:
    """alias → table, from a SQL source block and its joins and children."""
    out: dict[str, str] = {}
    if isinstance(source, dict):
        if isinstance(source.get("alias"), str) and isinstance(source.get("table"), str):
            out[source["alias"]] = source["table"]
        for value in source.values():
            for item in value.values() if isinstance(value, dict) else \
                    value if isinstance(value, list) else []:
                out.update(_tables(item))
    return out


class _Walk:
    def __init__(self, profiles: Profiles, codemaps: dict[str, CodeMap],
                 tables: dict[str, str] | None = None) -> None:
        self.profiles = profiles
        self.codemaps = codemaps
        self.tables = tables or {}
        self.hits: set[str] = set()
        self.sources: dict[str, list[str]] = {}
        self.inside: dict[str, list[str]] = {}
        """Expressions anywhere inside an element's items: for rows with no child rows."""
        self.unknown: list[str] = []

    def note(self, element_id: str, text: str) -> None:
        found = self.sources.setdefault(element_id, [])
        if text not in found:
            found.append(text)

    def describe(self, expr: dict[str, Any], each: str | None) -> str:
        """One expression as an engineer looks for it in the PAS."""
        if isinstance(expr.get("sources"), list):  # a reference, from the first with a value
            parts = [self.describe({"column": s.get("column"), "ref": expr.get("ref"),
                                    "id_prefix": s.get("id_prefix")}, None)
                     for s in expr["sources"] if isinstance(s, dict)]
            return " or ".join(parts) + (f" | each: {each}" if each else "")
        if "column" in expr:
            ref = str(expr["column"])
            alias, _, column = ref.partition(".")
            table = self.tables.get(alias)
            text = f"{table}.{column} ({ref})" if table and column else ref
        elif "field" in expr:
            text = f"HL7 {with_where(str(expr['field']), expr.get('where') or {})}"
        else:
            text = f"function {expr.get('function')}"
        transform = expr.get("transform")
        if transform:
            text += " | " + ", ".join(transform if isinstance(transform, list) else [transform])
        name = expr.get("codemap")
        if name:
            cm = self.codemaps.get(name)
            policy = f"unmapped: {cm.unmapped}" if cm is not None else "not loaded"
            text += f" | codemap {name} ({policy})"
        if expr.get("ref"):
            text += f" → {expr['ref']}/{expr.get('id_prefix') or ''}id"
        if each:
            text += f" | each: {each}"
        return text

    def nested(self, node: Any, each: str | None) -> list[str]:
        """Descriptions of every expression inside ``node``."""
        if _is_expr(node):
            return [self.describe(node, each)]
        out: list[str] = []
        if isinstance(node, dict):
            inner = node.get("each") if isinstance(node.get("each"), str) else each
            for key, value in node.items():
                if key != "each":
                    out += self.nested(value, inner)
        elif isinstance(node, list):
            for value in node:
                out += self.nested(value, each)
        return list(dict.fromkeys(out))

    def complex(self, node: dict[str, Any], cx: Complex, path: str,
                each: str | None = None) -> None:
        each = node.get("each", each) if isinstance(node.get("each"), str) else each
        for key, value in node.items():
            if key == "each":
                continue
            prop = cx.props.get(key)
            if prop is None:
                self.unknown.append(f"{path}.{key}")
                continue
            self.hits.add(prop.element.id)
            for item in value if isinstance(value, list) else [value]:
                self.item(item, prop, f"{path}.{key}", each)

    def item(self, item: Any, prop: Prop, path: str, each: str | None = None) -> None:
        targets = [prop]
        if _is_expr(item):
            self.note(prop.element.id, self.describe(item, each))
        elif not isinstance(item, dict | list):
            self.note(prop.element.id, f"fixed: {item!r}")
        elif isinstance(item, dict) and isinstance(item.get("each"), str):
            self.note(prop.element.id, f"each: {item['each']} (one per row)")
        if isinstance(item, dict) and not _is_expr(item):
            for text in self.nested(item, each):
                found = self.inside.setdefault(prop.element.id, [])
                if text not in found:
                    found.append(text)
            slicing = prop.element.slicing
            if slicing is not None:
                for s in slicing.slices:
                    if s.values is not None and all(self._can_be(item.get(p), v)
                                                    for p, v in s.values):
                        self.hits.add(s.element.id)
                        # a slice row says what fills it (an extension's value, a number)
                        for text in self.nested(item, each):
                            self.note(s.element.id, text)
                        targets.append(s.prop)
            elif prop.type == "Extension":
                known = self.profiles.extension(item.get("url"))
                if known is not None:
                    targets.append(known)
            for target in targets:
                if target.complex is not None:
                    self.complex(item, target.complex, path, each)
        elif _is_expr(item) and prop.complex is not None:
            part = item.get("part")
            if part in ("coding", "codeable-concept"):
                coding = prop.complex.props.get("coding") if part == "codeable-concept" else None
                if coding is not None:
                    self.hits.add(coding.element.id)
                    self.note(coding.element.id, self.describe(item, each))
                inner = coding.complex if coding is not None else prop.complex
                if inner is not None:
                    for name in ("system", "code", "display"):
                        self._mark(inner, name, f"from the code map {item.get('codemap')}")

    def _mark(self, cx: Complex, key: str, source: str) -> None:
        p = cx.props.get(key)
        if p is not None:
            self.hits.add(p.element.id)
            self.note(p.element.id, source)

    def _can_be(self, node: Any, value: Any) -> bool:
        if node == value:
            return True
        if _is_expr(node) and node.get("codemap") in self.codemaps:
            cm = self.codemaps[node["codemap"]]
            codes = {t.code for t in cm.entries.values()}
            if cm.default is not None:
                codes.add(cm.default.code)
            return value in codes
        return False


def coverage(mapping: CompiledMapping, profiles: Profiles | None = None) -> Coverage:
    p = profiles or load_profiles()
    url = mapping.spec.profile
    from gateway.profiles.golden import golden_name

    out = Coverage(mapping.file.name, mapping.resource_type, url, anchor=golden_name(mapping))
    if url not in p:
        out.unknown.append(f"(profile {url} is not available locally)")
        return out
    walk = _Walk(p, mapping.codemaps, _tables(mapping.spec.source))
    walk.complex(mapping.spec.output, p.root(url), mapping.resource_type)
    out.unknown = walk.unknown
    info = p.info.get(url)
    if info is None:  # a core STU3 resource (no Care Connect profile): no snapshot to list
        return out
    prohibited: list[str] = []
    root = info.elements[0]["id"]
    # id and meta (profile, lastUpdated) are filled by the gateway itself, not the mapping.
    filled_ids = walk.hits | {root, f"{root}.id", f"{root}.meta"}
    if mapping.spec.last_updated is not None:
        filled_ids.add(f"{root}.meta.lastUpdated")
    filled_ids.add(f"{root}.meta.profile")
    for el in info.elements[1:]:
        eid: str = el["id"]
        if any(eid.startswith(x + ".") or eid.startswith(x + ":") for x in prohibited):
            continue
        if el["max"] == "0":
            prohibited.append(eid)
            continue
        parent, _, last = eid.rpartition(".")
        depth = eid.count(".")
        name = last.split(":")[0]
        filled = eid in filled_ids
        is_slice = ":" in last and "sliceName" in el
        if depth > 1 and parent not in filled_ids:
            continue
        if name in _NOISE and not filled and not is_slice:
            continue
        out.rows.append(Row(eid, f"{el['min']}..{el['max']}", bool(el.get("mustSupport")),
                            filled, el.get("short", ""), depth, walk.sources.get(eid, [])))
    filled_rows = [r.id for r in out.rows if r.filled]
    for row in out.rows:
        if row.filled and not row.sources and not any(
                o.startswith((row.id + ".", row.id + ":")) for o in filled_rows):
            # no row below says where its parts come from (a Period, a Reference): say it here
            row.sources = list(walk.inside.get(row.id, []))
    for eid, note in ((f"{root}.id", _source_of_id(mapping)),
                      (f"{root}.meta", "the gateway: profile, and lastUpdated below"),
                      (f"{root}.meta.lastUpdated", _source_of(mapping.spec.last_updated, walk)),
                      (f"{root}.meta.profile", "the gateway: the mapping's profile")):
        for row in out.rows:
            if row.id == eid and note and not row.sources:
                row.sources.append(note)
    return out


def _source_of(expr: Any, walk: _Walk) -> str | None:
    if expr is None:
        return None
    data = expr.model_dump(exclude_none=True) if hasattr(expr, "model_dump") else expr
    return walk.describe(data, None) if isinstance(data, dict) and _is_expr(data) else None


def _source_of_id(mapping: CompiledMapping) -> str:
    ref = mapping.spec.id.source_ref or "?"
    alias, _, column = ref.partition(".")
    table = _tables(mapping.spec.source).get(alias)
    return f"{table}.{column} ({ref})" if table and column else ref


# -- output -------------------------------------------------------------------------------------


def print_table(results: list[Coverage]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for cov in results:
        filled, total = cov.top_level
        ms_filled, ms_total = cov.must_support
        table = Table(title=f"{cov.file}: {cov.resource_type} → {cov.profile}",
                      caption=f"top-level elements filled: {filled} of {total}; mustSupport "
                      f"filled: {ms_filled} of {ms_total}"
                      + (" (the profile flags none)" if ms_total == 0 else ""))
        table.add_column("element")
        table.add_column("card.")
        table.add_column("MS")
        table.add_column("filled")
        table.add_column("comes from", overflow="fold")
        table.add_column("description", overflow="fold")
        for r in cov.rows:
            filled_text = ("[green]yes[/green]" if r.filled else
                           "[red]NO (required)[/red]" if r.required else "[dim]no[/dim]")
            table.add_row("  " * (r.depth - 1) + r.id, r.card, "MS" if r.must_support else "",
                          filled_text, escape("\n".join(r.sources)), r.short,
                          end_section=False)
        console.print(table)
        for u in cov.unknown:
            console.print(f"[red]not in the profile:[/red] {u}", markup=True, highlight=False)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:90em}
table{border-collapse:collapse;margin-bottom:1.5em;width:100%}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eee}tr.yes td.f{background:#d8f0d8}tr.no td.f{background:#f6e0e0}
td.e{font-family:monospace;white-space:nowrap}td.src div{font-family:monospace;font-size:90%}
table.required-unmapped tr td.f{background:#f4b4b4;font-weight:bold}
section.resource{border-top:3px solid #888;margin-top:2em}
details{margin-bottom:1.5em}summary{cursor:pointer;font-weight:bold}
.unknown{color:#a00}.none{color:#060}
"""


def _row_html(r: Row, section: str = "") -> str:
    e = html.escape
    cls = "yes" if r.filled else "no"
    pad = "&nbsp;" * 2 * (r.depth - 1)
    src = "".join(f"<div>{e(x)}</div>" for x in r.sources)
    # element ids are unique in the page: a second source of a type prefixes its section
    row_id = f"{section}:{r.id}" if section else r.id
    return (f'<tr class="{cls}" id="{e(row_id)}"><td class="e">{pad}{e(r.id)}</td>'
            f"<td>{e(r.card)}</td><td>{'MS' if r.must_support else ''}</td>"
            f'<td class="f">{cls}</td><td class="src">{src}</td><td>{e(r.short)}</td></tr>')


def _table(rows: list[Row], cls: str, section: str = "") -> str:
    head = ("<thead><tr><th>element</th><th>card.</th><th>MS</th><th>filled</th>"
            "<th>comes from</th><th>description</th></tr></thead>")
    return (f'<table class="{cls}">{head}<tbody>' + "".join(_row_html(r, section) for r in rows)
            + "</tbody></table>")


def _parts(cov: Coverage) -> tuple[list[Row], list[Row], list[Row]]:
    """(required and not mapped, mapped, optional and not mapped), each in profile order."""
    missing = [r for r in cov.rows if r.required and not r.filled]
    mapped = [r for r in cov.rows if r.filled]
    optional = [r for r in cov.rows if not r.required and not r.filled]
    return missing, mapped, optional


def render_html(results: list[Coverage]) -> str:
    """A standalone page: a summary per profile linking to a section per resource; in each,
    required-and-unmapped first, then what is mapped and where from, then the optional
    elements not mapped, folded (``<details>``: no script)."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Care Connect mapping coverage</title>", f"<style>{_CSS}</style>",
             "</head><body>", "<h1>Care Connect mapping coverage</h1>",
             '<table class="summary" id="summary"><thead><tr><th>resource</th>'
             "<th>mapping</th><th>profile</th><th>top-level filled</th>"
             "<th>mustSupport filled</th><th>required, not mapped</th></tr></thead><tbody>"]
    for cov in results:
        filled, total = cov.top_level
        ms_filled, ms_total = cov.must_support
        missing, _, _ = _parts(cov)
        anchor = e(cov.key)
        parts.append(f'<tr><td><a href="#{anchor}">{anchor}</a></td><td>{e(cov.file)}</td>'
                     f"<td><code>{e(cov.profile)}</code></td><td>{filled} of {total}</td>"
                     f"<td>{ms_filled} of {ms_total}</td>"
                     f'<td class="{"bad" if missing else "good"}">{len(missing)}</td></tr>')
    parts.append("</tbody></table>")
    for cov in results:
        filled, total = cov.top_level
        ms_filled, ms_total = cov.must_support
        missing, mapped, optional = _parts(cov)
        anchor = e(cov.key)
        section = "" if cov.key == cov.resource_type else cov.key
        parts.append(f'<section class="resource" id="{anchor}">')
        parts.append(f'<h2><a href="#{anchor}">{anchor}</a>: {e(cov.file)}</h2>')
        parts.append(f"<p>Profile <code>{e(cov.profile)}</code>. Top-level elements filled: "
                     f"{filled} of {total}; mustSupport filled: {ms_filled} of {ms_total}"
                     + (" (the profile flags none)" if ms_total == 0 else "")
                     + '. <a href="#summary">Back to the summary</a>.</p>')
        parts.append(f"<h3>Required by the profile, not mapped ({len(missing)})</h3>")
        parts.append(_table(missing, "required-unmapped", section) if missing else
                     '<p class="none">None: every required element is mapped.</p>')
        parts.append(f"<h3>Mapped ({len(mapped)})</h3>")
        parts.append(_table(mapped, "mapped", section))
        parts.append(f'<details class="optional-unmapped"><summary>{len(optional)} optional '
                     "element(s) not mapped</summary>")
        parts.append(_table(optional, "optional-unmapped", section) + "</details>")
        for u in cov.unknown:
            parts.append(f'<p class="unknown">not in the profile: {e(u)}</p>')
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def coverage_cli(loaded: LoadedSet, html_file: Path | None) -> int:
    """``mappings coverage``: the table on the terminal, and the HTML page if asked."""
    results = [coverage(m) for m in loaded.mappings]
    print_table(results)
    if html_file is not None:
        try:
            html_file.write_text(render_html(results), encoding="utf-8")
        except OSError as exc:
            import sys

            print(f"cannot write the HTML report to {html_file}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        print(f"wrote {html_file}")
    return 0
