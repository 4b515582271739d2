"""Deterministic rows for the EPR's medicines and results tables (``epr_medication``,
``epr_results``), generated alongside the PAS rows without disturbing them.

``with_medication_and_results(batches, seed)`` passes every batch of the PAS generator through
unchanged and, after each chunk of patients, yields that chunk's medicines and results. It has
its own random stream (seeded from the seed and a fixed label), consumed patient by patient in
key order, so the PAS rows stay byte-identical and these rows do not depend on the chunk size.

Frequencies are meant to look lived-in: most people over sixty have a medication list and
a flu jab a year, children have their schedule, every admission has observations and most
have bloods; a young adult may have nothing at all. The first fixture patient (100001) has a
rich record: dozens of each.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy import Table

from gateway.demo_pas import epr_medication as med
from gateway.demo_pas import epr_results as res
from gateway.demo_pas import schema
from gateway.demo_pas.generate import FIRST_PATNT_REFNO, REFERENCE_DATE, Batch, _Picker

Row = dict[str, Any]

RICH_PATIENT = FIRST_PATNT_REFNO  # 100001
TRUST_ORGAN_REFNO = 1  # the trust, whose laboratory reports the tests
HOSPITAL_SITE = 1  # LOCATIONS: Demo General Infirmary
_REF_ORD = REFERENCE_DATE.toordinal()
_STREAM = "epr-medication-results"

_TABLES = (med.prescriptions, med.medication_list, med.immunisations, res.result_reports,
           res.results)
_DRUG = {d[0]: d for d in med.DRUGS}
_DRUG_REFNO = {d[0]: i + 1 for i, d in enumerate(med.DRUGS)}
_CHRONIC = [d[0] for d in med.DRUGS if d[5] == "C" and d[0] not in med.DRUG_INACTIVE]
_ACUTE = [d[0] for d in med.DRUGS if d[5] in "AP" and d[4] != "EYD"]
_INPATIENT = [d[0] for d in med.DRUGS if d[5] == "I"]
_TEST = {t[0]: t for t in res.TESTS}
# Chronic conditions drive which repeat medicines someone is on: (share of over-60s, drugs)
_REGIMENS: tuple[tuple[float, tuple[str, ...]], ...] = (
    (0.45, ("AMLO5T", "RAMI5C", "BEND25T", "LOSA50T", "AMLO10T", "LISI10T")),  # hypertension
    (0.40, ("ATOR20T", "SIMV40T", "ATOR80T")),  # lipids
    (0.15, ("METF500T", "GLIC80T", "SITA100T")),  # type 2 diabetes
    (0.12, ("APIX5T", "RIVA20T", "WARF1T", "BISO25T", "DIGO125T")),  # atrial fibrillation
    (0.12, ("SALB100I", "BECL100", "SERE250", "TIOT18", "MONT10T")),  # asthma / COPD
    (0.20, ("OMEP20C", "LANS30C")),
    (0.10, ("LEVO50T", "LEVO100T")),
    (0.12, ("SERT50T", "CITA20T", "MIRT30T", "AMIT10T")),
    (0.10, ("ASPI75T", "CLOP75T", "BISO5T", "GTN400S")),  # ischaemic heart disease
    (0.08, ("FURO40T", "SPIR25T")),  # heart failure
    (0.08, ("ALEN70T", "ADCAL")),
    (0.06, ("GABA300C", "PREG75C", "FENT12P")),
    (0.06, ("TAMS400", "ALLO100T", "FERR200T", "FOLI5T", "LACT3L", "DIPR500")),
)
_DOSE_TEXT = {
    "OD": "once a day", "OM": "each morning", "ON": "at night", "BD": "twice a day",
    "TDS": "three times a day", "QDS": "four times a day", "Q4H": "every four hours",
    "Q2H": "every two hours", "Q72H": "every 72 hours", "WEEK": "once a week",
    "PRN": "when required", "STAT": "once only",
}
_ROUTE_TEXT = {"PO": "by mouth", "IV": "intravenously", "SC": "by subcutaneous injection",
               "IM": "by intramuscular injection", "INH": "inhaled", "SL": "under the tongue",
               "TOP": "to the skin", "TD": "to the skin", "EYE": "into the affected eye",
               "NAS": "into each nostril", "PR": "rectally"}
_CHANGE_TEXT = {
    "ADR": "Stopped: adverse reaction ({})", "INEFF": "Stopped: not effective",
    "COMPL": "Course completed", "PTREQ": "Stopped at the patient's request",
    "INTER": "Stopped: interaction with new medicine", "DUPL": "Stopped: duplicate therapy",
    "TITR": "Dose changed after review",
}
_ADR = ("cough", "ankle swelling", "myalgia", "rash", "dizziness", "nausea", "diarrhoea")


@lru_cache(maxsize=65536)
def _ymd(ordinal: int) -> str:
    d = dt.date.fromordinal(ordinal)
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


_HHMM = [f"{m // 60:02d}{m % 60:02d}" for m in range(1440)]
_HH_MM = [f"{m // 60:02d}:{m % 60:02d}:00" for m in range(1440)]
EPR_LIVE = dt.date(2015, 1, 1).toordinal()  # the EPR went live: nothing is recorded before


def _dttm(ordinal: int, minute: int) -> str:
    return _ymd(ordinal) + _HHMM[minute]


@lru_cache(maxsize=65536)
def _ord(yyyymmdd: str) -> int:
    return dt.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8])).toordinal()


@lru_cache(maxsize=65536)
def _iso(ordinal: int) -> str:
    return dt.date.fromordinal(ordinal).isoformat()


def _modif(ordinal: int, minute: int) -> str:
    return f"{_iso(min(ordinal, _REF_ORD))} {_HH_MM[minute]}"


@dataclass
class _Patient:
    refno: int
    sex: str
    birth: int
    death: int | None
    gp: int | None = None
    spells: list[Row] = field(default_factory=list)
    clinics: list[Row] = field(default_factory=list)


class MedicationAndResults:
    """Observes the PAS batches, then writes each chunk's medicines and results."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"{seed}:{_STREAM}")
        self.pending: dict[int, _Patient] = {}
        self.consultants: list[int] = []
        self.nurses: list[int] = []
        self.gps: list[int] = []
        self.next = dict.fromkeys(("presc", "medls", "immun", "reprt", "reslt"), 1)
        self.out: dict[Table, list[Row]] = {t: [] for t in _TABLES}

    # -- the stream ----------------------------------------------------------------------------
    def wrap(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        done: int | None = None
        yield self._dictionaries()
        yield Batch(res.test_codes, self._tests(), 0)
        for batch in batches:
            if self.pending and batch.patients_done != done:
                yield from self._chunk(done or 0)
            done = batch.patients_done
            self._observe(batch)
            yield batch
        yield from self._chunk(done or 0)

    def _observe(self, batch: Batch) -> None:
        table = batch.table
        if table is schema.clinicians:
            for row in batch.rows:
                kind = row["PRTYP_CODE"]
                (self.consultants if kind == "CONS" else self.nurses if kind == "NURS"
                 else self.gps).append(row["PROCA_REFNO"])
        elif table is schema.patients:
            for row in batch.rows:
                death = row["DTTM_OF_DEATH"]
                self.pending[row["PATNT_REFNO"]] = _Patient(
                    row["PATNT_REFNO"], row["SEXXX_CODE"], _ord(row["DTTM_OF_BIRTH"]),
                    _ord(death[:8]) if death else None)
        elif table is schema.gp_registrations:
            for row in batch.rows:
                p = self.pending.get(row["PATNT_REFNO"])
                if p is not None and row["END_DTTM"] is None:
                    p.gp = row["PROCA_REFNO"]
        elif table is schema.provider_spells:
            for row in batch.rows:
                if row["SPELL_STATUS"] != "C" and row["PATNT_REFNO"] in self.pending:
                    self.pending[row["PATNT_REFNO"]].spells.append(row)
        elif table is schema.outpatient_attendances:
            for row in batch.rows:
                if row["ATTND_CODE"] in ("5", "6") and row["PATNT_REFNO"] in self.pending:
                    self.pending[row["PATNT_REFNO"]].clinics.append(row)

    def _chunk(self, done: int) -> Iterator[Batch]:
        for refno in sorted(self.pending):
            self._patient(self.pending[refno])
        self.pending.clear()
        for table, rows in self.out.items():
            if rows:
                yield Batch(table, rows, done)
                self.out[table] = []

    # -- dictionaries --------------------------------------------------------------------------
    @staticmethod
    def _dictionaries() -> Batch:
        rows = [{
            "DRUG_REFNO": _DRUG_REFNO[code], "DRUG_CODE": code, "DRUG_NAME": name,
            "DMD_CODE": dmd, "DMD_LEVEL": level, "FORM_CODE": form,
            "ACTIVE_FLAG": "N" if code in med.DRUG_INACTIVE else "Y",
            "MODIF_DTTM": "2024-04-01 06:00:00"}
            for code, name, dmd, level, form, *_ in med.DRUGS]
        return Batch(med.drugs, rows, 0)

    @staticmethod
    def _tests() -> list[Row]:
        return [{"TESTC_REFNO": i + 1, "TEST_CODE": t[0], "TEST_NAME": t[1],
                 "OBSCT_CODE": t[2], "SNOMED_CODE": t[3], "SNOMED_DESC": t[4],
                 "MODIF_DTTM": "2023-01-09 08:00:00"} for i, t in enumerate(res.TESTS)]

    # -- one patient ---------------------------------------------------------------------------
    def _patient(self, p: _Patient) -> None:
        rich = p.refno == RICH_PATIENT
        end = p.death if p.death is not None else _REF_ORD
        age = (end - p.birth) / 365.25
        self._medication_list(p, end, age, rich)
        for spell in p.spells:
            self._spell(p, spell, rich)
        for clinic in p.clinics:
            self._clinic(p, clinic, rich)
        self._immunisations(p, end, age, rich)
        if rich:
            self._rich_extras(p, end)

    def _prescriber(self, p: _Patient) -> int | None:
        return p.gp if p.gp is not None else (self.rng.choice(self.gps) if self.gps else None)

    # -- medication list (what the patient takes, as reconciled) -------------------------------
    def _medication_list(self, p: _Patient, end: int, age: float, rich: bool) -> None:
        r = self.rng.random
        scale = 0.05 if age < 18 else 0.35 if age < 40 else 0.7 if age < 60 else 1.0
        drugs: list[str] = []
        for share, choices in _REGIMENS:
            if rich or r() < share * scale:
                drugs.append(self.rng.choice(choices))
                if rich:  # several of each line: switches over the years
                    drugs.append(self.rng.choice(choices))
        for code in dict.fromkeys(drugs):  # once each, in a fixed order
            start = max(p.birth + 18 * 365, end - int(r() * 15 * 365))
            if start >= end:
                start = max(p.birth, end - 30)
            self._list_entry(p, code, start, end, rich)

    def _list_entry(self, p: _Patient, code: str, start: int, end: int, rich: bool) -> None:
        r = self.rng.random
        drug = _DRUG[code]
        x = r()
        stopped = x < (0.35 if rich else 0.2)
        held = not stopped and x < 0.23
        stop = start + int(r() * max(1, end - start)) if stopped else None
        reason = self.rng.choice(med.STOP_REASONS[:-1]) if stopped else None
        change = ("STOP" if stopped else "HOLD" if held else
                  "DOSE" if r() < 0.1 else "CONT" if r() < 0.7 else "NEW")
        if change == "DOSE":
            reason = "TITR"
        text = None
        if reason is not None:
            text = _CHANGE_TEXT[reason]
            if reason == "ADR":
                text = text.format(self.rng.choice(_ADR))
        recorded = min(end, max(start, end - int(r() * 400)))
        status = "S" if stopped else "H" if held else "C"
        if p.death is not None and status == "C":
            status = "F"  # the list of someone who has died is closed, not current
            stop = p.death
        self.out[med.medication_list].append({
            "MEDLS_REFNO": self.next["medls"], "PATNT_REFNO": p.refno,
            "DRUG_REFNO": _DRUG_REFNO[code], "PRESC_REFNO": None, "STATUS_CODE": status,
            "SOURCE_CODE": "GP" if r() < 0.75 else "PAT",
            "PROCA_REFNO": self._prescriber(p), "START_DATE": _ymd(start),
            "END_DATE": _ymd(stop) if stop is not None else None,
            "RECORDED_DTTM": _dttm(recorded, 540 + int(r() * 480)),
            "DOSE_TEXT": self._dose_text(drug), "ROUTE_CODE": drug[8],
            "CHANGE_CODE": change, "CHANGE_REASON": reason, "CHANGE_TEXT": text,
            "CHANGE_DATE": _ymd(stop if stop is not None else recorded)
            if change != "CONT" else None,
            "LAST_ISSUE_DATE": _ymd(max(start, (stop or end) - int(r() * 28)))
            if status != "H" else None,
            "DEL_FLAG": "Y" if r() < 0.01 else "N",
            "MODIF_DTTM": _modif(recorded, int(r() * 1440))})
        self.next["medls"] += 1

    @staticmethod
    def _dose_text(drug: tuple[Any, ...]) -> str:
        value, unit, route, freq = drug[6], drug[7], drug[8], drug[9]
        if unit in ("tablet", "capsule", "puff", "drop", "patch", "application"):
            n = "one" if value == "1" else "two" if value == "2" else value
            what = unit if value == "1" else unit + "s"
            dose = f"{n} {what}"
        else:
            dose = f"{value}{'' if unit in ('mg', 'g', 'ml') else ' '}{unit}"
        return f"{dose[0].upper()}{dose[1:]} {_ROUTE_TEXT[route]} {_DOSE_TEXT[freq]}"

    # -- prescriptions -------------------------------------------------------------------------
    def _order(self, p: _Patient, code: str, kind: str, order: int, minute: int,
               prescriber: int | None, spell: int | None, days: int | None,
               status: str, attendance: int | None = None) -> int:
        r = self.rng.random
        drug = _DRUG[code]
        _, _, _, _, _, dkind, value, unit, route, freq, per_day, pack, pack_unit = drug
        prn = freq == "PRN" or (dkind == "P" and r() < 0.6)
        qty = None
        if kind != "IP" and per_day is not None and days is not None and pack_unit in (
                "tablet", "capsule"):
            qty = str(max(pack, per_day * days) if dkind != "C" else pack)
        elif kind != "IP":
            qty = str(pack)
        start = order
        stop_reason = None
        if status == "S":
            stop_reason = self.rng.choice(("Course changed on microbiology advice",
                                           "Stopped on review", "Switched to oral",
                                           "Adverse reaction", "No longer indicated"))
        refno = self.next["presc"]
        self.out[med.prescriptions].append({
            "PRESC_REFNO": refno, "PATNT_REFNO": p.refno, "DRUG_REFNO": _DRUG_REFNO[code],
            "ORDER_NUMBER": f"RX{refno:08d}", "PRSTY_CODE": kind,
            "RXTYP_CODE": "R" if dkind == "C" and kind == "OP" and r() < 0.5 else "A",
            "PRVSP_REFNO": spell, "PROCA_REFNO": prescriber,
            "ORDER_DTTM": _dttm(order, minute), "START_DTTM": _dttm(start, minute),
            # an order still running has no end yet (the EPR writes it when it ends)
            "END_DTTM": _dttm(start + days, minute)
            if days is not None and start + days <= _REF_ORD else None,
            "STATUS_CODE": status, "DOSE_TEXT": self._dose_text(drug) + (
                " (when required)" if prn and freq != "PRN" else ""),
            "DOSE_VALUE": value, "DOSE_UNIT": unit, "ROUTE_CODE": route, "FREQ_CODE": freq,
            "FREQ_PER_DAY": per_day, "PRN_FLAG": "Y" if prn else "N",
            "QTY_VALUE": qty, "QTY_UNIT": pack_unit if qty is not None else None,
            "SUPPLY_DAYS": days if kind != "IP" else None, "STOP_REASON": stop_reason,
            "DEL_FLAG": "Y" if r() < 0.005 else "N",
            "MODIF_DTTM": _modif(order + (days or 0), int(r() * 1440)),
            "OPATT_REFNO": attendance})
        self.next["presc"] += 1
        return refno

    def _spell(self, p: _Patient, spell: Row, rich: bool) -> None:
        rng = self.rng
        r = rng.random
        admit = _ord(spell["ADMIT_DTTM"][:8])
        admit_min = int(spell["ADMIT_DTTM"][8:10]) * 60 + int(spell["ADMIT_DTTM"][10:12])
        disch = spell["DISCH_DTTM"]
        last = _ord(disch[:8]) if disch else _REF_ORD
        refno, cons = spell["PRVSP_REFNO"], spell["PROCA_REFNO"]
        # Inpatient orders: a handful, some stopped before discharge.
        n = 2 + int(r() * 4) + (6 if rich else 0)
        for _ in range(n):
            code = rng.choice(_INPATIENT if r() < 0.35 else _ACUTE)
            day = admit + int(r() * max(1, last - admit + 1))
            day = min(day, last)
            active = disch is None
            status = ("A" if active and r() < 0.8 else "S" if r() < 0.3 else "C")
            self._order(p, code, "IP", day, admit_min if day == admit else 480 + int(r() * 600),
                        cons, refno, max(1, last - day) if status != "A" else None, status)
        if disch and r() < (1.0 if rich else 0.6):  # a discharge prescription (TTO)
            for _ in range(1 + int(r() * (6 if rich else 4))):
                code = rng.choice(_ACUTE if r() < 0.6 else _CHANGES_ON_DISCHARGE)
                days = 7 if _DRUG[code][5] != "C" else 28
                presc = self._order(p, code, "DIS", last, 600 + int(r() * 300), cons, refno,
                                    days, "C" if last + days <= _REF_ORD else "A")
                if _DRUG[code][5] == "C":  # a new regular medicine joins the list
                    self._list_entry(p, code, last, p.death or _REF_ORD, rich)
                    self.out[med.medication_list][-1].update(
                        PRESC_REFNO=presc, SOURCE_CODE="HOSP", CHANGE_CODE="NEW",
                        CHANGE_REASON=None, CHANGE_TEXT="Started in hospital",
                        CHANGE_DATE=_ymd(last))
        # Observations: on admission, then once or twice a day for a short stay.
        sets = 1 + (last - admit >= 2) + (last - admit >= 7) + (6 if rich else 0)
        for i in range(sets):
            day = admit + (i + 1) // 2 if i else admit
            self._report(p, "OBS", min(day, last), min(1439, admit_min + 30) if i == 0
                         else 360 + (i % 2) * 720 + int(r() * 120), refno,
                         rng.choice(self.nurses) if self.nurses else None,
                         status="F", ill=0.35)
        if r() < 0.25 or rich:
            self._report(p, "ADM", admit, min(1439, admit_min + 45), refno,
                         rng.choice(self.nurses) if self.nurses else None, status="F")
        # Bloods for most admissions; repeated for longer ones.
        if r() < 0.5 or rich:
            for i in range(1 + min(last - admit, 8) // 4 + (3 if rich else 0)):
                day = min(last, admit + 2 * i)
                for panel in ("FBC", "UE", "CRP") if i == 0 or r() < 0.5 else ("UE",):
                    if panel == "CRP" and r() < 0.3:
                        continue
                    self._report(p, panel, day, 420 + int(r() * 180), refno, cons,
                                 status="P" if disch is None and day >= _REF_ORD - 2
                                 and r() < 0.7 else "F", ill=0.5)
            if r() < 0.15 or rich:
                self._report(p, "MRSA", admit, 600, refno, cons, status="F")

    def _clinic(self, p: _Patient, att: Row, rich: bool) -> None:
        r = self.rng.random
        day = _ord(att["APPT_DTTM"][:8])
        minute = int(att["APPT_DTTM"][8:10]) * 60 + int(att["APPT_DTTM"][10:12])
        if r() < (0.6 if rich else 0.15):
            code = self.rng.choice(_CHRONIC if r() < 0.5 else _ACUTE)
            days = 28 if _DRUG[code][5] == "C" else 7
            self._order(p, code, "OP", day, minute + 20, att["PROCA_REFNO"], None, days,
                        "C" if day + days <= _REF_ORD else "A", att["OPATT_REFNO"])
        if r() < (0.8 if rich else 0.12):
            for panel in self.rng.choice((("DIAB", "LIPID"), ("UE",), ("FBC", "UE"), ("TFT",),
                                          ("LFT", "UE"), ("MSU",))):
                self._report(p, panel, day, minute + 30, None, att["PROCA_REFNO"],
                             status="F", ill=0.2, attendance=att["OPATT_REFNO"])

    def _rich_extras(self, p: _Patient, end: int) -> None:
        """A long history of clinic monitoring for the rich fixture patient."""
        r = self.rng.random
        for i in range(24):
            day = end - 60 - i * 91 - int(r() * 20)
            panels = (("DIAB", "LIPID", "UE"), ("FBC", "UE", "LFT"), ("TFT", "UE"),
                      ("DIAB", "UE"))[i % 4]
            for panel in panels:
                self._report(p, panel, day, 540 + int(r() * 120), None, p.gp, status="F",
                             ill=0.3)
            if i % 3 == 0:
                self._report(p, "OBS", day, 560, None, p.gp, status="F", ill=0.1)
                self._report(p, "ADM", day, 565, None, p.gp, status="F")
        for i in range(18):  # repeat prescriptions issued in clinic over the years
            code = self.rng.choice(_CHRONIC)
            day = end - 30 - i * 120
            self._order(p, code, "OP", day, 600, self.rng.choice(self.consultants), None, 28,
                        "C" if day + 28 <= _REF_ORD else "A")

    # -- results -------------------------------------------------------------------------------
    def _report(self, p: _Patient, panel: str, day: int, minute: int, spell: int | None,
                who: int | None, status: str, ill: float = 0.0,
                attendance: int | None = None) -> None:
        r = self.rng.random
        repty, specimen, tests = res.PANELS[panel]
        minute = max(0, min(1439, minute))
        lab = repty != "OBS"
        reported = day + (1 if lab and (minute > 960 or panel in ("MRSA", "MSU")) else 0)
        rep_min = (minute + 90) % 1440 if lab else minute
        if lab and reported == day and rep_min < minute:
            rep_min = 1439
        refno = self.next["reprt"]
        self.out[res.result_reports].append({
            "REPRT_REFNO": refno, "PATNT_REFNO": p.refno,
            "REPORT_ID": f"{'OB' if not lab else 'LB'}{refno:08d}", "REPTY_CODE": repty,
            "SPECIMEN": specimen, "COLLECTED_DTTM": _dttm(day, minute),
            "REPORTED_DTTM": _dttm(reported, rep_min) if status == "F" or lab else None,
            # the trust answers for its laboratory's reports and for observations on its wards
            "PROCA_REFNO": who,
            "ORGAN_REFNO": TRUST_ORGAN_REFNO if lab or spell is not None else None,
            "PRVSP_REFNO": spell, "REPORT_STATUS": status,
            "DEL_FLAG": "N", "MODIF_DTTM": _modif(reported, rep_min),
            # a clinic's samples: known from the attendance itself, no draw from the stream
            # (so every other value stays as it was before the column came)
            "OPATT_REFNO": attendance})
        self.next["reprt"] += 1
        sick = r() < ill
        values: dict[str, float] = {}
        for seq, test in enumerate(tests, 1):
            self._result(p, refno, seq, test, status, sick, values, _modif(reported, rep_min))

    def _result(self, p: _Patient, report: int, seq: int, test: str, status: str, sick: bool,
                values: dict[str, float], modif: str) -> None:
        rng = self.rng
        r = rng.random
        _, _, _, _, _, units, (low, high), decimals, mean, spread = _TEST[test]
        if p.sex != "1" and test in res.FEMALE_RANGES:
            low, high = res.FEMALE_RANGES[test]
        num: str | None = None
        text: str | None = None
        comparator: str | None = None
        flag: str | None = None
        if test in res.TEXT_RESULTS:
            positive = r() < (0.15 if sick else 0.04)
            text = res.TEXT_RESULTS[test][1 if positive else 0]
            flag = "A" if positive else None
        else:
            value = self._value(test, mean, spread, sick, values)
            if test == "EGFR" and value > 90:
                comparator, value = ">", 90.0
            values[test] = value
            num = f"{value:.{decimals}f}"
            lo = float(low) if low is not None else None
            hi = float(high) if high is not None else None
            if comparator is None:
                if hi is not None and value > hi:
                    flag = "HH" if value > hi * 1.5 else "H"
                elif lo is not None and value < lo:
                    flag = "LL" if value < lo * 0.7 else "L"
                elif lo is not None or hi is not None:
                    flag = "N"
        ref_text = None
        if low is not None and high is not None:
            ref_text = f"{low} - {high}"
        elif high is not None:
            ref_text = f"< {high}"
        elif low is not None:
            ref_text = f"> {low}"
        self.out[res.results].append({
            "RESLT_REFNO": self.next["reslt"], "REPRT_REFNO": report, "PATNT_REFNO": p.refno,
            "SEQ_NO": seq, "TEST_CODE": test, "VALUE_NUM": num, "COMPARATOR": comparator,
            "VALUE_TEXT": text, "UNITS": units if num is not None else None,
            "REF_LOW": low if num is not None else None,
            "REF_HIGH": high if num is not None else None, "REF_TEXT": ref_text,
            "ABN_FLAG": flag, "RESULT_STATUS": "C" if status == "F" and r() < 0.005 else status,
            "DEL_FLAG": "Y" if r() < 0.002 else "N", "MODIF_DTTM": modif})
        self.next["reslt"] += 1

    def _value(self, test: str, mean: float, spread: float, sick: bool,
               values: dict[str, float]) -> float:
        rng = self.rng
        if test == "BMI" and "WT" in values and "HT" in values:
            return values["WT"] / (values["HT"] / 100) ** 2
        if test == "EGFR" and "CREA" in values:
            return max(5.0, 140 - values["CREA"] * 0.6 + rng.gauss(0, 5))
        if test == "NEWS2":
            return float(min(20, max(0, int(rng.expovariate(0.5 if sick else 1.2)))))
        shift = {"HR": 18, "RR": 5, "TEMP": 1.0, "SPO2": -4, "WBC": 7, "CRP": 90,
                 "HB": -20, "UREA": 5, "CREA": 50, "K": 0.6}.get(test, 0.0) if sick else 0.0
        value = rng.gauss(mean + shift, spread)
        if test in ("CRP", "ALT", "TSH", "UREA", "CREA", "WBC", "HBA1C"):
            value = abs(value) + (1 if test != "TSH" else 0.05)
        if test == "SPO2":
            value = min(100.0, value)
        return max(value, 0.0)

    # -- immunisations -------------------------------------------------------------------------
    def _immunisations(self, p: _Patient, end: int, age: float, rich: bool) -> None:
        r = self.rng.random
        plan: list[tuple[str, int]] = []
        birth = p.birth
        if end - birth < 5 * 365:  # the infant schedule, at 8, 12, 16 weeks and a year
            for weeks, codes in ((8, ("DTAP6", "MENB")), (12, ("DTAP6",)),
                                 (16, ("DTAP6", "MENB")), (52, ("MMR", "MENB"))):
                day = birth + weeks * 7 + int(r() * 10)
                if day < end:
                    plan += [(c, day) for c in codes]
        elif age < 25:
            for years, code in ((3.4, "MMR"), (14, "TDIPV"), (12.5, "HPV"), (14.2, "MENACWY")):
                day = birth + int(years * 365.25) + int(r() * 60)
                if _REF_ORD - 25 * 365 < day < end and r() < 0.9:
                    plan.append((code, day))
        if age >= 2 and age < 17 and r() < 0.5:
            for season in range(5):
                day = _REF_ORD - season * 365 - 30 - int(r() * 60)
                if birth + 2 * 365 < day < end and r() < 0.6:
                    plan.append(("FLUNAS", day))
        if age >= 18 and r() < 0.5:
            for dose in range(int(1 + r() * 3)):
                day = _ord("20210110") + dose * 180 + int(r() * 60)
                if day < end:
                    plan.append(("COVID", day))
        if age >= 65 or rich:
            for season in range(8 if rich else 5):
                day = _REF_ORD - season * 365 - 40 - int(r() * 70)
                if day < end and (rich or r() < 0.72):
                    plan.append(("FLU", day))
            if r() < 0.7 or rich:
                plan.append(("PPV23", max(birth + 65 * 365, end - int(r() * 3000))))
            if 70 <= age < 80 and r() < 0.45:
                plan.append(("SHING", end - int(r() * 1500)))
        elif age >= 18 and r() < 0.12:  # risk groups: flu, hepatitis B for some
            plan.append(("FLU", _REF_ORD - 40 - int(r() * 300)))
        if rich:
            plan += [("HEPB", _ord("20180312")), ("HEPB", _ord("20180412")),
                     ("HEPB", _ord("20180912")), ("TDIPV", _ord("20190704"))]
        plan = [(c, d) for c, d in plan if birth <= d < end and d >= EPR_LIVE]
        plan.sort(key=lambda cd: (cd[1], cd[0]))
        for code, day in plan:
            self._immunisation(p, code, day, rich)

    def _batch_number(self) -> str:
        letters = self.rng.choice(_BATCH_LETTERS) + self.rng.choice(_BATCH_LETTERS)
        return f"{letters}{self.rng.randrange(10**4, 10**5)}"

    def _immunisation(self, p: _Patient, code: str, day: int, rich: bool) -> None:
        rng = self.rng
        r = rng.random
        _, route, where, dose = _VACCINE[code]
        not_given = r() < (0.12 if rich else 0.04)
        primary = r() < 0.3
        side = "L" if r() < 0.7 else "R"
        site = {"ARM": f"{side}ARM", "THIGH": f"{side}THI", "NOSE": "NOSE"}[where]
        minute = 540 + int(r() * 480)
        recorded = min(_REF_ORD, day + (0 if primary else int(r() * 200)))
        hospital = code in ("HEPB", "COVID") and bool(self.nurses)
        reason = None if not_given else _given_reason(r())
        self.out[med.immunisations].append({
            "IMMUN_REFNO": self.next["immun"], "PATNT_REFNO": p.refno, "VACC_CODE": code,
            "GIVEN_DTTM": _dttm(day, minute), "NOT_GIVEN": "Y" if not_given else "N",
            "NOT_GIVEN_CODE": rng.choice(med.NOT_GIVEN_CODES) if not_given else None,
            "REASON_CODE": reason,
            "BATCH_NO": None if not_given else self._batch_number(),
            "EXPIRY_DATE": None if not_given else _ymd(day + 90 + int(r() * 400)),
            "SITE_CODE": None if not_given else site,
            "ROUTE_CODE": None if not_given else route,
            "DOSE_VALUE": None if not_given else dose, "DOSE_UNIT": None if not_given else "ml",
            "PRIMARY_SRC": "Y" if primary else "N",
            # hepatitis B (occupational health) and COVID-19 (the hospital hub) are given at
            # the main site by its nurses; the rest at the GP practice
            "PROCA_REFNO": (self.nurses[p.refno % len(self.nurses)] if hospital else p.gp)
            if primary else None,
            "LOCTN_REFNO": HOSPITAL_SITE if primary and hospital else None,
            "RECORDED_DTTM": _dttm(recorded, minute),
            "DEL_FLAG": "Y" if r() < 0.005 else "N",
            "MODIF_DTTM": _modif(recorded, minute)})
        self.next["immun"] += 1


_BATCH_LETTERS = "ABCDEFGHKMNPRSTW"
_VACCINE = {v[0]: v for v in med.VACCINES}
_given_reason = _Picker.of(med.GIVEN_REASONS)
_CHANGES_ON_DISCHARGE = [c for c in _CHRONIC if _DRUG[c][8] == "PO"]


def with_medication_and_results(batches: Iterator[Batch], seed: int) -> Iterator[Batch]:
    """The PAS batches unchanged, with the EPR's medicines and results after each chunk."""
    return MedicationAndResults(seed).wrap(batches)
