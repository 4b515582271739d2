"""BASELINE for bench/http_bench.py: a minimal hand-written Starlette app over the demo PAS.

It serves exactly what the benchmark asks of the gateway, and nothing more:

* ``GET /STU3/Patient/{id}``                           — read (with the same ETag/Last-Modified)
* ``GET /STU3/Patient?family=..&gender=..&_count=..``  — search, first page (``_page`` also works)
* ``GET /STU3/Patient?gender=..&birthdate=geYYYY[-MM[-DD]]&_count=..``

Database access is **plain sqlite3** from the standard library (no SQLAlchemy), on the same
database file, issuing the *same SQL text* the gateway's SQL adapter issues for these
requests: one SELECT on PATIENTS (keyset order by PATNT_REFNO, ``LIMIT count+1``), then one
``IN (...)`` query per child table (PATIENT_IDS, ADDRESSES, current GP_REGISTRATIONS). The
``family`` search uses the same predicate: SQLite's own ``LIKE`` for an ASCII value on ASCII
rows, and the same ``ccg_fold()`` SQL function (a Python function registered on each
connection, lower case without accents) for the others, because the gateway does; anything
cheaper would not be the same query. Connections get the gateway's settings too (a memory
map of the file, ``PRAGMA mmap_size``), so the database does the same work on both sides.

The Patient resource is built by hand-written code (no mapping engine, no pydantic) that
follows mappings/demo-pas/Patient.sql.yaml; the code maps are read from the same
mappings/codemaps/*.yaml data files. JSON is rendered with orjson. Bundles have the same
shape (self and next links; the next link carries an HMAC-signed position).

``--db-mode thread`` (default) runs each request's queries in a worker thread, like the
gateway (the event loop never blocks on the database); ``--db-mode inline`` runs them on the
event loop (the cheapest possible thing with SQLite, not a design for a networked PAS).

    python bench/baseline_app.py --db bench/.data/demo-pas-10000.sqlite --port 8091
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import pathlib
import re
import sqlite3
import threading
import unicodedata
import uuid
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import orjson
import yaml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

REPO = pathlib.Path(__file__).resolve().parent.parent
CODEMAPS = REPO / "mappings" / "codemaps"
TZ = ZoneInfo("Europe/London")
MEDIA = "application/fhir+json; charset=utf-8"
PROFILE = "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Patient-1"
EXT = "https://fhir.hl7.org.uk/STU3/StructureDefinition/"
SECRET = b"baseline-paging-secret"

# --- code maps (data files shared with the gateway) ------------------------------------------


class CodeMap:
    def __init__(self, name: str) -> None:
        doc = yaml.safe_load((CODEMAPS / f"{name}.yaml").read_text())
        self.system: str = doc.get("target_system")
        self.unmapped: str = doc.get("unmapped", "omit")
        self.codes: dict[str, tuple[str, str | None]] = {
            str(k): (v["code"], v.get("display")) for k, v in doc["map"].items()
            if v is not None  # CODE: null: listed on purpose with no target
        }
        default = doc.get("default")
        self.default = (default["code"], default.get("display")) if default else None
        self.reverse: dict[str, list[str]] = {}
        for local, (code, _) in self.codes.items():
            self.reverse.setdefault(code, []).append(local)
        self._cc: dict[str, dict[str, Any]] = {}

    def target(self, local: Any) -> tuple[str, str | None] | None:
        local = text(local)  # the column is text: trimmed, empty means absent
        if local is None:
            return None
        hit = self.codes.get(local)
        if hit is not None:
            return hit
        if self.unmapped == "default":
            return self.default
        if self.unmapped == "error":
            raise ValueError(f"unmapped code {local!r}")
        return None

    def code(self, local: Any) -> str | None:
        t = self.target(local)
        return None if t is None else t[0]

    def concept(self, local: Any) -> dict[str, Any] | None:
        t = self.target(local)
        if t is None:
            return None
        cc = self._cc.get(t[0])
        if cc is None:
            coding: dict[str, Any] = {"system": self.system, "code": t[0]}
            if t[1]:
                coding["display"] = t[1]
            cc = self._cc[t[0]] = {"coding": [coding]}
        return cc


ETHNIC = CodeMap("ethnic-category")
LANGUAGE = CodeMap("language")
NNN_STATUS = CodeMap("nhs-number-verification-status")
SEX = CodeMap("sex")
ADDRESS_USE = CodeMap("address-use")
ADDRESS_TYPE = CodeMap("address-type")
MARITAL = CodeMap("marital-status")
ID_SYSTEM = CodeMap("patient-identifier-system")

# --- value conversions (what the legacy columns hold → FHIR) ---------------------------------

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)


def _cap(m: re.Match[str]) -> str:
    w = m.group(0).lower()
    if "'" in w:  # O'BRIEN -> O'Brien, ST JOHN'S -> St John's
        head, tail = w.split("'", 1)
        return head.capitalize() + "'" + (tail.capitalize() if len(tail) > 1 else tail)
    if w.startswith("mc") and len(w) > 2:  # MCDONALD -> McDonald
        return "Mc" + w[2:].capitalize()
    return w.capitalize()


def text(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def title(v: Any) -> str | None:
    s = text(v)
    return None if s is None else _WORD.sub(_cap, s)


def date8(v: Any) -> str | None:
    s = text(v)
    if s is None or len(s) < 8 or not s[:8].isdigit():
        return None
    try:  # 00000000, 19650230: not a date
        return dt.date(int(s[0:4]), int(s[4:6]), int(s[6:8])).isoformat()
    except ValueError:
        return None


def dttm12(v: Any) -> str | None:
    s = text(v)
    if s is None or not s.isdigit() or len(s) < 12:
        return None
    try:
        t = dt.datetime(int(s[0:4]), int(s[4:6]), int(s[6:8]), int(s[8:10]), int(s[10:12]),
                        int(s[12:14]) if len(s) >= 14 else 0)
    except ValueError:
        return None
    return t.replace(tzinfo=TZ).isoformat()


def dttm_iso(v: Any) -> str | None:
    s = text(v)
    if s is None:
        return None
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    return t.isoformat() if t.tzinfo else t.replace(tzinfo=TZ).isoformat()


def active(v: Any) -> bool | None:
    s = text(v)
    if s is None:
        return None
    s = s.upper()
    if s in ("Y", "YES", "1", "T", "TRUE"):
        return False
    if s in ("N", "NO", "0", "F", "FALSE"):
        return True
    return None


def period(start: Any, end: Any) -> dict[str, str] | None:
    out = {}
    s, e = dttm12(start), dttm12(end)
    if s is not None:
        out["start"] = s
    if e is not None:
        out["end"] = e
    return out or None


# --- SQL: the same statements the gateway's SQL adapter issues -------------------------------

PATIENT_COLS = ("ARCHV_FLAG", "DTTM_OF_BIRTH", "DTTM_OF_DEATH", "EMAIL_ADDR", "ETHGR_CODE",
                "FORENAME", "HOME_TEL", "LANG_CODE", "MARRY_CODE", "MOBILE_TEL", "MODIF_DTTM",
                "NHS_NUMBER", "NNNTS_CODE", "PASID", "PATNT_REFNO", "SECOND_FORENAME",
                "SEXXX_CODE", "SURNAME", "TITLE")
SELECT_PATIENTS = "SELECT " + ", ".join(f'p."{c}" AS "p.{c}"' for c in PATIENT_COLS) + \
    ' \nFROM "PATIENTS" AS p \nWHERE '
ORDER_PAGE = ' ORDER BY p."PATNT_REFNO" ASC\n LIMIT ? OFFSET ?'
IDX = {c: i for i, c in enumerate(PATIENT_COLS)}


def _in(n: int) -> str:
    return "(" + ", ".join("?" * n) + ")"


def child_sql(n: int) -> tuple[str, str, str]:
    # the parent key last, as the gateway selects it
    ids = ('SELECT i."END_DTTM" AS "i.END_DTTM", i."IDENTIFIER" AS "i.IDENTIFIER", '
           'i."PITYP_CODE" AS "i.PITYP_CODE", i."START_DTTM" AS "i.START_DTTM", '
           'i."PATNT_REFNO" AS "@parent" \n'
           'FROM "PATIENT_IDS" AS i \nWHERE i."PATNT_REFNO" IN ' + _in(n) +
           ' ORDER BY i."PATNT_REFNO", i."START_DTTM"')
    addr = ('SELECT a."ADTYP_CODE" AS "a.ADTYP_CODE", a."END_DTTM" AS "a.END_DTTM", '
            'a."LINE1" AS "a.LINE1", a."LINE2" AS "a.LINE2", a."LINE3" AS "a.LINE3", '
            'a."LINE4" AS "a.LINE4", a."PCODE" AS "a.PCODE", a."START_DTTM" AS "a.START_DTTM", '
            'a."PATNT_REFNO" AS "@parent" \nFROM "ADDRESSES" AS a \n'
            'WHERE a."PATNT_REFNO" IN ' + _in(n) + ' ORDER BY a."PATNT_REFNO", a."START_DTTM"')
    gp = ('SELECT r."ORGAN_REFNO" AS "r.ORGAN_REFNO", r."PROCA_REFNO" AS "r.PROCA_REFNO", '
          'r."PATNT_REFNO" AS "@parent" \nFROM "GP_REGISTRATIONS" AS r \n'
          'WHERE r."PATNT_REFNO" IN ' + _in(n) + ' AND r."END_DTTM" IS NULL '
          'ORDER BY r."PATNT_REFNO"')
    return ids, addr, gp


def fold(value: Any) -> Any:
    """Lower case without accents (the gateway's rule), with the obvious ASCII shortcut."""
    if value is None:
        return None
    s = value if isinstance(value, str) else str(value)
    if s.isascii():
        return s.lower()
    decomposed = unicodedata.normalize("NFKD", s)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


class Db:
    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()

    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, check_same_thread=False)
            c.create_function("ccg_fold", 1, fold, deterministic=True)
            # The gateway's SQLite connection settings (adapters/sql.py): the same reads.
            c.execute("PRAGMA mmap_size = 268435456")
            self._local.conn = c
        return c

    def patients(self, where: str, params: list[Any], count: int
                 ) -> tuple[list[tuple[Any, ...]], bool, dict[int, tuple[list, list, list]]]:
        c = self.conn()
        rows = c.execute(SELECT_PATIENTS + where + ORDER_PAGE, [*params, count + 1, 0]).fetchall()
        more = len(rows) > count
        rows = rows[:count]
        children: dict[int, tuple[list, list, list]] = {}
        if rows:
            keys = list(dict.fromkeys(r[IDX["PATNT_REFNO"]] for r in rows))
            for k in keys:
                children[k] = ([], [], [])
            for slot, sql in enumerate(child_sql(len(keys))):
                for row in c.execute(sql, keys):
                    children[row[-1]][slot].append(row)
        return rows, more, children


# --- the resource, by hand (mappings/demo-pas/Patient.sql.yaml) -------------------------------


def patient(r: tuple[Any, ...], ids: list[tuple[Any, ...]], addrs: list[tuple[Any, ...]],
            gps: list[tuple[Any, ...]]) -> dict[str, Any]:
    g = r.__getitem__
    meta: dict[str, Any] = {"profile": [PROFILE]}
    lu = dttm_iso(g(10))
    if lu is not None:
        meta["lastUpdated"] = lu
    out: dict[str, Any] = {"resourceType": "Patient", "id": str(g(14)), "meta": meta}

    ext = []
    eth = ETHNIC.concept(g(4)) if g(4) is not None else None
    if eth is not None:
        ext.append({"url": EXT + "Extension-CareConnect-EthnicCategory-1",
                    "valueCodeableConcept": eth})
    lang = LANGUAGE.concept(g(7)) if g(7) is not None else None
    if lang is not None:
        ext.append({"url": EXT + "Extension-CareConnect-NHSCommunication-1",
                    "extension": [{"url": "language", "valueCodeableConcept": lang}]})
    if ext:
        out["extension"] = ext

    ident: list[dict[str, Any]] = []
    nhs = text(g(11))
    status = NNN_STATUS.concept(g(12)) if g(12) is not None else None
    if nhs is not None or status is not None:
        item: dict[str, Any] = {"system": "https://fhir.nhs.uk/Id/nhs-number"}
        if nhs is not None:
            item["value"] = nhs
        if status is not None:
            item["extension"] = [{
                "url": EXT + "Extension-CareConnect-NHSNumberVerificationStatus-1",
                "valueCodeableConcept": status}]
        ident.append(item)
    pasid = text(g(13))
    if pasid is not None:
        ident.append({"system": "https://fhir.demo-trust.nhs.uk/Id/pas-number", "value": pasid})
    for end, value, kind, start, _ in ids:
        v, p = text(value), period(start, end)
        system = ID_SYSTEM.code(kind)
        if v is None and p is None and system is None:
            continue
        item = {"system": system} if system is not None else {}
        if v is not None:
            item["value"] = v
        if p is not None:
            item["period"] = p
        ident.append(item)
    if ident:
        out["identifier"] = ident

    act = active(g(0))
    if act is not None:
        out["active"] = act

    family = title(g(17))
    given = [x for x in (title(g(5)), title(g(15))) if x is not None]
    prefix = title(g(18))
    if family is not None or given or prefix is not None:
        name: dict[str, Any] = {"use": "official"}
        if family is not None:
            name["family"] = family
        if given:
            name["given"] = given
        if prefix is not None:
            name["prefix"] = [prefix]
        out["name"] = [name]

    telecom = []
    for system, use, col in (("phone", "home", 6), ("phone", "mobile", 9), ("email", "home", 3)):
        v = text(g(col))
        if v is not None:
            telecom.append({"system": system, "use": use, "value": v})
    if telecom:
        out["telecom"] = telecom

    gender = SEX.code(g(16)) if g(16) is not None else None
    if gender is not None:
        out["gender"] = gender
    birth = date8(g(1))
    if birth is not None:
        out["birthDate"] = birth
    death = dttm12(g(2))
    if death is not None:
        out["deceasedDateTime"] = death

    address = []
    for adtyp, end, l1, l2, l3, l4, pcode, start, _ in addrs:
        a: dict[str, Any] = {}
        use = ADDRESS_USE.code(adtyp) if adtyp is not None else None
        if use is not None:
            a["use"] = use
        kind = ADDRESS_TYPE.code(adtyp) if adtyp is not None else None
        if kind is not None:
            a["type"] = kind
        lines = [x for x in (title(l1), title(l2)) if x is not None]
        if lines:
            a["line"] = lines
        for key, v in (("city", title(l3)), ("district", title(l4)), ("postalCode", text(pcode))):
            if v is not None:
                a[key] = v
        p = period(start, end)
        if p is not None:
            a["period"] = p
        if a:
            address.append(a)
    if address:
        out["address"] = address

    marital = MARITAL.concept(g(8)) if g(8) is not None else None
    if marital is not None:
        out["maritalStatus"] = marital

    gp = []
    for _organ, proca, _ in gps:
        if proca is not None:
            gp.append({"reference": f"Practitioner/{proca}"})
    for organ, _proca, _ in gps:
        if organ is not None:
            gp.append({"reference": f"Organization/{organ}"})
    if gp:
        out["generalPractitioner"] = gp
    return out


# --- HTTP ------------------------------------------------------------------------------------

_ID = re.compile(r"^[0-9]{1,18}$")
_YEAR = re.compile(r"^ge(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _outcome(status: int, code: str, text_: str) -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text_}]}
    return Response(orjson.dumps(body), status_code=status, media_type=MEDIA)


def _token(after: int) -> str:
    payload = base64.urlsafe_b64encode(orjson.dumps([after])).rstrip(b"=")
    sig = base64.urlsafe_b64encode(hmac.digest(SECRET, payload, "sha1")).rstrip(b"=")
    return (payload + b"." + sig).decode()


def _untoken(token: str) -> int | None:
    payload, _, sig = token.encode().partition(b".")
    good = base64.urlsafe_b64encode(hmac.digest(SECRET, payload, "sha1")).rstrip(b"=")
    if not hmac.compare_digest(sig, good):
        return None
    value = orjson.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    return int(value[0])


def build(db_path: str, db_mode: str = "thread") -> Starlette:
    db = Db(db_path)

    async def run(fn: Any, *args: Any) -> Any:
        return await run_in_threadpool(fn, *args) if db_mode == "thread" else fn(*args)

    async def read(request: Request) -> Response:
        rid = request.path_params["id"]
        if not _ID.match(rid):
            return _outcome(404 if re.match(r"^[A-Za-z0-9\-.]{1,64}$", rid) else 400,
                            "not-found", "Patient with that id was not found")
        rows, _, children = await run(db.patients, 'p."PATNT_REFNO" IN (?)', [int(rid)], 1)
        if not rows:
            return _outcome(404, "not-found", "Patient with that id was not found")
        r = rows[0]
        resource = patient(r, *children[r[IDX["PATNT_REFNO"]]])
        headers = {}
        updated = resource["meta"].get("lastUpdated")
        if updated:
            headers["ETag"] = 'W/"' + hashlib.sha256(updated.encode()).hexdigest()[:16] + '"'
            headers["Last-Modified"] = format_datetime(
                dt.datetime.fromisoformat(updated).astimezone(dt.UTC), usegmt=True)
        return Response(orjson.dumps(resource), headers=headers, media_type=MEDIA)

    async def search(request: Request) -> Response:
        where: list[str] = []
        params: list[Any] = []
        used: list[tuple[str, str]] = []
        count = 20
        after: int | None = None
        for key, raw in request.query_params.multi_items():
            if key == "family":
                value = fold(raw.strip())
                pattern = value.replace("\\", "\\\\").replace("%", "\\%")
                pattern = pattern.replace("_", "\\_") + "%"
                if value.isascii():  # the gateway's SQLite form: its own LIKE for ASCII rows
                    where.append('(p."SURNAME" LIKE ? ESCAPE \'\\\' OR length(CAST(p."SURNAME" '
                                 'AS BLOB)) != length(p."SURNAME") AND ccg_fold(p."SURNAME") '
                                 'LIKE ? ESCAPE \'\\\')')
                    params += [pattern, pattern]
                else:
                    where.append('ccg_fold(p."SURNAME") LIKE ? ESCAPE \'\\\'')
                    params.append(pattern)
            elif key == "gender":
                local = SEX.reverse.get(raw, [])
                if len(local) == 1:
                    where.append('p."SEXXX_CODE" = ?')
                    params.append(local[0])
                else:
                    where.append('p."SEXXX_CODE" IN ' + _in(len(local)) if local else "0 = 1")
                    params.extend(local)
            elif key == "birthdate":
                m = _YEAR.match(raw)
                if not m:
                    return _outcome(400, "invalid", "baseline: birthdate=geYYYY[-MM[-DD]] only")
                where.append('p."DTTM_OF_BIRTH" >= ?')
                params.append(f"{m.group(1)}{m.group(2) or '01'}{m.group(3) or '01'}")
            elif key == "_count":
                count = min(int(raw), 500)
            elif key == "_page":
                after = _untoken(raw)
                if after is None:
                    return _outcome(400, "invalid", "bad paging link")
                continue
            else:
                return _outcome(400, "not-supported", f"baseline does not support {key}")
            used.append((key, raw))
        if after is not None:
            where.append('(p."PATNT_REFNO" > ?)')
            params.append(after)
        rows, more, children = await run(db.patients, " AND ".join(where) or "1 = 1",
                                         params, count)
        base = str(request.base_url).rstrip("/") + "/STU3"
        entries = []
        for r in rows:
            res = patient(r, *children[r[IDX["PATNT_REFNO"]]])
            entries.append({"fullUrl": f"{base}/Patient/{res['id']}", "resource": res,
                            "search": {"mode": "match"}})
        links = [{"relation": "self", "url": f"{base}/Patient?{urlencode(used)}"}]
        if rows and more:
            nxt = urlencode([*used, ("_page", _token(rows[-1][IDX['PATNT_REFNO']]))])
            links.append({"relation": "next", "url": f"{base}/Patient?{nxt}"})
        # (no "previous" link: the baseline only pages forwards; the bench reads first pages)
        body: dict[str, Any] = {
            "resourceType": "Bundle", "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
            "type": "searchset",
        }
        if after is None and not more:
            body["total"] = len(rows)
        body["link"] = links
        if entries:
            body["entry"] = entries
        return Response(orjson.dumps(body), media_type=MEDIA)

    async def health(request: Request) -> Response:
        return Response(b'{"status":"pass"}', media_type="application/json")

    return Starlette(routes=[
        Route("/_health", health),
        Route("/STU3/Patient", search),
        Route("/STU3/Patient/{id}", read),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True, help="demo PAS SQLite file")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8091)
    ap.add_argument("--db-mode", choices=("thread", "inline"), default="thread")
    args = ap.parse_args()
    import uvicorn

    app = build(str(pathlib.Path(args.db).resolve()), args.db_mode)
    # The same uvicorn options the gateway's `serve` uses (one worker, no access log).
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False,
                server_header=False)


if __name__ == "__main__":
    main()
