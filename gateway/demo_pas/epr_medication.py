"""The demo PAS's EPR half, medicines: a drug dictionary, prescriptions (orders), the
medication list, and immunisations.

Same legacy style as ``schema.py``: UPPER-CASE names, local codes, ``YYYYMMDD`` /
``YYYYMMDDHHMM`` strings, soft-deleted rows (``DEL_FLAG = 'Y'``), end dates, no foreign keys.
Doses and quantities are text as the pharmacy system keeps them, with the unit as a local
string (``mg``, ``microgram``, ``tablet``) that ``mappings/codemaps/ucum-unit.yaml`` turns into
UCUM where UCUM has a unit.

The drug dictionary carries dm+d-style codes (VMP/AMP concept ids, SNOMED CT UK drug
extension). They are synthetic demo data, chosen to look like dm+d: never use them clinically;
a real trust's dictionary comes from its dm+d release.
"""

from __future__ import annotations

from sqlalchemy import CHAR, Column, Index, Integer, String, Table

from gateway.demo_pas.schema import _dttm, _modif, _pk, metadata

drugs = Table(
    "DRUGS",
    metadata,
    _pk("DRUG_REFNO"),
    Column("DRUG_CODE", String(10), nullable=False),
    Column("DRUG_NAME", String(120), nullable=False),
    Column("DMD_CODE", String(18)),  # NULL: a local product the trust never mapped (a special)
    Column("DMD_LEVEL", String(3)),  # VMP | AMP
    Column("FORM_CODE", String(4), nullable=False),
    Column("ACTIVE_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("UX_DRUGS_CODE", "DRUG_CODE", unique=True),
    Index("IX_DRUGS_DMD", "DMD_CODE"),
)

prescriptions = Table(
    "PRESCRIPTIONS",
    metadata,
    _pk("PRESC_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("DRUG_REFNO", Integer, nullable=False),
    Column("ORDER_NUMBER", String(12), nullable=False),
    Column("PRSTY_CODE", String(3), nullable=False),  # IP | DIS | OP
    Column("RXTYP_CODE", String(1)),  # A acute | R repeat
    Column("PRVSP_REFNO", Integer),  # the spell an inpatient or discharge order belongs to
    Column("PROCA_REFNO", Integer),  # prescriber
    _dttm("ORDER_DTTM", nullable=False),
    _dttm("START_DTTM"),
    _dttm("END_DTTM"),
    Column("STATUS_CODE", String(1), nullable=False),
    Column("DOSE_TEXT", String(120)),
    Column("DOSE_VALUE", String(12)),
    Column("DOSE_UNIT", String(12)),
    Column("ROUTE_CODE", String(4)),
    Column("FREQ_CODE", String(4)),
    Column("FREQ_PER_DAY", Integer),
    Column("PRN_FLAG", CHAR(1)),
    Column("QTY_VALUE", String(12)),
    Column("QTY_UNIT", String(12)),
    Column("SUPPLY_DAYS", Integer),
    Column("STOP_REASON", String(120)),
    Column("DEL_FLAG", CHAR(1), nullable=False),
    _modif(),
    # the outpatient attendance an outpatient order was written at (added later, at the end)
    Column("OPATT_REFNO", Integer),
    Index("UX_PRESCRIPTIONS_ORDER", "ORDER_NUMBER", unique=True),
    Index("IX_PRESCRIPTIONS_PATNT", "PATNT_REFNO"),
    Index("IX_PRESCRIPTIONS_DRUG", "DRUG_REFNO"),
)

medication_list = Table(
    "MEDICATION_LIST",
    metadata,
    _pk("MEDLS_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("DRUG_REFNO", Integer, nullable=False),
    Column("PRESC_REFNO", Integer),  # the hospital order it came from, if any
    Column("STATUS_CODE", String(1), nullable=False),  # C current | S stopped | H held | F finished
    Column("SOURCE_CODE", String(4)),  # GP | PAT | HOSP: where the entry was taken from
    Column("PROCA_REFNO", Integer),  # who recorded or reconciled it
    Column("START_DATE", String(8)),
    Column("END_DATE", String(8)),
    _dttm("RECORDED_DTTM", nullable=False),
    Column("DOSE_TEXT", String(120)),
    Column("ROUTE_CODE", String(4)),
    Column("CHANGE_CODE", String(4)),  # NEW | CONT | DOSE | HOLD | STOP
    Column("CHANGE_REASON", String(5)),  # ADR | INEFF | COMPL | PTREQ | INTER | DUPL | TITR
    Column("CHANGE_TEXT", String(200)),
    Column("CHANGE_DATE", String(8)),
    Column("LAST_ISSUE_DATE", String(8)),
    Column("DEL_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("IX_MEDICATION_LIST_PATNT", "PATNT_REFNO"),
)

immunisations = Table(
    "IMMUNISATIONS",
    metadata,
    _pk("IMMUN_REFNO"),
    Column("PATNT_REFNO", Integer, nullable=False),
    Column("VACC_CODE", String(8), nullable=False),
    _dttm("GIVEN_DTTM", nullable=False),  # the date it was given, or offered and not given
    Column("NOT_GIVEN", CHAR(1), nullable=False),
    Column("NOT_GIVEN_CODE", String(4)),
    Column("REASON_CODE", String(2)),  # why it was given
    Column("BATCH_NO", String(12)),
    Column("EXPIRY_DATE", String(8)),
    Column("SITE_CODE", String(4)),
    Column("ROUTE_CODE", String(4)),
    Column("DOSE_VALUE", String(6)),
    Column("DOSE_UNIT", String(8)),
    Column("PRIMARY_SRC", CHAR(1), nullable=False),  # N: transcribed from the GP record
    Column("PROCA_REFNO", Integer),
    Column("LOCTN_REFNO", Integer),
    _dttm("RECORDED_DTTM", nullable=False),
    Column("DEL_FLAG", CHAR(1), nullable=False),
    _modif(),
    Index("IX_IMMUNISATIONS_PATNT", "PATNT_REFNO"),
)

# ---------------------------------------------------------------------------------------------
# The drug dictionary. Codes are local (what the EPR shows) and dm+d-style (VMP/AMP).
# (local code, name, dm+d id or None, level, form, kind, dose value, dose unit, route,
#  frequency, times a day, pack quantity, pack unit)
# kind: C chronic (medication lists, repeats) | A acute (short courses) | P as required
#       | I inpatient only (injections, infusions)
# ---------------------------------------------------------------------------------------------
DRUGS: tuple[tuple[str, str, str | None, str | None, str, str, str | None, str | None, str,
                   str, int | None, int, str], ...] = (
    ("PARA500T", "Paracetamol 500mg tablets", "322236009", "VMP", "TAB", "P", "1", "g", "PO",
     "QDS", 4, 100, "tablet"),
    ("IBUP400T", "Ibuprofen 400mg tablets", "329652003", "VMP", "TAB", "A", "400", "mg", "PO",
     "TDS", 3, 24, "tablet"),
    ("COCOD30T", "Co-codamol 30mg/500mg tablets", "322280009", "VMP", "TAB", "P", "2",
     "tablet", "PO", "QDS", 4, 100, "tablet"),
    ("CODE30T", "Codeine 30mg tablets", "322503009", "VMP", "TAB", "P", "30", "mg", "PO",
     "QDS", 4, 28, "tablet"),
    ("MORPH10L", "Morphine sulfate 10mg/5ml oral solution", "36128511000001102", "VMP", "SOL",
     "P", "5", "mg", "PO", "Q4H", 6, 100, "ml"),
    ("ORAMORPH", "Oramorph 10mg/5ml oral solution (Boehringer Ingelheim Ltd)",
     "3843511000001102", "AMP", "SOL", "P", "2.5", "mg", "PO", "Q4H", 6, 100, "ml"),
    ("AMOX500C", "Amoxicillin 500mg capsules", "323509004", "VMP", "CAP", "A", "500", "mg", "PO",
     "TDS", 3, 21, "capsule"),
    ("FLUC500C", "Flucloxacillin 500mg capsules", "323440000", "VMP", "CAP", "A", "500", "mg",
     "PO", "QDS", 4, 28, "capsule"),
    ("CLAR500T", "Clarithromycin 500mg tablets", "324134005", "VMP", "TAB", "A", "500", "mg",
     "PO", "BD", 2, 14, "tablet"),
    ("DOXY100C", "Doxycycline 100mg capsules", "324410007", "VMP", "CAP", "A", "100", "mg",
     "PO", "OD", 1, 8, "capsule"),
    ("NITRO100", "Nitrofurantoin 100mg modified-release capsules", "376719004", "VMP", "CAP",
     "A", "100", "mg", "PO", "BD", 2, 6, "capsule"),
    ("TRIM200T", "Trimethoprim 200mg tablets", "324306007", "VMP", "TAB", "A", "200", "mg",
     "PO", "BD", 2, 6, "tablet"),
    ("COAMX1G2", "Co-amoxiclav 1000mg/200mg powder for solution for injection vials",
     "324147002", "VMP", "INJ", "I", "1.2", "g", "IV", "TDS", 3, 1, "vial"),
    ("PIPTAZ45", "Piperacillin 4g / Tazobactam 500mg powder for solution for infusion vials",
     "407857001", "VMP", "INJ", "I", "4.5", "g", "IV", "TDS", 3, 1, "vial"),
    ("GENT80I", "Gentamicin 80mg/2ml solution for injection ampoules", "324470001", "VMP", "INJ",
     "I", "5", "mg/kg", "IV", "OD", 1, 1, "ampoule"),
    ("ENOX40I", "Enoxaparin sodium 40mg/0.4ml solution for injection pre-filled syringes",
     "10880811000001108", "VMP", "INJ", "I", "40", "mg", "SC", "OD", 1, 1, "syringe"),
    ("NACL09I", "Sodium chloride 0.9% infusion 1litre bags", "36053511000001107", "VMP", "INF",
     "I", "1000", "ml", "IV", "STAT", None, 1, "bag"),
    ("ONDA4T", "Ondansetron 4mg tablets", "376733008", "VMP", "TAB", "P", "4", "mg", "PO",
     "TDS", 3, 10, "tablet"),
    ("CYCLI50T", "Cyclizine 50mg tablets", "322819006", "VMP", "TAB", "P", "50", "mg", "PO",
     "TDS", 3, 30, "tablet"),
    ("METO10T", "Metoclopramide 10mg tablets", "317818001", "VMP", "TAB", "P", "10", "mg", "PO",
     "TDS", 3, 28, "tablet"),
    ("LACT3L", "Lactulose 3.1-3.7g/5ml oral solution", "316905006", "VMP", "SOL", "C", "10",
     "ml", "PO", "BD", 2, 300, "ml"),
    ("SENNA75T", "Senna 7.5mg tablets", "317420003", "VMP", "TAB", "P", "15", "mg", "PO", "ON",
     1, 60, "tablet"),
    ("OMEP20C", "Omeprazole 20mg gastro-resistant capsules", "317335005", "VMP", "GRC", "C",
     "20", "mg", "PO", "OD", 1, 28, "capsule"),
    ("LANS30C", "Lansoprazole 30mg gastro-resistant capsules", "317299003", "VMP", "GRC", "C",
     "30", "mg", "PO", "OD", 1, 28, "capsule"),
    ("ATOR20T", "Atorvastatin 20mg tablets", "320000009", "VMP", "TAB", "C", "20", "mg", "PO",
     "ON", 1, 28, "tablet"),
    ("ATOR80T", "Atorvastatin 80mg tablets", "320029008", "VMP", "TAB", "C", "80", "mg", "PO",
     "ON", 1, 28, "tablet"),
    ("SIMV40T", "Simvastatin 40mg tablets", "320006003", "VMP", "TAB", "C", "40", "mg", "PO",
     "ON", 1, 28, "tablet"),
    ("AMLO5T", "Amlodipine 5mg tablets", "319283006", "VMP", "TAB", "C", "5", "mg", "PO", "OD",
     1, 28, "tablet"),
    ("AMLO10T", "Amlodipine 10mg tablets", "319284000", "VMP", "TAB", "C", "10", "mg", "PO",
     "OD", 1, 28, "tablet"),
    ("RAMI5C", "Ramipril 5mg capsules", "318902006", "VMP", "CAP", "C", "5", "mg", "PO", "OD",
     1, 28, "capsule"),
    ("LISI10T", "Lisinopril 10mg tablets", "318860002", "VMP", "TAB", "C", "10", "mg", "PO",
     "OD", 1, 28, "tablet"),
    ("LOSA50T", "Losartan 50mg tablets", "318975005", "VMP", "TAB", "C", "50", "mg", "PO", "OD",
     1, 28, "tablet"),
    ("BISO25T", "Bisoprolol fumarate 2.5mg tablets", "318590006", "VMP", "TAB", "C", "2.5",
     "mg", "PO", "OD", 1, 28, "tablet"),
    ("BISO5T", "Bisoprolol fumarate 5mg tablets", "318591005", "VMP", "TAB", "C", "5", "mg",
     "PO", "OD", 1, 28, "tablet"),
    ("ATEN50T", "Atenolol 50mg tablets", "318420003", "VMP", "TAB", "C", "50", "mg", "PO", "OD",
     1, 28, "tablet"),
    ("BEND25T", "Bendroflumethiazide 2.5mg tablets", "317919004", "VMP", "TAB", "C", "2.5",
     "mg", "PO", "OM", 1, 28, "tablet"),
    ("FURO40T", "Furosemide 40mg tablets", "317972000", "VMP", "TAB", "C", "40", "mg", "PO",
     "OM", 1, 28, "tablet"),
    ("FURO20I", "Furosemide 20mg/2ml solution for injection ampoules", "317981006", "VMP",
     "INJ", "I", "40", "mg", "IV", "BD", 2, 1, "ampoule"),
    ("SPIR25T", "Spironolactone 25mg tablets", "317991003", "VMP", "TAB", "C", "25", "mg", "PO",
     "OM", 1, 28, "tablet"),
    ("ASPI75T", "Aspirin 75mg dispersible tablets", "319770004", "VMP", "DTB", "C", "75", "mg",
     "PO", "OD", 1, 28, "tablet"),
    ("CLOP75T", "Clopidogrel 75mg tablets", "319766009", "VMP", "TAB", "C", "75", "mg", "PO",
     "OD", 1, 28, "tablet"),
    ("APIX5T", "Apixaban 5mg tablets", "703907006", "VMP", "TAB", "C", "5", "mg", "PO", "BD", 2,
     56, "tablet"),
    ("RIVA20T", "Rivaroxaban 20mg tablets", "443654001", "VMP", "TAB", "C", "20", "mg", "PO",
     "OD", 1, 28, "tablet"),
    ("WARF1T", "Warfarin 1mg tablets", "319735007", "VMP", "TAB", "C", "3", "mg", "PO", "OD", 1,
     28, "tablet"),
    ("DIGO125T", "Digoxin 125microgram tablets", "318264001", "VMP", "TAB", "C", "125",
     "microgram", "PO", "OD", 1, 28, "tablet"),
    ("GTN400S", "Glyceryl trinitrate 400micrograms/dose sublingual spray", "319892000", "VMP",
     "SPR", "P", "2", "puff", "SL", "PRN", None, 1, "spray"),
    ("METF500T", "Metformin 500mg tablets", "325278007", "VMP", "TAB", "C", "500", "mg", "PO",
     "BD", 2, 56, "tablet"),
    ("GLIC80T", "Gliclazide 80mg tablets", "325238002", "VMP", "TAB", "C", "80", "mg", "PO",
     "BD", 2, 56, "tablet"),
    ("SITA100T", "Sitagliptin 100mg tablets", "423307000", "VMP", "TAB", "C", "100", "mg", "PO",
     "OD", 1, 28, "tablet"),
    ("NOVORAP", "NovoRapid 100units/ml solution for injection 3ml pre-filled FlexPen "
     "(Novo Nordisk Ltd)", "3580011000001103", "AMP", "INJ", "C", "6", "unit", "SC", "TDS", 3,
     5, "pen"),
    ("LANTUS", "Lantus 100units/ml solution for injection 3ml pre-filled SoloStar pen "
     "(Sanofi)", "9383011000001101", "AMP", "INJ", "C", "20", "unit", "SC", "ON", 1, 5, "pen"),
    ("LEVO50T", "Levothyroxine sodium 50microgram tablets", "315236000", "VMP", "TAB", "C",
     "50", "microgram", "PO", "OM", 1, 28, "tablet"),
    ("LEVO100T", "Levothyroxine sodium 100microgram tablets", "315237009", "VMP", "TAB", "C",
     "100", "microgram", "PO", "OM", 1, 28, "tablet"),
    ("PRED5T", "Prednisolone 5mg tablets", "325426005", "VMP", "TAB", "A", "30", "mg", "PO",
     "OM", 1, 28, "tablet"),
    ("SALB100I", "Salbutamol 100micrograms/dose inhaler CFC free", "320176004", "VMP", "INH",
     "P", "2", "puff", "INH", "PRN", None, 1, "inhaler"),
    ("SERE250", "Seretide 250 Evohaler (GlaxoSmithKline UK Ltd)", "2850411000001102", "AMP",
     "INH", "C", "2", "puff", "INH", "BD", 2, 1, "inhaler"),
    ("TIOT18", "Spiriva 18microgram inhalation powder capsules with HandiHaler "
     "(Boehringer Ingelheim Ltd)", "1305811000001104", "AMP", "INH", "C", "18", "microgram",
     "INH", "OD", 1, 30, "capsule"),
    ("BECL100", "Clenil Modulite 100micrograms/dose inhaler (Chiesi Ltd)", "9207411000001106",
     "AMP", "INH", "C", "2", "puff", "INH", "BD", 2, 1, "inhaler"),
    ("MONT10T", "Montelukast 10mg tablets", "320864001", "VMP", "TAB", "C", "10", "mg", "PO",
     "ON", 1, 28, "tablet"),
    ("SERT50T", "Sertraline 50mg tablets", "321948001", "VMP", "TAB", "C", "50", "mg", "PO",
     "OD", 1, 28, "tablet"),
    ("CITA20T", "Citalopram 20mg tablets", "321988007", "VMP", "TAB", "C", "20", "mg", "PO",
     "OD", 1, 28, "tablet"),
    ("MIRT30T", "Mirtazapine 30mg tablets", "322005007", "VMP", "TAB", "C", "30", "mg", "PO",
     "ON", 1, 28, "tablet"),
    ("AMIT10T", "Amitriptyline 10mg tablets", "321677000", "VMP", "TAB", "C", "10", "mg", "PO",
     "ON", 1, 28, "tablet"),
    ("GABA300C", "Gabapentin 300mg capsules", "322793008", "VMP", "CAP", "C", "300", "mg", "PO",
     "TDS", 3, 84, "capsule"),
    ("PREG75C", "Pregabalin 75mg capsules", "415160008", "VMP", "CAP", "C", "75", "mg", "PO",
     "BD", 2, 56, "capsule"),
    ("ALEN70T", "Alendronic acid 70mg tablets", "329837008", "VMP", "TAB", "C", "70", "mg", "PO",
     "WEEK", None, 4, "tablet"),
    ("ADCAL", "Adcal-D3 chewable tablets (Kyowa Kirin Ltd)", "3748111000001102", "AMP", "CHT",
     "C", "1", "tablet", "PO", "BD", 2, 56, "tablet"),
    ("FERR200T", "Ferrous sulfate 200mg tablets", "325147009", "VMP", "TAB", "C", "200", "mg",
     "PO", "OD", 1, 28, "tablet"),
    ("FOLI5T", "Folic acid 5mg tablets", "325184008", "VMP", "TAB", "C", "5", "mg", "PO", "OD",
     1, 28, "tablet"),
    ("TAMS400", "Tamsulosin 400microgram modified-release capsules", "347493008", "VMP", "CAP",
     "C", "400", "microgram", "PO", "OD", 1, 30, "capsule"),
    ("ALLO100T", "Allopurinol 100mg tablets", "330206008", "VMP", "TAB", "C", "100", "mg", "PO",
     "OD", 1, 28, "tablet"),
    ("FENT12P", "Fentanyl 12micrograms/hour transdermal patches", "407837004", "VMP", "PAT",
     "C", "1", "patch", "TD", "Q72H", None, 5, "patch"),
    ("DIPR500", "Diprobase cream (Bayer Plc)", "3384611000001100", "AMP", "CRM", "C", "1",
     "application", "TOP", "TDS", 3, 500, "gram"),
    ("CHLOR05D", "Chloramphenicol 0.5% eye drops", "330708004", "VMP", "EYD", "A", "1", "drop",
     "EYE", "Q2H", 12, 10, "ml"),
    ("OXYB15L", "Oxybutynin 2.5mg/5ml oral solution (special order)", None, None, "SOL", "C",
     "2.5", "mg", "PO", "BD", 2, 150, "ml"),
)
DRUG_INACTIVE = frozenset({"ATEN50T"})  # withdrawn from the formulary: kept for old records

# Vaccines: (local code, route, where it is usually given, dose in ml)
VACCINES: tuple[tuple[str, str, str, str], ...] = (
    ("FLU", "IM", "ARM", "0.5"),
    ("FLUNAS", "NAS", "NOSE", "0.2"),
    ("PPV23", "IM", "ARM", "0.5"),
    ("COVID", "IM", "ARM", "0.3"),
    ("SHING", "IM", "ARM", "0.5"),
    ("TDIPV", "IM", "ARM", "0.5"),
    ("MMR", "SC", "ARM", "0.5"),
    ("HPV", "IM", "ARM", "0.5"),
    ("HEPB", "IM", "ARM", "1"),
    ("DTAP6", "IM", "THIGH", "0.5"),
    ("MENB", "IM", "THIGH", "0.5"),
    ("MENACWY", "IM", "ARM", "0.5"),
)
NOT_GIVEN_CODES = ("PATO", "MEDP", "IMMU", "OSTK")  # objection, precaution, immune, no stock
GIVEN_REASONS = {"R": 80.0, "M": 12.0, "O": 5.0, "T": 3.0}
STOP_REASONS = ("ADR", "INEFF", "COMPL", "PTREQ", "INTER", "DUPL", "TITR")
ROUTES = ("PO", "IV", "SC", "IM", "INH", "SL", "TOP", "TD", "EYE", "NAS", "PR")
FREQUENCIES = ("OD", "OM", "ON", "BD", "TDS", "QDS", "Q4H", "Q2H", "Q72H", "WEEK", "PRN",
               "STAT")
