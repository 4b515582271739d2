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
from gateway.mapping.model import EXPR_KEYS
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


@dataclass
class Coverage:
    file: str
    resource_type: str
    profile: str
    rows: list[Row] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    """Output keys the profile has no element for (the validator would reject them)."""

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


class _Walk:
    def __init__(self, profiles: Profiles, codemaps: dict[str, CodeMap]) -> None:
        self.profiles = profiles
        self.codemaps = codemaps
        self.hits: set[str] = set()
        self.unknown: list[str] = []

    def complex(self, node: dict[str, Any], cx: Complex, path: str) -> None:
        for key, value in node.items():
            if key == "each":
                continue
            prop = cx.props.get(key)
            if prop is None:
                self.unknown.append(f"{path}.{key}")
                continue
            self.hits.add(prop.element.id)
            for item in value if isinstance(value, list) else [value]:
                self.item(item, prop, f"{path}.{key}")

    def item(self, item: Any, prop: Prop, path: str) -> None:
        targets = [prop]
        if isinstance(item, dict) and not _is_expr(item):
            slicing = prop.element.slicing
            if slicing is not None:
                for s in slicing.slices:
                    if s.values is not None and all(self._can_be(item.get(p), v)
                                                    for p, v in s.values):
                        self.hits.add(s.element.id)
                        targets.append(s.prop)
            elif prop.type == "Extension":
                known = self.profiles.extension(item.get("url"))
                if known is not None:
                    targets.append(known)
            for target in targets:
                if target.complex is not None:
                    self.complex(item, target.complex, path)
        elif _is_expr(item) and prop.complex is not None:
            part = item.get("part")
            if part in ("coding", "codeable-concept"):
                coding = prop.complex.props.get("coding") if part == "codeable-concept" else None
                if coding is not None:
                    self.hits.add(coding.element.id)
                inner = coding.complex if coding is not None else prop.complex
                if inner is not None:
                    for name in ("system", "code", "display"):
                        self._mark(inner, name)

    def _mark(self, cx: Complex, key: str) -> None:
        p = cx.props.get(key)
        if p is not None:
            self.hits.add(p.element.id)

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
    out = Coverage(mapping.file.name, mapping.resource_type, url)
    if url not in p:
        out.unknown.append(f"(profile {url} is not available locally)")
        return out
    walk = _Walk(p, mapping.codemaps)
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
                            filled, el.get("short", ""), depth))
    return out


# -- output -------------------------------------------------------------------------------------


def print_table(results: list[Coverage]) -> None:
    from rich.console import Console
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
        table.add_column("description", overflow="fold")
        for r in cov.rows:
            table.add_row("  " * (r.depth - 1) + r.id, r.card, "MS" if r.must_support else "",
                          "[green]yes[/green]" if r.filled else "[dim]no[/dim]",
                          r.short, end_section=False)
        console.print(table)
        for u in cov.unknown:
            console.print(f"[red]not in the profile:[/red] {u}", markup=True, highlight=False)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-bottom:2em;width:100%}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eee}tr.yes td.f{background:#d8f0d8}tr.no td.f{background:#f6e0e0}
td.e{font-family:monospace;white-space:nowrap}.unknown{color:#a00}
"""


def render_html(results: list[Coverage]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Care Connect mapping coverage</title>", f"<style>{_CSS}</style>",
             "</head><body>", "<h1>Care Connect mapping coverage</h1>"]
    for cov in results:
        filled, total = cov.top_level
        ms_filled, ms_total = cov.must_support
        parts.append(f"<h2>{e(cov.file)}: {e(cov.resource_type)}</h2>")
        parts.append(f"<p>Profile <code>{e(cov.profile)}</code>. Top-level elements filled: "
                     f"{filled} of {total}; mustSupport filled: {ms_filled} of {ms_total}"
                     + (" (the profile flags none)" if ms_total == 0 else "") + ".</p>")
        parts.append("<table><thead><tr><th>element</th><th>card.</th><th>MS</th>"
                     "<th>filled</th><th>description</th></tr></thead><tbody>")
        for r in cov.rows:
            cls = "yes" if r.filled else "no"
            pad = "&nbsp;" * 2 * (r.depth - 1)
            parts.append(f'<tr class="{cls}"><td class="e">{pad}{e(r.id)}</td>'
                         f"<td>{e(r.card)}</td><td>{'MS' if r.must_support else ''}</td>"
                         f'<td class="f">{cls}</td><td>{e(r.short)}</td></tr>')
        parts.append("</tbody></table>")
        for u in cov.unknown:
            parts.append(f'<p class="unknown">not in the profile: {e(u)}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def coverage_cli(loaded: LoadedSet, html_file: Path | None) -> int:
    """``mappings coverage``: the table on the terminal, and the HTML page if asked."""
    results = [coverage(m) for m in loaded.mappings]
    print_table(results)
    if html_file is not None:
        html_file.write_text(render_html(results), encoding="utf-8")
        print(f"wrote {html_file}")
    return 0
