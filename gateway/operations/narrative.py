"""Human-readable text for FHIR documents: STU3 narrative (XHTML) and an HTML page.

Built as elements with lxml (never as text), so every value is escaped by the serialiser.
The narrative uses only elements the STU3 narrative rules allow (txt-1: basic HTML, no
script, forms, event handlers or external references) in the XHTML namespace; the page
wraps the same narratives in a plain HTML document with inline style only.
"""

from __future__ import annotations

from typing import Any

from lxml import etree

XHTML = "http://www.w3.org/1999/xhtml"
_E = f"{{{XHTML}}}"


def _el(tag: str, parent: Any = None, text: str | None = None, **attrs: str) -> Any:
    node = (etree.SubElement(parent, _E + tag, nsmap=None) if parent is not None
            else etree.Element(_E + tag, nsmap={None: XHTML}))
    for k, v in attrs.items():
        node.set(k.rstrip("_"), v)
    if text is not None:
        node.text = text
    return node


def text_of(value: Any) -> str:
    """A FHIR element as a person reads it (CodeableConcept, Coding, Reference, Period,
    Quantity, Dosage, primitives); '' when it has nothing to show."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(t for t in (text_of(v) for v in value) if t)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (str, int, float)):
        return str(value)
    if not isinstance(value, dict):
        return ""
    if "text" in value and isinstance(value["text"], str):
        return value["text"]
    if "coding" in value:
        return text_of(value["coding"][:1]) if value["coding"] else ""
    if "display" in value or "code" in value:
        return str(value.get("display") or value.get("code") or "")
    if "reference" in value:
        return str(value.get("display") or value["reference"])
    if "start" in value or "end" in value:
        start, end = value.get("start", ""), value.get("end", "")
        return f"{start} to {end}" if start and end else start or f"until {end}"
    if "value" in value:
        unit = value.get("unit") or value.get("code") or ""
        return f"{value['value']} {unit}".strip()
    if "name" in value and isinstance(value["name"], list):  # a HumanName list's first
        return text_of(value["name"][0])
    if "family" in value or "given" in value:
        given = " ".join(value.get("given") or [])
        return f"{given} {value.get('family', '')}".strip()
    return ""


def element(resource: dict[str, Any], path: str) -> Any:
    """The value at a dotted element path (``code``, ``dosage.text``, ``onset``: a choice
    element's name matches any of its types: ``onsetDateTime``, ``onsetPeriod``, ...)."""
    node: Any = resource
    for part in path.split("."):
        if isinstance(node, list):
            node = [element(n, part) for n in node if isinstance(n, dict)]
            node = [n for n in node if n not in (None, "", [])]
            continue
        if not isinstance(node, dict):
            return None
        if part in node:
            node = node[part]
            continue
        choice = [k for k in node if k.startswith(part) and k[len(part):][:1].isupper()]
        node = node[choice[0]] if choice else None
    return node


def table(columns: list[tuple[str, str]], resources: list[dict[str, Any]]) -> Any:
    """A section's narrative div: one row per resource, one column per declared element."""
    div = _el("div")
    tbl = _el("table", div)
    head = _el("tr", _el("thead", tbl))
    for header, _ in columns:
        _el("th", head, header)
    body = _el("tbody", tbl)
    for res in resources:
        row = _el("tr", body)
        for _, path in columns:
            _el("td", row, text_of(element(res, path)))
    return div


def paragraph(text: str) -> Any:
    div = _el("div")
    _el("p", div, text)
    return div


def summary(title: str, facts: list[tuple[str, str]], sections: list[str]) -> Any:
    """The Composition's own narrative: what the document is, about whom, and its sections."""
    div = _el("div")
    _el("h1", div, title)
    dl = _el("table", div)
    for label, value in facts:
        row = _el("tr", dl)
        _el("th", row, label)
        _el("td", row, value)
    if sections:
        _el("p", div, "Sections:")
        ul = _el("ul", div)
        for s in sections:
            _el("li", ul, s)
    return div


def to_xhtml(div: Any) -> str:
    out: str = etree.tostring(div, encoding="unicode")
    return out


_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:60em;color:#111}"
          "table{border-collapse:collapse;margin:.5em 0}"
          "th,td{border:1px solid #999;padding:.25em .5em;text-align:left;vertical-align:top}"
          "h2{border-bottom:1px solid #333;margin-top:1.5em}")


def page(title: str, composition: dict[str, Any]) -> bytes:
    """An HTML page of a document: the Composition's narrative, then each section's."""
    html = etree.Element("html", lang="en")
    head = etree.SubElement(html, "head")
    etree.SubElement(head, "meta", charset="utf-8")
    etree.SubElement(head, "title").text = title
    etree.SubElement(head, "style").text = _STYLE
    body = etree.SubElement(html, "body")
    article = etree.SubElement(body, "article")
    article.append(_plain(etree.fromstring(composition["text"]["div"])))
    for sec in composition.get("section") or ():
        part = etree.SubElement(article, "section")
        etree.SubElement(part, "h2").text = sec.get("title", "")
        if "text" in sec:
            part.append(_plain(etree.fromstring(sec["text"]["div"])))
    out: bytes = etree.tostring(html, method="html", encoding="utf-8", doctype="<!DOCTYPE html>")
    return out


def _plain(node: Any) -> Any:
    """The XHTML narrative without its namespace (for an HTML serialisation)."""
    for el in node.iter():
        if isinstance(el.tag, str) and el.tag.startswith(_E):
            el.tag = el.tag[len(_E):]
    etree.cleanup_namespaces(node)
    return node


# The STU3 narrative rules (txt-1, txt-2), as the tests and the validator check them.
ALLOWED = frozenset({
    "a", "abbr", "acronym", "b", "big", "blockquote", "br", "caption", "cite", "code", "col",
    "colgroup", "dd", "dfn", "div", "dl", "dt", "em", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "i", "img", "li", "ol", "p", "pre", "q", "samp", "small", "span", "strong", "sub",
    "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "ul", "var"})


def narrative_problems(div_text: str) -> list[str]:
    """What breaks the STU3 narrative rules in a ``div`` (empty: nothing)."""
    try:
        root = etree.fromstring(div_text.encode("utf-8"))
    except etree.XMLSyntaxError as exc:
        return [f"not well-formed XHTML: {exc}"]
    problems = []
    if root.tag != _E + "div":
        problems.append("the root is not an XHTML div")
    for el in root.iter():
        if not isinstance(el.tag, str):
            problems.append("comments and processing instructions are not allowed")
            continue
        if not el.tag.startswith(_E) or el.tag[len(_E):] not in ALLOWED:
            problems.append(f"element not allowed: {el.tag}")
        for attr in el.attrib:
            if attr.lower().startswith("on") or (attr == "src" and el.tag != _E + "img"):
                problems.append(f"attribute not allowed: {attr}")
    if not "".join(root.itertext()).strip():
        problems.append("the narrative has no text")
    return problems
