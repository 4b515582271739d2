"""Schema of the demo PAS: a legacy Patient Administration System, iPM/Lorenzo-flavoured.

Deliberately legacy: UPPERCASE names (SQLAlchemy quotes them, so they stay upper case on
PostgreSQL), local codes instead of national ones, dates kept as strings (`YYYYMMDD`,
`YYYYMMDDHHMM`, MODIF_DTTM `YYYY-MM-DD HH:MM:SS`), NULL END_DTTM meaning "current", and no
foreign keys - like many real PAS the integrity lives in the application, which is exactly what
the gateway has to cope with. Only portable types (String, Integer, CHAR) and explicit integer
keys are used, so the same tables build on SQLite, PostgreSQL and SQL Server.

Uniqueness that must hold for nullable columns (NHS_NUMBER) is a property of the data, not a
constraint: SQL Server's UNIQUE allows a single NULL only.
"""

from __future__ import annotations

from sqlalchemy import CHAR, Column, Index, Integer, MetaData, String, Table

metadata = MetaData()


def _pk(name: str) -> Column[int]:
    # autoincrement=False: the generator assigns every key, so no IDENTITY/SERIAL is created.
    return Column(name, Integer, primary_key=True, autoincrement=False)


def _modif() -> Column[str]:
    return Column("MODIF_DTTM", String(19), nullable=False)


def _dttm(name: str, nullable: bool = True) -> Column[str]:
    return Column(name, String(12), nullable=nullable)


organisations = Table(
    "ORGANISATIONS",
    metadata,
    _pk("ORGAN_REFNO"),
    Column("ODS_CODE", String(10), nullable=False),
    Column("ORG_NAME", String(100), nullable=False),
    Column("ORGTY_CODE", String(4), nullable=False),
    Column("ADDR_LINE1", String(50)),
    Column("ADDR_LINE2", String(50)),
    Column("ADDR_LINE3", String(50)),
    Column("PCODE", String(10)),
    Column("TEL_NO", String(20)),
    Column("PARENT_ODS", String(10)),
    Column("ACTIVE_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("UX_ORGANISATIONS_ODS", "ODS_CODE", unique=True),
)

clinicians = Table(
    "CLINICIANS",
    metadata,
    _pk("PROCA_REFNO"),
    Column("PRTYP_CODE", String(4), nullable=False),
    Column("TITLE", String(10)),
    Column("SURNAME", String(50), nullable=False),
    Column("FORENAME", String(50)),
    Column("SEXXX_CODE", String(1)),
    Column("GMC_CODE", String(10)),
    Column("GMP_CODE", String(10)),
    Column("SDS_USER_ID", String(12)),
    Column("MAIN_SPECT_CODE", String(5)),
    Column("ORGAN_REFNO", Integer),
    Column("TEL_NO", String(20)),
    Column("ACTIVE_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("IX_CLINICIANS_ORGAN", "ORGAN_REFNO"),
)

patients = Table(
    "PATIENTS",
    metadata,
    _pk("PATNT_REFNO"),
    Column("PASID", String(10), nullable=False),
    Column("NHS_NUMBER", String(10)),
    Column("NNNTS_CODE", String(2)),
    Column("TITLE", String(10)),
    Column("SURNAME", String(50), nullable=False),
    Column("FORENAME", String(50), nullable=False),
    Column("SECOND_FORENAME", String(50)),
    Column("SEXXX_CODE", String(1), nullable=False),
    Column("DTTM_OF_BIRTH", String(8), nullable=False),
    Column("DTTM_OF_DEATH", String(12)),
    Column("ETHGR_CODE", String(2)),
    Column("MARRY_CODE", String(1)),
    Column("HOME_TEL", String(20)),
    Column("MOBILE_TEL", String(20)),
    Column("EMAIL_ADDR", String(80)),
    Column("LANG_CODE", String(3)),
    Column("ARCHV_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("UX_PATIENTS_PASID", "PASID", unique=True),
    Index("IX_PATIENTS_SURNAME", "SURNAME"),
    Index("IX_PATIENTS_NHS", "NHS_NUMBER"),
    Index("IX_PATIENTS_DOB", "DTTM_OF_BIRTH"),
    Index("IX_PATIENTS_SEX_SURNAME", "SEXXX_CODE", "SURNAME", "PATNT_REFNO"),
)

patient_ids = Table(
    "PATIENT_IDS",
    metadata,
    _pk("PATID_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("PITYP_CODE", String(5), nullable=False),
    Column("IDENTIFIER", String(20), nullable=False),
    _dttm("START_DTTM"),
    _dttm("END_DTTM"),
    Index("IX_PATIENT_IDS_PATNT", "PATNT_REFNO"),
    Index("IX_PATIENT_IDS_IDENTIFIER", "IDENTIFIER"),
)

addresses = Table(
    "ADDRESSES",
    metadata,
    _pk("ADDSS_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("ADTYP_CODE", String(4), nullable=False),
    Column("LINE1", String(50)),
    Column("LINE2", String(50)),
    Column("LINE3", String(50)),
    Column("LINE4", String(50)),
    Column("PCODE", String(10)),
    _dttm("START_DTTM"),
    _dttm("END_DTTM"),
    Index("IX_ADDRESSES_PATNT", "PATNT_REFNO"),
    Index("IX_ADDRESSES_PCODE", "PCODE"),
)

gp_registrations = Table(
    "GP_REGISTRATIONS",
    metadata,
    _pk("GPREG_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("PROCA_REFNO", Integer),
    Column("ORGAN_REFNO", Integer),
    _dttm("START_DTTM"),
    _dttm("END_DTTM"),
    Index("IX_GP_REGISTRATIONS_PATNT", "PATNT_REFNO"),
)

locations = Table(
    "LOCATIONS",
    metadata,
    _pk("LOCTN_REFNO"),
    Column("LOCTN_CODE", String(10), nullable=False),
    Column("LOCTN_NAME", String(80), nullable=False),
    Column("LOCTY_CODE", String(4), nullable=False),
    Column("PARENT_REFNO", Integer),
    Column("ORGAN_REFNO", Integer),
    Column("ADDR_LINE1", String(50)),
    Column("ADDR_LINE2", String(50)),
    Column("ADDR_LINE3", String(50)),
    Column("PCODE", String(10)),
    Column("TEL_NO", String(20)),
    Column("ACTIVE_FLAG", CHAR(1), nullable=False),
    _modif(),
)

provider_spells = Table(
    "PROVIDER_SPELLS",
    metadata,
    _pk("PRVSP_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("SPELL_NUMBER", String(12), nullable=False),
    _dttm("ADMIT_DTTM", nullable=False),
    _dttm("DISCH_DTTM"),
    Column("SPELL_STATUS", String(1), nullable=False),
    Column("PATCL_CODE", String(1)),
    Column("ADMET_CODE", String(2)),
    Column("ADSOR_CODE", String(2)),
    Column("DISMT_CODE", String(1)),
    Column("DISDE_CODE", String(2)),
    Column("PROCA_REFNO", Integer),
    Column("LOCTN_REFNO", Integer),
    Column("MAIN_SPECT_CODE", String(5)),
    _modif(),
    Index("UX_PROVIDER_SPELLS_NUMBER", "SPELL_NUMBER", unique=True),
    Index("IX_PROVIDER_SPELLS_PATNT", "PATNT_REFNO"),
    Index("IX_PROVIDER_SPELLS_ADMIT", "ADMIT_DTTM"),
)

outpatient_attendances = Table(
    "OUTPATIENT_ATTENDANCES",
    metadata,
    _pk("OPATT_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("ATTENDANCE_ID", String(12), nullable=False),
    _dttm("APPT_DTTM", nullable=False),
    Column("ATTND_CODE", String(1), nullable=False),
    Column("FIRST_ATTND", String(1)),
    Column("OUTCM_CODE", String(1)),
    Column("PROCA_REFNO", Integer),
    Column("LOCTN_REFNO", Integer),
    Column("MAIN_SPECT_CODE", String(5)),
    _modif(),
    Index("UX_OUTPATIENT_ATTENDANCES_ID", "ATTENDANCE_ID", unique=True),
    Index("IX_OUTPATIENT_ATTENDANCES_PATNT", "PATNT_REFNO"),
)
