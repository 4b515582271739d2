"""The demo PAS's EPR half (part one): problems, allergies, alerts and procedures.

Tables in the same legacy style as `schema.py` (UPPER-CASE names, local codes, `YYYYMMDD` /
`YYYYMMDDHHMM` strings, soft deletes, no foreign keys), on the same `metadata`.

Problems are stored as the clinician entered them: a Read v2 code (`READ_CODE`) or, for the
part of the record keyed after the trust moved to CTV3, a CTV3 code (`CTV3_CODE`); never both.
SNOMED CT is not stored: the trust's Read v2/CTV3 -> SNOMED CT maps are code maps
(`mappings/codemaps/readv2-snomed.yaml`, `ctv3-snomed.yaml`), and some codes are deliberately
not in them. Procedures carry OPCS-4 codes in the PAS's local form without the dot (`W371`).

The rows are filled by `extend()`, which wraps the main generator's batches: it watches the
clinicians, patients and spells go by and, after each chunk of patients, yields their clinical
rows. It draws from its own `random.Random` stream (seeded from the build seed), so every row of
the existing tables stays exactly as it was.

Fixture patients (documented, always the same rows for a given seed):

* 100001 (JANE SMITH) has a rich record: 40 problems, 25 allergy rows (some ended, some
  unconfirmed, one soft-deleted), 24 alerts and 40 procedures, some linked to her spell;
* 100002 has "no known allergies" recorded explicitly, and nothing else;
* 100004 has no allergy record at all (never asked): distinct from 100002;
* 100005 (archived duplicate) has no clinical rows.
"""

from __future__ import annotations

import bisect
import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy import CHAR, Column, Index, Integer, String, Table

from gateway.demo_pas import schema
from gateway.demo_pas.generate import REFERENCE_DATE, Batch
from gateway.demo_pas.schema import metadata

Row = dict[str, Any]

# A stream of its own: XOR with a constant so it never equals the main generator's.
_STREAM = 0x45505231  # "EPR1"


def _pk(name: str) -> Column[int]:
    return Column(name, Integer, primary_key=True, autoincrement=False)


def _modif() -> Column[str]:
    return Column("MODIF_DTTM", String(19), nullable=False)


problems = Table(
    "PROBLEMS",
    metadata,
    _pk("PROBL_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("PRVSP_REFNO", Integer),  # the spell it was recorded in (encounter diagnoses)
    Column("PROBL_TYPE", String(2), nullable=False),  # PL problem list, DX diagnosis, CM co-morb.
    Column("READ_CODE", String(5)),  # Read v2, as entered
    Column("CTV3_CODE", String(5)),  # CTV3, as entered (after the trust's CTV3 go-live)
    Column("PROBL_DESC", String(120), nullable=False),
    Column("PROBL_STATUS", String(1), nullable=False),  # A active, I inactive, R resolved
    Column("EPISD_CODE", String(1)),  # F first, N new, R review, E end
    Column("ONSET_DATE", String(8)),
    Column("RESOLVED_DATE", String(8)),
    Column("RECORDED_DTTM", String(12), nullable=False),
    Column("PROCA_REFNO", Integer),
    Column("DELETED_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("IX_PROBLEMS_PATNT", "PATNT_REFNO"),
    Index("IX_PROBLEMS_READ", "READ_CODE"),
    Index("IX_PROBLEMS_CTV3", "CTV3_CODE"),
)

allergies = Table(
    "ALLERGIES",
    metadata,
    _pk("ALLGY_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("ALLTY_CODE", String(1)),  # A allergy, I intolerance
    Column("ALCAT_CODE", String(1)),  # D drug, F food, E environment
    Column("SUBST_CODE", String(8), nullable=False),  # local substance code; NKA: none known
    Column("SUBST_DESC", String(80), nullable=False),
    Column("CRITY_CODE", String(1)),  # H high, L low, U unable to assess
    Column("VERIF_CODE", String(1), nullable=False),  # C confirmed, U unconfirmed
    Column("ALLGY_STATUS", String(1), nullable=False),  # A active, I inactive, R resolved
    Column("ONSET_DATE", String(8)),
    Column("RECORDED_DTTM", String(12), nullable=False),
    Column("END_DATE", String(8)),
    Column("END_REASON", String(80)),
    Column("PROCA_REFNO", Integer),
    Column("NOTE_TEXT", String(200)),
    Column("DELETED_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("IX_ALLERGIES_PATNT", "PATNT_REFNO"),
)

allergy_reactions = Table(
    "ALLERGY_REACTIONS",
    metadata,
    _pk("ALREA_REFNO"),
    Column("ALLGY_REFNO", Integer, nullable=False),
    Column("MANIF_CODE", String(8), nullable=False),  # local manifestation code
    Column("MANIF_DESC", String(80), nullable=False),
    Column("SEVRT_CODE", String(1)),  # 1 mild, 2 moderate, 3 severe
    Column("ONSET_DATE", String(8)),
    Column("DELETED_FLAG", CHAR(1), nullable=False),
    Index("IX_ALLERGY_REACTIONS_ALLGY", "ALLGY_REFNO"),
)

alerts = Table(
    "ALERTS",
    metadata,
    _pk("ALERT_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("ALTYP_CODE", String(6), nullable=False),
    Column("ALERT_TEXT", String(200)),
    Column("ALERT_STATUS", String(1), nullable=False),  # A active, I inactive, E in error
    Column("START_DTTM", String(12), nullable=False),
    Column("END_DTTM", String(12)),
    Column("PROCA_REFNO", Integer),
    Column("ARCHV_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("IX_ALERTS_PATNT", "PATNT_REFNO"),
)

procedures = Table(
    "PROCEDURES",
    metadata,
    _pk("PROCD_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("PRVSP_REFNO", Integer),
    Column("OPCS_CODE", String(4), nullable=False),  # local form, no dot: W371
    Column("PROCD_DESC", String(120), nullable=False),
    Column("PROCD_STATUS", String(1), nullable=False),  # C completed, A abandoned, E in error
    Column("PROC_DTTM", String(12), nullable=False),
    Column("PROCA_REFNO", Integer),
    Column("PRIMARY_FLAG", CHAR(1)),
    Column("DELETED_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("IX_PROCEDURES_PATNT", "PATNT_REFNO"),
    Index("IX_PROCEDURES_DTTM", "PROC_DTTM"),
)

TABLES = (problems, allergies, allergy_reactions, alerts, procedures)

# ---------------------------------------------------------------------------------------------
# Catalogues. Tests check every code emitted here against mappings/codemaps: each is listed
# there, mapped or (for codes the trust deliberately has not mapped) as null.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    scheme: str  # R2 or CTV3
    code: str
    desc: str
    weight: float
    min_age: int = 0
    sex: str | None = None
    chronic: bool = True


CHRONIC_PROBLEMS = (
    _Problem("R2", "G20..", "Essential hypertension", 14, 35),
    _Problem("R2", "C10F.", "Type 2 diabetes mellitus", 8, 30),
    _Problem("R2", "C10E.", "Type 1 diabetes mellitus", 1),
    _Problem("R2", "H33..", "Asthma", 8),
    _Problem("R2", "H3...", "Chronic obstructive lung disease", 4, 45),
    _Problem("R2", "G573.", "Atrial fibrillation and flutter", 4, 55),
    _Problem("R2", "G33..", "Angina pectoris", 3, 45),
    _Problem("R2", "G58..", "Heart failure", 3, 60),
    _Problem("R2", "G66..", "Stroke and cerebrovascular accident unspecified", 2, 55),
    _Problem("R2", "C04..", "Acquired hypothyroidism", 4, 20),
    _Problem("R2", "E2B..", "Depressive disorder NEC", 6, 14),
    _Problem("R2", "E200.", "Anxiety states", 4, 12),
    _Problem("R2", "N05..", "Osteoarthritis and allied disorders", 6, 45),
    _Problem("R2", "N040.", "Rheumatoid arthritis", 1, 25),
    _Problem("R2", "F25..", "Epilepsy", 1),
    _Problem("R2", "F26..", "Migraine", 3, 10),
    _Problem("R2", "C320.", "Pure hypercholesterolaemia", 4, 30),
    _Problem("R2", "C380.", "Obesity", 3, 16),
    _Problem("R2", "1Z12.", "Chronic kidney disease stage 3", 3, 50),  # not in the trust's map
    _Problem("R2", "N330.", "Osteoporosis", 2, 55, "2"),
    _Problem("R2", "C34..", "Gout", 1.5, 35),
    _Problem("R2", "F12..", "Parkinson's disease", 0.5, 60),
    _Problem("R2", "F110.", "Alzheimer's disease", 1, 65),
    _Problem("R2", "B34..", "Malignant neoplasm of female breast", 1, 35, "2"),
    # Keyed in CTV3 (the trust's CTV3 go-live): some codes are the same strings as Read v2.
    _Problem("CTV3", "X40J5", "Type II diabetes mellitus", 4, 30),
    _Problem("CTV3", "X40J4", "Type I diabetes mellitus", 0.5),
    _Problem("CTV3", "G20..", "Essential hypertension", 6, 35),
    _Problem("CTV3", "H33..", "Asthma", 3),
    _Problem("CTV3", "XaIIt", "Chronic kidney disease stage 3A", 1, 50),  # not mapped
)
ACUTE_PROBLEMS = (
    _Problem("R2", "H2...", "Pneumonia and influenza", 6, chronic=False),
    _Problem("R2", "K190.", "Urinary tract infection, site not specified", 6, chronic=False),
    _Problem("R2", "S30..", "Fracture of neck of femur", 2, 60, chronic=False),
    _Problem("R2", "J10..", "Acute appendicitis", 1.5, 5, chronic=False),
    _Problem("R2", "M03..", "Other cellulitis and abscess", 3, chronic=False),
    _Problem("R2", "182..", "Chest pain", 5, 18, chronic=False),
    _Problem("R2", "G30..", "Acute myocardial infarction", 2, 40, chronic=False),
    _Problem("CTV3", "X200E", "Myocardial infarction", 1, 40, chronic=False),
    _Problem("CTV3", "X00D1", "Cerebrovascular accident", 1.5, 50, chronic=False),
)

# (local code, description, category D/F/E, type A/I, weight)
ALLERGENS: tuple[tuple[str, str, str, str, float], ...] = (
    ("PEN", "Penicillin", "D", "A", 30),
    ("AMOX", "Amoxicillin", "D", "A", 6),
    ("CEPH", "Cephalosporin", "D", "A", 3),
    ("SULF", "Sulfonamide", "D", "A", 3),
    ("TRIM", "Trimethoprim", "D", "A", 3),
    ("ASP", "Aspirin", "D", "I", 4),
    ("NSAID", "Non-steroidal anti-inflammatory drug", "D", "I", 5),
    ("IBU", "Ibuprofen", "D", "I", 4),
    ("CODE", "Codeine", "D", "I", 5),
    ("MORPH", "Morphine", "D", "I", 3),
    ("OPIAT", "Opiate", "D", "I", 2),
    ("ACEI", "ACE inhibitor", "D", "I", 2),
    ("STAT", "Statin", "D", "I", 2),
    ("ERYTH", "Erythromycin", "D", "I", 1.5),
    ("LATEX", "Latex", "E", "A", 3),
    ("PLAST", "Elastoplast", "E", "A", 2),
    ("PEANT", "Peanut", "F", "A", 3),
    ("TNUT", "Tree nut", "F", "A", 1.5),
    ("SHELL", "Shellfish", "F", "A", 1.5),
    ("EGG", "Egg", "F", "A", 1),
    ("IODCM", "Iodinated contrast media", "D", "A", 1),  # not in the trust's map
    ("WASP", "Wasp venom", "E", "A", 1),
)
NKA_CODE = "NKA"
MANIFESTATIONS = (("RASH", "Rash", 30), ("URTIC", "Urticaria", 15), ("ANAPH", "Anaphylaxis", 4),
                  ("ANGIO", "Angioedema", 4), ("NAUS", "Nausea", 10), ("VOMIT", "Vomiting", 8),
                  ("DIARR", "Diarrhoea", 6), ("WHEEZ", "Wheezing", 5),
                  ("DYSPN", "Dyspnoea", 4), ("ITCH", "Pruritus", 10),
                  ("SWELL", "Swelling", 5))
END_REASONS = ("Tolerated re-challenge", "Recorded in error on a previous admission",
               "Outgrown", "Not confirmed on allergy testing")

# (local type, free text, weight, minimum age)
ALERT_TYPES: tuple[tuple[str, str, float, int], ...] = (
    ("SAFEA", "Adult safeguarding concern: contact the safeguarding team", 8, 18),
    ("SAFEC", "Child protection plan in place", 4, 0),
    ("MRSA", "MRSA positive: isolate on admission", 12, 0),
    ("CDIF", "Clostridioides difficile: enteric precautions", 4, 40),
    ("CPE", "Carbapenemase-producing Enterobacterales carrier", 2, 0),
    ("VIOL", "History of violence towards staff: two staff to attend", 3, 16),
    ("FALLS", "High risk of falls", 10, 65),
    ("DNACPR", "DNACPR decision recorded: see form in notes", 6, 70),
    ("LD", "Learning disability: reasonable adjustments needed", 3, 0),
    ("DEAF", "Profoundly deaf: BSL interpreter needed", 1.5, 0),
    ("DIFFA", "Difficult airway", 1, 16),  # not in the trust's map
)

# (local OPCS-4 form, description, specialty prefix it belongs to, weight)
OPCS_PROCEDURES: tuple[tuple[str, str, str, float], ...] = (
    ("W371", "Primary total prosthetic replacement of hip joint using cement", "110", 5),
    ("W401", "Primary total prosthetic replacement of knee joint using cement", "110", 5),
    ("W191", "Primary open reduction of fracture of neck of femur and open fixation using "
             "pin and plate", "110", 3),
    ("H011", "Emergency excision of abnormal appendix and drainage HFQ", "100", 3),
    ("J183", "Total cholecystectomy NEC", "100", 4),
    ("T202", "Primary repair of inguinal hernia using insert of natural or artificial "
             "material", "100", 4),
    ("H229", "Unspecified diagnostic endoscopic examination of colon", "301", 5),
    ("G459", "Unspecified diagnostic fibreoptic endoscopic examination of upper "
             "gastrointestinal tract", "301", 5),  # not in the trust's map
    ("K401", "Saphenous vein graft replacement of one coronary artery", "170", 1),
    ("K751", "Percutaneous transluminal balloon angioplasty and insertion of 1-2 drug-eluting "
             "stents into coronary artery", "320", 4),
    ("C712", "Phacoemulsification of lens", "130", 5),
    ("R171", "Elective caesarean delivery", "501", 4),
    ("Q074", "Total abdominal hysterectomy NEC", "502", 2),
    ("M459", "Unspecified diagnostic endoscopic examination of bladder", "101", 4),
    ("U051", "Computed tomography of head", "*", 6),
    ("E851", "Non-invasive ventilation NEC", "340", 2),
)

_REF_ORD = REFERENCE_DATE.toordinal()
_HHMM = [f"{m // 60:02d}{m % 60:02d}" for m in range(1440)]


@lru_cache(maxsize=65536)
def _ymd(ordinal: int) -> str:
    d = dt.date.fromordinal(ordinal)
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


@lru_cache(maxsize=65536)
def _ord(yyyymmdd: str) -> int:
    return dt.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8])).toordinal()


@lru_cache(maxsize=65536)
def _iso_day(ordinal: int) -> str:
    d = dt.date.fromordinal(ordinal)
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d} "


_HMS = [f"{h:02d}:{m:02d}:" for h in range(24) for m in range(60)]


def _iso(ordinal: int, second: int) -> str:
    return f"{_iso_day(min(ordinal, _REF_ORD))}{_HMS[second // 60]}{second % 60:02d}"


class _Weighted:
    def __init__(self, items: list[Any], weights: list[float]) -> None:
        self.items = items
        self.cum: list[float] = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)
        self.total = total

    def __call__(self, rnd: float) -> Any:
        return self.items[bisect.bisect_right(self.cum, rnd * self.total)]


@dataclass
class _Patient:
    refno: int
    sex: str
    birth: int
    death: int | None
    archived: bool
    spells: list[Row] = field(default_factory=list)


class EprClinicalGenerator:
    """Clinical rows for the patients the main generator produces (see the module doc)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed ^ _STREAM)
        self.next_probl = self.next_allgy = self.next_alrea = 1
        self.next_alert = self.next_procd = 1
        self.consultants: list[int] = []
        self.by_spec: dict[str, list[int]] = {}
        self.nurses: list[int] = []
        self._chronic_by_age: dict[tuple[int, str], _Weighted] = {}
        self._acute = _Weighted(list(ACUTE_PROBLEMS), [p.weight for p in ACUTE_PROBLEMS])
        self._allergen = _Weighted(list(ALLERGENS), [a[4] for a in ALLERGENS])
        self._manif = _Weighted(list(MANIFESTATIONS), [m[2] for m in MANIFESTATIONS])
        self._alert = _Weighted(list(ALERT_TYPES), [a[2] for a in ALERT_TYPES])
        self._any_proc = _Weighted(list(OPCS_PROCEDURES), [p[3] for p in OPCS_PROCEDURES])
        self._proc_by_spec: dict[str, _Weighted] = {}
        for spec in {p[2] for p in OPCS_PROCEDURES}:
            chosen = [p for p in OPCS_PROCEDURES if p[2] in (spec, "*")]
            self._proc_by_spec[spec] = _Weighted(chosen, [p[3] for p in chosen])

    # -- wiring --------------------------------------------------------------------------------
    def extend(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The main generator's batches, each chunk of patients followed by its clinical rows."""
        pending: dict[int, _Patient] = {}
        done = 0
        for batch in batches:
            if batch.patients_done != done and pending:
                yield from self._rows_for(pending, done)
                pending = {}
            done = batch.patients_done
            yield batch
            if batch.table is schema.clinicians:
                self._clinicians(batch.rows)
            elif batch.table is schema.patients:
                for row in batch.rows:
                    death = row["DTTM_OF_DEATH"]
                    pending[row["PATNT_REFNO"]] = _Patient(
                        row["PATNT_REFNO"], row["SEXXX_CODE"], _ord(row["DTTM_OF_BIRTH"]),
                        _ord(death[:8]) if death else None, row["ARCHV_FLAG"] == "Y")
            elif batch.table is schema.provider_spells:
                for row in batch.rows:
                    pending[row["PATNT_REFNO"]].spells.append(row)
        if pending:
            yield from self._rows_for(pending, done)

    def _clinicians(self, rows: list[Row]) -> None:
        for row in rows:
            if row["PRTYP_CODE"] == "CONS":
                self.consultants.append(row["PROCA_REFNO"])
                self.by_spec.setdefault(row["MAIN_SPECT_CODE"], []).append(row["PROCA_REFNO"])
            elif row["PRTYP_CODE"] == "NURS":
                self.nurses.append(row["PROCA_REFNO"])

    def _rows_for(self, patients: dict[int, _Patient], done: int) -> Iterator[Batch]:
        out: dict[Table, list[Row]] = {t: [] for t in TABLES}
        for refno in sorted(patients):
            p = patients[refno]
            if p.archived:
                continue  # a merged duplicate: its record lives on the surviving patient
            if refno == 100001:
                self._rich(p, out)
            elif refno == 100002:
                self._nka(p, out)
            elif refno == 100004:
                continue  # never asked about allergies; nothing recorded
            else:
                self._patient(p, out)
        for table in TABLES:
            if out[table]:
                yield Batch(table, out[table], done)

    # -- helpers -------------------------------------------------------------------------------
    def _modif(self, ordinal: int) -> str:
        return _iso(ordinal + int(self.rng.random() * 30), int(self.rng.random() * 86400))

    def _clinician(self) -> int:
        return self.rng.choice(self.consultants)

    def _when(self, p: _Patient, lo_years_ago: float = 30) -> int:
        end = p.death if p.death is not None else _REF_ORD
        lo = max(p.birth + 1, end - int(lo_years_ago * 365))
        return lo + int(self.rng.random() * max(1, end - lo))

    def _age(self, p: _Patient) -> int:
        end = p.death if p.death is not None else _REF_ORD
        return int((end - p.birth) / 365.25)

    def _chronic_picker(self, p: _Patient) -> _Weighted:
        key = (min(self._age(p), 70) // 5 * 5, p.sex)
        picker = self._chronic_by_age.get(key)
        if picker is None:
            fit = [c for c in CHRONIC_PROBLEMS
                   if c.min_age <= key[0] and (c.sex is None or c.sex == p.sex)]
            picker = self._chronic_by_age[key] = _Weighted(fit, [c.weight for c in fit])
        return picker

    # -- per patient ---------------------------------------------------------------------------
    def _patient(self, p: _Patient, out: dict[Table, list[Row]]) -> None:
        r = self.rng.random
        age = self._age(p)
        # Chronic problems: none for most young people, several for the old.
        mean = 0.15 + age / 25
        n = 0
        while n < 12 and r() < mean / (mean + 1):
            n += 1
        picker = self._chronic_picker(p)
        seen: set[str] = set()
        for _ in range(n):
            prob = picker(r())
            if prob.code in seen:
                continue
            seen.add(prob.code)
            self._problem(p, prob, out)
        for spell in p.spells:
            self._spell(p, spell, out)
        # Allergies: ~40% "no known allergies" recorded, ~18% a real one, the rest never asked.
        x = r()
        if x < 0.40:
            self._nka(p, out)
        elif x < 0.58:
            for _ in range(1 if r() < 0.7 else 2 if r() < 0.8 else 3):
                self._allergy(p, out)
        # Alerts: ~7% of patients, more of the old.
        if r() < 0.05 + age / 1500:
            for _ in range(1 if r() < 0.8 else 2):
                self._alert_row(p, out)
        # Outpatient procedures without a spell (a CT scan, an endoscopy): a few patients.
        if r() < 0.04:
            self._procedure(p, None, self._any_proc(r()), self._when(p, 5), out)

    def _spell(self, p: _Patient, spell: Row, out: dict[Table, list[Row]]) -> None:
        r = self.rng.random
        if spell["SPELL_STATUS"] == "C":
            return
        admit = _ord(spell["ADMIT_DTTM"][:8])
        disch = spell["DISCH_DTTM"]
        # Encounter diagnoses: one or two per spell, most of them resolved at discharge.
        for _ in range(1 if r() < 0.7 else 2):
            prob = self._acute(r())
            if self._age(p) < prob.min_age:
                continue
            self._problem(p, prob, out, spell=spell, onset=admit,
                          resolved=_ord(disch[:8]) if disch and r() < 0.85 else None)
        spec = spell["MAIN_SPECT_CODE"] or ""
        surgical = spec[:1] == "1" or spec in ("501", "502")
        if spell["SPELL_STATUS"] == "D" and r() < (0.75 if surgical else 0.2):
            picker = self._proc_by_spec.get(spec, self._any_proc)
            for i in range(1 if r() < 0.8 else 2):
                when = admit if disch is None else admit + int(
                    r() * (_ord(disch[:8]) - admit + 1))
                self._procedure(p, spell, picker(r()), when, out, primary=i == 0)

    def _problem(self, p: _Patient, prob: _Problem, out: dict[Table, list[Row]], *,
                 spell: Row | None = None, onset: int | None = None,
                 resolved: int | None = None) -> None:
        r = self.rng.random
        if onset is None:
            onset = self._when(p)
        end = p.death if p.death is not None else _REF_ORD
        status = "A"
        if not prob.chronic and spell is None:
            resolved = min(end, onset + 7 + int(r() * 60))
        if resolved is not None:
            status = "R" if r() < 0.9 else "I"
        elif prob.chronic and r() < 0.06:
            status = "I"  # no longer relevant, no end date recorded
        recorded = min(end, onset + int(r() * 30))
        changed = max(recorded, resolved) if resolved is not None else recorded
        ptype = "DX" if spell is not None else ("PL" if r() < 0.9 else "CM")
        episd = None
        if spell is not None:
            episd = "F" if r() < 0.6 else "N"
        elif r() < 0.3:
            episd = "F" if status == "A" else "E"
        out[problems].append({
            "PROBL_REFNO": self.next_probl, "PATNT_REFNO": p.refno,
            "PRVSP_REFNO": spell["PRVSP_REFNO"] if spell else None, "PROBL_TYPE": ptype,
            "READ_CODE": prob.code if prob.scheme == "R2" else None,
            "CTV3_CODE": prob.code if prob.scheme == "CTV3" else None,
            "PROBL_DESC": prob.desc, "PROBL_STATUS": status, "EPISD_CODE": episd,
            "ONSET_DATE": _ymd(onset) if r() < 0.95 else None,
            "RESOLVED_DATE": _ymd(resolved) if resolved is not None else None,
            "RECORDED_DTTM": _ymd(recorded) + _HHMM[480 + int(r() * 600)],
            "PROCA_REFNO": spell["PROCA_REFNO"] if spell else self._clinician(),
            "DELETED_FLAG": "Y" if r() < 0.02 else "N",
            "MODIF_DTTM": self._modif(changed)})
        self.next_probl += 1

    def _nka(self, p: _Patient, out: dict[Table, list[Row]]) -> None:
        when = self._when(p, 8)
        out[allergies].append({
            "ALLGY_REFNO": self.next_allgy, "PATNT_REFNO": p.refno, "ALLTY_CODE": None,
            "ALCAT_CODE": None, "SUBST_CODE": NKA_CODE, "SUBST_DESC": "No known allergies",
            "CRITY_CODE": None, "VERIF_CODE": "C", "ALLGY_STATUS": "A", "ONSET_DATE": None,
            "RECORDED_DTTM": _ymd(when) + _HHMM[480 + int(self.rng.random() * 600)],
            "END_DATE": None, "END_REASON": None, "PROCA_REFNO": self._clinician(),
            "NOTE_TEXT": None, "DELETED_FLAG": "N", "MODIF_DTTM": self._modif(when)})
        self.next_allgy += 1

    def _allergy(self, p: _Patient, out: dict[Table, list[Row]],
                 allergen: tuple[str, str, str, str, float] | None = None) -> None:
        r = self.rng.random
        code, desc, cat, kind, _ = allergen or self._allergen(r())
        onset = self._when(p, 40)
        end = p.death if p.death is not None else _REF_ORD
        recorded = min(end, onset + int(r() * 400))
        ended = r() < 0.08
        ended_on = min(end, recorded + 30 + int(r() * 1000)) if ended else None
        x = r()
        crit = "H" if code in ("PEANT", "WASP", "LATEX") or x < 0.15 else (
            "L" if x < 0.85 else "U")
        out[allergies].append({
            "ALLGY_REFNO": self.next_allgy, "PATNT_REFNO": p.refno, "ALLTY_CODE": kind,
            "ALCAT_CODE": cat, "SUBST_CODE": code, "SUBST_DESC": desc, "CRITY_CODE": crit,
            "VERIF_CODE": "C" if r() < 0.75 else "U",
            "ALLGY_STATUS": ("R" if r() < 0.5 else "I") if ended else "A",
            "ONSET_DATE": _ymd(onset) if r() < 0.6 else None,
            "RECORDED_DTTM": _ymd(recorded) + _HHMM[480 + int(r() * 600)],
            "END_DATE": _ymd(ended_on) if ended_on is not None else None,
            "END_REASON": self.rng.choice(END_REASONS) if ended else None,
            "PROCA_REFNO": self._clinician(),
            "NOTE_TEXT": "Reported by patient; reaction in childhood" if r() < 0.1 else None,
            "DELETED_FLAG": "Y" if r() < 0.02 else "N",
            "MODIF_DTTM": self._modif(ended_on if ended_on is not None else recorded)})
        n_reactions = 0 if r() < 0.15 else 1 if r() < 0.75 else 2
        for _ in range(n_reactions):
            mcode, mdesc, _w = self._manif(r())
            sev = "3" if mcode in ("ANAPH", "ANGIO") else ("1" if r() < 0.55 else "2")
            out[allergy_reactions].append({
                "ALREA_REFNO": self.next_alrea, "ALLGY_REFNO": self.next_allgy,
                "MANIF_CODE": mcode, "MANIF_DESC": mdesc,
                "SEVRT_CODE": sev if r() < 0.9 else None,
                "ONSET_DATE": _ymd(onset) if r() < 0.5 else None,
                "DELETED_FLAG": "Y" if r() < 0.02 else "N"})
            self.next_alrea += 1
        self.next_allgy += 1

    def _alert_row(self, p: _Patient, out: dict[Table, list[Row]],
                   kind: tuple[str, str, float, int] | None = None) -> None:
        r = self.rng.random
        code, text, _w, min_age = kind or self._alert(r())
        if kind is None and self._age(p) < min_age:
            code, text = "MRSA", ALERT_TYPES[2][1]
        start = self._when(p, 10)
        end = p.death if p.death is not None else _REF_ORD
        x = r()
        ended = x < 0.25
        status = "E" if x > 0.97 else ("I" if ended else "A")
        stop = min(end, start + 30 + int(r() * 700)) if ended else None
        out[alerts].append({
            "ALERT_REFNO": self.next_alert, "PATNT_REFNO": p.refno, "ALTYP_CODE": code,
            "ALERT_TEXT": text, "ALERT_STATUS": status,
            "START_DTTM": _ymd(start) + _HHMM[int(r() * 1440)],
            "END_DTTM": _ymd(stop) + _HHMM[int(r() * 1440)] if stop is not None else None,
            "PROCA_REFNO": self.rng.choice(self.nurses) if r() < 0.5 else self._clinician(),
            "ARCHV_FLAG": "Y" if r() < 0.02 else "N",
            "MODIF_DTTM": self._modif(stop if stop is not None else start)})
        self.next_alert += 1

    def _procedure(self, p: _Patient, spell: Row | None, proc: tuple[str, str, str, float],
                   when: int, out: dict[Table, list[Row]], primary: bool = True) -> None:
        r = self.rng.random
        code, desc, spec, _ = proc
        if spell is not None:
            performer = spell["PROCA_REFNO"]
        else:
            performer = self.rng.choice(self.by_spec.get(spec) or self.consultants)
        x = r()
        out[procedures].append({
            "PROCD_REFNO": self.next_procd, "PATNT_REFNO": p.refno,
            "PRVSP_REFNO": spell["PRVSP_REFNO"] if spell else None, "OPCS_CODE": code,
            "PROCD_DESC": desc, "PROCD_STATUS": "A" if x < 0.02 else "E" if x < 0.03 else "C",
            "PROC_DTTM": _ymd(when) + _HHMM[480 + int(r() * 660)],
            "PROCA_REFNO": performer, "PRIMARY_FLAG": "Y" if primary else "N",
            "DELETED_FLAG": "Y" if r() < 0.02 else "N", "MODIF_DTTM": self._modif(when)})
        self.next_procd += 1

    # -- fixtures ------------------------------------------------------------------------------
    def _rich(self, p: _Patient, out: dict[Table, list[Row]]) -> None:
        """100001: dozens of each, every code of every catalogue at least once."""
        r = self.rng.random
        for prob in CHRONIC_PROBLEMS:
            if prob.sex in (None, p.sex):
                self._problem(p, prob, out)
        for spell in p.spells:
            for prob in ACUTE_PROBLEMS[:3]:
                self._problem(p, prob, out, spell=spell, onset=_ord(spell["ADMIT_DTTM"][:8]),
                              resolved=_ord(spell["DISCH_DTTM"][:8]))
        while len([x for x in out[problems] if x["PATNT_REFNO"] == p.refno]) < 40:
            self._problem(p, ACUTE_PROBLEMS[int(r() * len(ACUTE_PROBLEMS))], out)
        for allergen in ALLERGENS:
            self._allergy(p, out, allergen)
        while len([x for x in out[allergies] if x["PATNT_REFNO"] == p.refno]) < 25:
            self._allergy(p, out)
        for kind in ALERT_TYPES:
            self._alert_row(p, out, kind)
        while len([x for x in out[alerts] if x["PATNT_REFNO"] == p.refno]) < 24:
            self._alert_row(p, out, ALERT_TYPES[int(r() * len(ALERT_TYPES))])
        first = p.spells[0] if p.spells else None
        for i, proc in enumerate(OPCS_PROCEDURES):
            linked = first if i < 3 else None
            when = _ord(linked["ADMIT_DTTM"][:8]) if linked else self._when(p, 20)
            self._procedure(p, linked, proc, when, out, primary=i == 0 or linked is None)
        while len([x for x in out[procedures] if x["PATNT_REFNO"] == p.refno]) < 40:
            self._procedure(p, None, self._any_proc(r()), self._when(p, 20), out)


def extend(batches: Iterator[Batch], seed: int) -> Iterator[Batch]:
    """The demo PAS batches with the EPR rows of this module added (see the module doc)."""
    return EprClinicalGenerator(seed).extend(batches)
