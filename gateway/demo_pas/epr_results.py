"""The demo PAS's EPR half, observations and results: a test dictionary, report headers and
one row per result under its report.

Same legacy style as ``schema.py``. A result row keeps its value as text, split as many
laboratory systems do: ``VALUE_NUM`` for a number (with ``COMPARATOR`` for ``<``/``>``),
``VALUE_TEXT`` for a textual result; units, reference limits and the abnormal flag are copied
onto each result, because ranges differ by sex and age and change over the years. The test
dictionary carries the SNOMED CT code where the trust has mapped the test (not all are).
PATNT_REFNO is kept on the result row as well as on its report, as such systems do, so a
patient's results are found without the header.
"""

from __future__ import annotations

from sqlalchemy import CHAR, Column, Index, Integer, String, Table

from gateway.demo_pas.schema import _dttm, _modif, _pk, metadata

test_codes = Table(
    "TEST_CODES",
    metadata,
    _pk("TESTC_REFNO"),
    Column("TEST_CODE", String(8), nullable=False),
    Column("TEST_NAME", String(80), nullable=False),
    Column("OBSCT_CODE", String(4), nullable=False),  # VS vital sign | LAB | SURV survey
    Column("SNOMED_CODE", String(18)),  # NULL: not mapped by the trust yet
    Column("SNOMED_DESC", String(200)),
    _modif(),
    Index("UX_TEST_CODES_CODE", "TEST_CODE", unique=True),
)

result_reports = Table(
    "RESULT_REPORTS",
    metadata,
    _pk("REPRT_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("REPORT_ID", String(12), nullable=False),  # accession or observation-set number
    Column("REPTY_CODE", String(4), nullable=False),  # OBS | HAEM | CHEM | MICR
    Column("SPECIMEN", String(20)),
    _dttm("COLLECTED_DTTM", nullable=False),
    _dttm("REPORTED_DTTM"),
    Column("PROCA_REFNO", Integer),  # who took the observations or requested the test
    Column("ORGAN_REFNO", Integer),  # the organisation answering for it (lab or ward)
    Column("PRVSP_REFNO", Integer),  # the spell it was taken in, if any
    Column("REPORT_STATUS", String(1), nullable=False),
    Column("DEL_FLAG", CHAR(1), nullable=False),
    _modif(),
    # the outpatient attendance (clinic) it was taken at, if any (added later, at the end)
    Column("OPATT_REFNO", Integer),
    Index("UX_RESULT_REPORTS_ID", "REPORT_ID", unique=True),
    Index("IX_RESULT_REPORTS_PATNT", "PATNT_REFNO"),
)

results = Table(
    "RESULTS",
    metadata,
    _pk("RESLT_REFNO"),
    Column("REPRT_REFNO", Integer, nullable=False),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("SEQ_NO", Integer, nullable=False),
    Column("TEST_CODE", String(8), nullable=False),
    Column("VALUE_NUM", String(12)),
    Column("COMPARATOR", String(2)),
    Column("VALUE_TEXT", String(200)),
    Column("UNITS", String(20)),
    Column("REF_LOW", String(12)),
    Column("REF_HIGH", String(12)),
    Column("REF_TEXT", String(40)),
    Column("ABN_FLAG", String(2)),  # H L HH LL A N
    Column("RESULT_STATUS", String(1), nullable=False),  # F final | P preliminary | C corrected
    Column("DEL_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("IX_RESULTS_PATNT", "PATNT_REFNO"),
    Index("IX_RESULTS_REPORT", "REPRT_REFNO"),
)

# (local code, name, category, SNOMED CT code or None, SNOMED description, units,
#  (low, high) by sex "1"/other or one pair for both, decimals, typical mean, spread)
TESTS: tuple[tuple[str, str, str, str | None, str | None, str | None,
                   tuple[str | None, str | None], int, float, float], ...] = (
    ("HR", "Heart rate", "VS", "364075005", "Heart rate", "bpm", ("51", "90"), 0, 78, 14),
    ("RR", "Respiratory rate", "VS", "86290005", "Respiratory rate", "/min", ("12", "20"), 0,
     17, 3),
    ("TEMP", "Temperature", "VS", "276885007", "Core body temperature", "Deg C",
     ("36.1", "38.0"), 1, 36.9, 0.6),
    ("SBP", "Systolic blood pressure", "VS", "271649006", "Systolic blood pressure", "mmHg",
     ("100", "140"), 0, 132, 18),
    ("DBP", "Diastolic blood pressure", "VS", "271650006", "Diastolic blood pressure", "mmHg",
     ("60", "90"), 0, 78, 11),
    ("SPO2", "Oxygen saturation", "VS", "431314004", "Peripheral oxygen saturation", "%",
     ("96", "100"), 0, 96.5, 2),
    ("NEWS2", "NEWS2 score", "SURV", "1104051000000101",
     "Royal College of Physicians NEWS2 (National Early Warning Score 2) total score", "score",
     (None, None), 0, 2, 2),
    ("WT", "Weight", "VS", "27113001", "Body weight", "kg", (None, None), 1, 78, 16),
    ("HT", "Height", "VS", "50373000", "Body height measure", "cm", (None, None), 0, 169, 10),
    ("BMI", "Body mass index", "VS", "60621009", "Body mass index", "kg/m2", ("18.5", "24.9"),
     1, 27, 5),
    ("HB", "Haemoglobin", "LAB", "1022431000000105", "Haemoglobin estimation", "g/L",
     ("130", "180"), 0, 132, 16),
    ("WBC", "White cell count", "LAB", "1022541000000102", "Total white blood count",
     "x10^9/L", ("4.0", "11.0"), 1, 8, 2.8),
    ("PLT", "Platelets", "LAB", "1022651000000100", "Platelet count", "x10^9/L",
     ("150", "400"), 0, 260, 70),
    ("NA", "Sodium", "LAB", "1000661000000107", "Serum sodium level", "mmol/L",
     ("133", "146"), 0, 139, 3.5),
    ("K", "Potassium", "LAB", "1000651000000109", "Serum potassium level", "mmol/L",
     ("3.5", "5.3"), 1, 4.3, 0.5),
    ("UREA", "Urea", "LAB", None, None, "mmol/L", ("2.5", "7.8"), 1, 6.0, 2.5),
    ("CREA", "Creatinine", "LAB", "1000731000000107", "Serum creatinine level", "umol/L",
     ("59", "104"), 0, 85, 25),
    ("EGFR", "eGFR (CKD-EPI)", "LAB", "1011481000000105",
     "eGFR (estimated glomerular filtration rate) using creatinine Chronic Kidney Disease "
     "Epidemiology Collaboration equation per 1.73 square metres", "mL/min/1.73m2",
     ("90", None), 0, 75, 20),
    ("CRP", "C-reactive protein", "LAB", "1001371000000100",
     "Serum C reactive protein level", "mg/L", (None, "5"), 0, 12, 30),
    ("HBA1C", "HbA1c (IFCC)", "LAB", "999791000000106",
     "Haemoglobin A1c level - International Federation of Clinical Chemistry and Laboratory "
     "Medicine standardised", "mmol/mol", ("20", "41"), 0, 48, 12),
    ("CHOL", "Total cholesterol", "LAB", "1005671000000105", "Serum cholesterol level",
     "mmol/L", (None, "5.0"), 1, 5.0, 1.1),
    ("ALT", "Alanine aminotransferase", "LAB", "1018251000000107",
     "Serum alanine aminotransferase level", "U/L", (None, "33"), 0, 25, 15),
    ("TSH", "Thyroid stimulating hormone", "LAB", "1022791000000101", "Serum TSH level",
     "mU/L", ("0.27", "4.20"), 2, 2.0, 1.2),
    ("MRSA", "MRSA screen", "LAB", None, None, None, (None, None), 0, 0, 0),
    ("MSU", "Urine culture", "LAB", None, None, None, (None, None), 0, 0, 0),
)
FEMALE_RANGES = {"HB": ("115", "165"), "CREA": ("45", "84")}
# Groups ordered together: (report type, specimen, tests)
PANELS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "OBS": ("OBS", None, ("HR", "RR", "TEMP", "SBP", "DBP", "SPO2", "NEWS2")),
    "ADM": ("OBS", None, ("WT", "HT", "BMI")),
    "FBC": ("HAEM", "Blood", ("HB", "WBC", "PLT")),
    "UE": ("CHEM", "Serum", ("NA", "K", "UREA", "CREA", "EGFR")),
    "CRP": ("CHEM", "Serum", ("CRP",)),
    "LFT": ("CHEM", "Serum", ("ALT",)),
    "DIAB": ("CHEM", "Blood", ("HBA1C",)),
    "LIPID": ("CHEM", "Serum", ("CHOL",)),
    "TFT": ("CHEM", "Serum", ("TSH",)),
    "MRSA": ("MICR", "Nasal swab", ("MRSA",)),
    "MSU": ("MICR", "Urine", ("MSU",)),
}
TEXT_RESULTS = {"MRSA": ("MRSA not isolated", "MRSA isolated"),
                "MSU": ("No significant growth", "Escherichia coli >10^5 cfu/ml")}
ABNORMAL_FLAGS = ("H", "L", "HH", "LL", "A", "N")
RESULT_STATUSES = ("F", "P", "C")
OBS_CATEGORIES = ("VS", "LAB", "SURV")
