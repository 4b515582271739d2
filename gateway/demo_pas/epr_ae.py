"""The demo's A&E department system: ``AE_ATTENDANCES``, one row per attendance.

A separate module (and table) because in a trust the emergency department usually runs its
own system beside the PAS, and the gateway serves its attendances as Encounters from a
source of their own (``mappings/demo-pas/Encounter.ae.sql.yaml``). Legacy-shaped like the
rest: upper-case names, local codes, ``YYYYMMDDHHMM`` strings, a soft-delete flag.

Rows come from a random stream of their own (seeded from the demo's seed), drawn after each
patient's PAS rows, so adding this table leaves every existing table's rows byte-identical.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import TYPE_CHECKING, Any

from sqlalchemy import CHAR, Column, Index, Integer, String, Table

from gateway.demo_pas.schema import _dttm, _modif, _pk, metadata

if TYPE_CHECKING:
    from gateway.demo_pas.generate import DemoPasGenerator

Row = dict[str, Any]

ae_attendances = Table(
    "AE_ATTENDANCES",
    metadata,
    _pk("AEATT_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("AE_NUMBER", String(12), nullable=False),
    _dttm("ARRIVAL_DTTM", nullable=False),
    _dttm("DEPART_DTTM"),
    Column("AE_STATUS", String(1), nullable=False),  # A in department, D departed
    Column("ARRMODE_CODE", String(1)),   # 1 ambulance, 2 other
    Column("ATTCAT_CODE", String(1), nullable=False),  # 1 first, 2 planned, 3 unplanned f/u
    Column("DISPOSAL_CODE", String(2)),
    Column("PROCA_REFNO", Integer),
    Column("LOCTN_REFNO", Integer),
    Column("DEL_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("UX_AE_ATTENDANCES_NUMBER", "AE_NUMBER", unique=True),
    Index("IX_AE_ATTENDANCES_PATNT", "PATNT_REFNO"),
    Index("IX_AE_ATTENDANCES_ARRIVAL", "ARRIVAL_DTTM"),
)

TABLES = (ae_attendances,)
_STREAM = 0xAE  # this table's stream: the demo seed with these bits flipped
_DISPOSALS = ("01", "02", "03", "03", "03", "04", "07")  # admitted ... left before treatment


def _when(ordinal: int, minute: int) -> str:
    d = dt.date.fromordinal(ordinal)
    return f"{d:%Y%m%d}{minute // 60:02d}{minute % 60:02d}"


class AeAttendances:
    """Adds A&E attendances to the patients a DemoPasGenerator makes."""

    def __init__(self, gen: DemoPasGenerator, seed: int) -> None:
        self.gen = gen
        self.rng = random.Random(seed ^ _STREAM)
        self.next_refno = 1

    def _departments(self) -> list[int]:
        # The emergency departments of the first two sites (a site's wards follow it).
        wards = self.gen.wards
        return [wards[0] - 1, wards[8] - 1]

    def _row(self, refno: int, arrive: int, minute: int, stay: int | None, cat: str,
             ambulance: bool, deleted: bool, ref_ord: int) -> Row:
        r = self.rng.random
        depart = None
        disposal = None
        if stay is not None:
            end = arrive * 1440 + minute + stay
            depart = _when(end // 1440, end % 1440)
            disposal = self.rng.choice(_DISPOSALS)
        cons = self.gen.consultants_by_spec.get("300") or list(self.gen.consultant_spec)
        row = {
            "AEATT_REFNO": self.next_refno, "PATNT_REFNO": refno,
            "AE_NUMBER": f"AE{self.next_refno:08d}", "ARRIVAL_DTTM": _when(arrive, minute),
            "DEPART_DTTM": depart, "AE_STATUS": "D" if stay is not None else "A",
            "ARRMODE_CODE": "1" if ambulance else "2", "ATTCAT_CODE": cat,
            "DISPOSAL_CODE": disposal,
            "PROCA_REFNO": self.rng.choice(cons) if r() < 0.7 else None,
            "LOCTN_REFNO": self.rng.choice(self._departments()),
            "DEL_FLAG": "Y" if deleted else "N",
            "MODIF_DTTM": f"{dt.date.fromordinal(min(arrive + 1, ref_ord)):%Y-%m-%d} 09:00:00"}
        self.next_refno += 1
        return row

    def patient(self, refno: int, birth: int, death: tuple[int, int] | None, ref_ord: int,
                out: dict[Table, list[Row]]) -> None:
        """A&E attendances within the last five years of the patient's life (mean ~0.5;
        about 2% attend often)."""
        r = self.rng.random
        end_ord = death[0] if death else ref_ord
        lo = max(birth, ref_ord - 5 * 365)
        if end_ord <= lo:
            return
        x = r()
        n = 0 if x < 0.70 else 1 if x < 0.88 else 2 if x < 0.95 else 3 if x < 0.98 else (
            5 + int(r() * 15))
        rows = out[ae_attendances]
        for day in sorted(lo + int(r() * (end_ord - lo)) for _ in range(n)):
            minute = int(r() * 1440)
            current = day >= ref_ord - 1 and death is None and r() < 0.5
            stay = None if current else 30 + int(r() * 600)
            cat = "1" if r() < 0.9 else ("2" if r() < 0.5 else "3")
            rows.append(self._row(refno, day, minute, stay, cat, r() < 0.3, r() < 0.01,
                                  ref_ord))

    def fixtures(self, out: dict[Table, list[Row]], ref_ord: int) -> None:
        """The documented patients' attendances: Jane Smith (100001) attended twice, once
        recorded in error (soft-deleted)."""
        rows = out[ae_attendances]
        for day, minute, stay, deleted in ((dt.date(2023, 9, 4), 700, 30, False),
                                           (dt.date(2024, 6, 2), 130, 240, False),
                                           (dt.date(2024, 6, 3), 100, 60, True)):
            row = self._row(100001, day.toordinal(), minute, stay, "1", False, deleted,
                            ref_ord)
            row["DISPOSAL_CODE"] = "01" if day.year == 2023 else "03"
            rows.append(row)
