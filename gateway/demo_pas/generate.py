"""Deterministic synthetic data for the demo PAS.

One `random.Random(seed)` stream drives everything, consumed in a fixed order (reference data,
then patient after patient with all of that patient's child rows), so the same seed and scale
give the same rows whatever the chunk size or target database. Rows are produced lazily, one
chunk of patients at a time, so a million-patient build never holds the data set in memory.

All dates are relative to the fixed `REFERENCE_DATE` ("today" in the data), not the wall clock,
so a rebuild next year gives the same rows.

Names, places and numbers are invented or taken from ranges reserved for fiction: NHS numbers in
the 999 test range, telephone numbers from Ofcom's drama ranges, e-mail at example.com.
"""

from __future__ import annotations

import bisect
import datetime as dt
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Table

from gateway.demo_pas import epr_ae, schema

Row = dict[str, Any]

REFERENCE_DATE = dt.date(2026, 11, 23)
FIRST_PATNT_REFNO = 100001
TRUST_ORGAN_REFNO = 1
TRUST_ODS = "RX1"
TRUST_NAME = "Demo Teaching Hospitals NHS Foundation Trust"

# ---------------------------------------------------------------------------------------------
# Code distributions. The keys are the local codes the generator can emit; tests check each
# one against mappings/codemaps/*.yaml, so a code added here without a map entry fails there.
# ---------------------------------------------------------------------------------------------
SEX_WEIGHTS = {"1": 49.0, "2": 49.0, "9": 1.0, "X": 1.0}
ETHNIC_WEIGHTS = {
    "WB": 72.0, "WI": 1.0, "WO": 5.0, "MC": 0.8, "MA": 0.4, "MS": 0.6, "MO": 0.5,
    "AI": 3.0, "AP": 2.5, "AB": 1.0, "AO": 1.5, "BC": 1.0, "BA": 2.2, "BO": 0.5,
    "CH": 0.7, "OT": 1.0, "NS": 4.0, "ZZ": 0.2,  # ZZ: legacy code with no national equivalent
}
ETHNIC_NULL_RATE = 0.02
MARITAL_ADULT_WEIGHTS = {"M": 44.0, "S": 34.0, "D": 8.0, "W": 6.0, "P": 2.0, "C": 1.0, "U": 5.0}
NNNTS_WEIGHTS = {
    "01": 92.0, "02": 4.0, "03": 1.0, "04": 0.8, "05": 0.5, "06": 0.5, "07": 0.2, "08": 0.0,
}  # 08 (baby under six weeks) is set from the age, not drawn
LANGUAGES = ("ENG", "POL", "URD", "PAN", "BEN", "GUJ", "ARA", "SOM", "CHI", "POR", "ROM",
             "LIT", "TUR", "FRE", "FAR", "KUR", "TAM", "HIN", "SPA", "ITA", "WEL", "BSL")
# Main language by ethnic group: English for most; the others make the data look lived-in.
_LANG_BY_ETHNIC: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "WO": (("ENG", "POL", "ROM", "LIT", "POR", "ITA", "SPA", "FRE", "TUR"),
           (40, 25, 10, 7, 6, 4, 3, 3, 2)),
    "AI": (("ENG", "GUJ", "PAN", "HIN", "TAM"), (60, 15, 12, 8, 5)),
    "AP": (("ENG", "URD", "PAN"), (60, 30, 10)),
    "AB": (("ENG", "BEN"), (55, 45)),
    "AO": (("ENG", "TAM", "FAR", "ARA"), (60, 15, 15, 10)),
    "BA": (("ENG", "SOM", "FRE", "POR"), (65, 25, 6, 4)),
    "CH": (("ENG", "CHI"), (55, 45)),
    "OT": (("ENG", "ARA", "KUR", "FAR", "TUR"), (50, 20, 10, 10, 10)),
    "WB": (("ENG", "WEL", "BSL"), (99.4, 0.4, 0.2)),
}
ADDRESS_TYPES = ("HOME", "TEMP", "CORR")
ORG_TYPES = ("GPP", "NHST")
LOCATION_TYPES = ("SITE", "WARD", "CLIN")
SPELL_STATUSES = ("A", "D", "C")
PATIENT_CLASSES = ("1", "2")
ADMET_ELECTIVE = {"11": 70.0, "12": 15.0, "13": 15.0}
ADMET_EMERGENCY = {"21": 60.0, "22": 15.0, "23": 2.0, "24": 10.0, "28": 8.0, "81": 5.0}
ADMET_MATERNITY = "31"
ADSOR_WEIGHTS = {"19": 90.0, "29": 2.0, "51": 4.0, "54": 1.5, "65": 1.0, "85": 1.0, "87": 0.5}
DISMT_LIVE = {"1": 96.0, "2": 3.0, "3": 0.3}  # 4 (died) is set from the death date
DISDE_LIVE = {"19": 88.0, "29": 2.0, "51": 3.0, "54": 2.5, "65": 1.5, "85": 2.5, "87": 0.5}
DISDE_DIED = "79"
ATTND_WEIGHTS = {"5": 74.0, "6": 5.0, "7": 1.0, "2": 6.0, "3": 8.0, "4": 6.0}
OUTCOME_WEIGHTS = {"1": 30.0, "2": 50.0, "3": 20.0}

# (main specialty code, share of consultants); 420 and 501 are also chosen by age/admission.
CONSULTANT_SPECIALTIES = {
    "100": 10, "101": 4, "110": 8, "120": 4, "130": 4, "160": 2, "170": 2, "300": 10, "301": 5,
    "302": 3, "320": 6, "330": 3, "340": 4, "361": 3, "370": 3, "400": 3, "410": 3, "420": 6,
    "430": 5, "501": 4, "502": 4, "800": 2,
}
GP_SPECIALTY = "600"

# ---------------------------------------------------------------------------------------------
# Names and places (invented; common UK names in rough frequency order).
# ---------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


SURNAMES = _words("""
SMITH JONES WILLIAMS TAYLOR BROWN DAVIES EVANS WILSON THOMAS JOHNSON ROBERTS ROBINSON THOMPSON
WRIGHT WALKER WHITE EDWARDS HUGHES GREEN HALL LEWIS HARRIS CLARKE JACKSON WOOD TURNER MARTIN
COOPER HILL WARD MORRIS MOORE CLARK LEE KING BAKER HARRISON MORGAN ALLEN JAMES SCOTT PHILLIPS
WATSON DAVIS PARKER PRICE BENNETT YOUNG GRIFFITHS MITCHELL KELLY COOK CARTER RICHARDSON BAILEY
COLLINS BELL SHAW MURPHY MILLER COX RICHARDS MARSHALL ANDERSON SIMPSON ELLIS ADAMS WILKINSON
FOSTER CHAPMAN POWELL WEBB ROGERS GRAY MASON HUNT CAMPBELL MATTHEWS OWEN PALMER HOLMES MILLS
BARNES KNIGHT LLOYD BUTLER RUSSELL BARKER FISHER STEVENS JENKINS MURRAY DIXON HARVEY GRAHAM
PEARSON FLETCHER WALSH GIBSON HOWARD ANDREWS STEWART ELLIOTT REYNOLDS SAUNDERS PAYNE FOX FORD
PEARCE DAY BROOKS WEST LAWRENCE COLE ATKINSON BRADLEY SPENCER GILL DAWSON BALL BURTON O'BRIEN
WATTS ROSE BOOTH PERRY RYAN GRANT WELLS ARMSTRONG FRANCIS REES HAYES HART HUDSON NEWMAN BARRETT
WEBSTER HUNTER GREGORY CARR LOWE PAGE MARSH RILEY DUNN WOODS STONE PARSONS CHARLTON HOLLAND
OLIVER REID MACDONALD O'NEILL MCCARTHY DOYLE BYRNE KENNEDY MOSS HOPKINS HOLT PICKERING BROWNE
SMYTH HOLDEN BARLOW SYKES HIRST HAIGH BRIGGS CROWTHER HARGREAVES ACKROYD LISTER SUTCLIFFE
BOTTOMLEY BRAITHWAITE SMITH-JONES ASHWORTH WHITELEY HEATON MOUNTAIN
""")
SURNAMES_SOUTH_ASIAN = _words("""KHAN PATEL SINGH BEGUM ALI HUSSAIN AHMED KAUR AKHTAR MAHMOOD IQBAL
RAHMAN CHOWDHURY MIAH SHAH SHARMA MISTRY BIBI SIDDIQUI QURESHI""")
SURNAMES_AFRICAN = _words("""OKONKWO ADEBAYO MENSAH OKAFOR ABDI MOHAMED OSEI BOATENG NWOSU FARAH
ADEYEMI ASANTE""")
SURNAMES_CHINESE = _words("WONG CHEN LI ZHANG WANG LIU CHAN LAM YANG HUANG")
SURNAMES_EAST_EUROPEAN = _words("""NOWAK KOWALSKI WOJCIK KAMINSKI LEWANDOWSKI POPESCU IONESCU
KAZLAUSKAS PETRAUSKAS ZIELINSKI""")

FORENAMES_MALE = _words("""
JOHN DAVID MICHAEL PAUL ANDREW PETER JAMES ROBERT MARK RICHARD STEPHEN CHRISTOPHER IAN ANTHONY
WILLIAM THOMAS GEORGE KEVIN GARY BRIAN ALAN KEITH MARTIN DANIEL STEVEN SIMON NEIL GRAHAM
JONATHAN MATTHEW PHILIP TREVOR COLIN DEREK RAYMOND KENNETH DONALD RONALD GEOFFREY BARRY TERENCE
ROY DENNIS FRANK HARRY JACK OLIVER CHARLIE OSCAR NOAH ARTHUR LEO ALFIE HENRY FREDDIE ARCHIE
THEO JOSHUA SAMUEL BENJAMIN JOSEPH LUKE RYAN ADAM JAMIE LIAM CONNOR CALLUM KIERAN NATHAN BEN
LEWIS TOM DYLAN ETHAN JACOB MASON LOGAN LUCAS ISAAC FINLEY ALEXANDER EDWARD HUGO TOBY ELLIOT
REUBEN MAX SEBASTIAN FREDERICK ALBERT STANLEY ERNEST WALTER LEONARD NORMAN CYRIL HAROLD SIDNEY
GORDON MALCOLM STUART CRAIG DARREN LEE WAYNE DEAN SCOTT ROSS GLEN CARL SHAUN ASHLEY DALE
""")
FORENAMES_FEMALE = _words("""
JANE SARAH SUSAN MARGARET ELIZABETH MARY PATRICIA LINDA KAREN JULIE HELEN CAROL CHRISTINE
ALISON NICOLA CLAIRE LISA EMMA RACHEL JOANNE AMANDA JACQUELINE DEBORAH ANNE JENNIFER KATHLEEN
DOROTHY JOAN BARBARA PAMELA SHEILA BRENDA VALERIE JEAN IRENE DORIS EILEEN MAUREEN PAULINE
GILLIAN ANGELA TRACEY DAWN MICHELLE KELLY LOUISE SAMANTHA VICTORIA CHARLOTTE REBECCA LAURA
HANNAH AMY SOPHIE JESSICA LUCY KATIE CHLOE EMILY OLIVIA AMELIA ISLA AVA MIA ISABELLA GRACE
POPPY ELLA LILY EVIE SOPHIA FREYA ALICE FLORENCE ROSIE MATILDA IVY WILLOW PHOEBE SIENNA RUBY
ELSIE DAISY HOLLY MOLLY MEGAN BETHANY ABIGAIL GEORGIA JASMINE NATALIE STACEY KIRSTY GEMMA
HAYLEY DONNA WENDY LORRAINE BEVERLEY JUNE IRIS EDNA MAVIS WINIFRED ETHEL VERA AUDREY HAZEL
BERYL MARJORIE SYLVIA ROSEMARY DIANE JANET CAROLINE FIONA
""")
FORENAMES_SOUTH_ASIAN = (_words("""MOHAMMED IMRAN ARJUN RAVI SANJAY AMIR HASSAN ZAIN RAJESH VIKRAM
OMAR YUSUF"""),
                         _words("""PRIYA AISHA FATIMA SANA ANJALI NEHA ZARA AMINA SHABNAM REHANA
SUNITA NADIA"""))
FORENAMES_AFRICAN = (_words("CHUKWUEMEKA KWAME OLUWASEUN ABDI EMEKA KOFI"),
                     _words("NGOZI ABENA FOLAKE AYAN AMARA ADWOA"))
FORENAMES_CHINESE = (_words("WEI JUN HAO MING"), _words("MEI XIN LING YAN"))
FORENAMES_EAST_EUROPEAN = (_words("PIOTR TOMASZ ANDREI MARIUS JONAS KRZYSZTOF"),
                           _words("AGNIESZKA KATARZYNA IOANA ELENA RUTA MAGDALENA"))
_NAME_POOLS: dict[str, tuple[list[str], tuple[list[str], list[str]]]] = {
    "AI": (SURNAMES_SOUTH_ASIAN, FORENAMES_SOUTH_ASIAN),
    "AP": (SURNAMES_SOUTH_ASIAN, FORENAMES_SOUTH_ASIAN),
    "AB": (SURNAMES_SOUTH_ASIAN, FORENAMES_SOUTH_ASIAN),
    "AO": (SURNAMES_SOUTH_ASIAN, FORENAMES_SOUTH_ASIAN),
    "BA": (SURNAMES_AFRICAN, FORENAMES_AFRICAN),
    "CH": (SURNAMES_CHINESE, FORENAMES_CHINESE),
    "WO": (SURNAMES_EAST_EUROPEAN, FORENAMES_EAST_EUROPEAN),
}

STREETS = _words("""Church Station Park Victoria Manor Mill Queens Kings Green Grange Meadow Chapel
Highfield School Springfield Windsor Albert York Oak Beech Ash Elm Willow Cedar Sycamore Hawthorn
Orchard Westfield Moor Bridge Castle Hall Marlborough Cavendish Stanley Alexandra Vicarage Rectory
Brook Hollin Scotland Otley Harrogate Wakefield Skipton Ilkley Tadcaster Wetherby Selby Pontefract
Howard Clarence Salisbury Devonshire Wellington Nelson Trafalgar Cromwell Fountains Beverley
Whitby Lime Chestnut Rowan Heather Primrose Bluebell Foxglove Lavender""")
STREET_SUFFIXES = ("Road", "Street", "Lane", "Avenue", "Close", "Drive", "Way", "Crescent",
                   "Grove", "Terrace", "Gardens", "Place", "Court", "View", "Rise", "Mount")
# (town, county, weight, real outward codes, localities). The trust's catchment is West and
# North Yorkshire; a tail of other towns stands for patients who moved or were visiting.
TOWNS: tuple[tuple[str, str, float, tuple[str, ...], tuple[str, ...]], ...] = (
    ("Leeds", "West Yorkshire", 30, ("LS1", "LS2", "LS6", "LS7", "LS8", "LS11", "LS12", "LS15",
     "LS17", "LS28"), ("Headingley", "Roundhay", "Chapel Allerton", "Armley", "Beeston",
                       "Pudsey")),
    ("Bradford", "West Yorkshire", 12, ("BD1", "BD3", "BD5", "BD7", "BD8", "BD9", "BD10"),
     ("Manningham", "Heaton", "Shipley", "Idle", "Thornbury")),
    ("Wakefield", "West Yorkshire", 9, ("WF1", "WF2", "WF3", "WF4"),
     ("Outwood", "Sandal", "Horbury", "Ossett")),
    ("Huddersfield", "West Yorkshire", 6, ("HD1", "HD2", "HD3", "HD4", "HD5"),
     ("Lindley", "Marsh", "Almondbury", "Dalton")),
    ("Halifax", "West Yorkshire", 4, ("HX1", "HX2", "HX3"), ("Illingworth", "Southowram")),
    ("Harrogate", "North Yorkshire", 6, ("HG1", "HG2", "HG3"),
     ("Starbeck", "Bilton", "Pannal")),
    ("York", "North Yorkshire", 5, ("YO1", "YO10", "YO24", "YO26", "YO30", "YO31"),
     ("Acomb", "Heworth", "Clifton", "Fulford")),
    ("Dewsbury", "West Yorkshire", 3, ("WF12", "WF13"), ("Thornhill", "Ravensthorpe")),
    ("Keighley", "West Yorkshire", 3, ("BD20", "BD21", "BD22"), ("Riddlesden", "Haworth")),
    ("Castleford", "West Yorkshire", 2, ("WF10",), ("Airedale", "Glasshoughton")),
    ("Pontefract", "West Yorkshire", 2, ("WF8",), ("Carleton", "Chequerfield")),
    ("Selby", "North Yorkshire", 1.5, ("YO8",), ("Barlby", "Brayton")),
    ("Skipton", "North Yorkshire", 1.5, ("BD23",), ("Embsay", "Gargrave")),
    ("Wetherby", "West Yorkshire", 1.5, ("LS22", "LS23"), ("Boston Spa", "Collingham")),
    ("Otley", "West Yorkshire", 1, ("LS21",), ("Pool", "Menston")),
    ("Ilkley", "West Yorkshire", 1, ("LS29",), ("Ben Rhydding", "Burley")),
    ("Sheffield", "South Yorkshire", 1.5, ("S1", "S2", "S6", "S10", "S11"),
     ("Hillsborough", "Crookes", "Ecclesall")),
    ("Manchester", "Greater Manchester", 1, ("M1", "M14", "M20", "M21"),
     ("Fallowfield", "Didsbury", "Chorlton")),
    ("Newcastle upon Tyne", "Tyne and Wear", 0.5, ("NE1", "NE2", "NE6"),
     ("Jesmond", "Heaton", "Byker")),
    ("Birmingham", "West Midlands", 0.5, ("B1", "B15", "B29"), ("Edgbaston", "Selly Oak")),
    ("Nottingham", "Nottinghamshire", 0.4, ("NG1", "NG7"), ("Lenton", "Radford")),
    ("London", "Greater London", 0.8, ("N1", "E8", "SE15", "SW9", "NW6"),
     ("Islington", "Hackney", "Peckham", "Brixton")),
    ("Bristol", "Bristol", 0.3, ("BS1", "BS6", "BS8"), ("Redland", "Clifton")),
    ("Hull", "East Riding of Yorkshire", 0.8, ("HU1", "HU5", "HU8"), ("Newland", "Sutton")),
)
_INWARD_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"  # the inward code never uses C I K M O V
CCG_CODES = ("15F", "02R", "02T", "03J", "03R", "42D")
PRACTICE_NAME_FORMS = ("{s} Surgery", "{s} Medical Centre", "{s} Health Centre",
                       "The {s} Practice", "{s} Medical Practice", "{s} Family Doctors")
_ODS_LETTERS = "ABCDEFGHJKLMNP"

# Trust sites: (ODS site code, name, address line 1, town, postcode).
SITES = (
    ("RX101", "Demo General Infirmary", "Great George Street", "Leeds", "LS1 3EX"),
    ("RX102", "St Luke's Hospital", "Aberford Road", "Wakefield", "WF1 4DG"),
    ("RX103", "Harrogate Road Community Hospital", "Lancaster Park Road", "Harrogate",
     "HG2 7SX"),
)
WARD_NAMES = ("Acute Medical Unit", "Cardiology", "Respiratory", "Elderly Care", "General Surgery",
              "Orthopaedics", "Children's Ward", "Maternity", "Gastroenterology", "Stroke Unit",
              "Renal", "Oncology")
# Clinic name and the specialty it serves; 5 per site.
CLINICS = (("Cardiology Outpatients", "320"), ("Diabetes and Endocrine Clinic", "302"),
           ("Fracture Clinic", "110"), ("General Surgery Outpatients", "100"),
           ("Paediatric Outpatients", "420"), ("Respiratory Clinic", "340"),
           ("Eye Clinic", "130"), ("ENT Clinic", "120"), ("Antenatal Clinic", "501"),
           ("Gynaecology Clinic", "502"), ("Dermatology Clinic", "330"),
           ("Medical Outpatients", "300"), ("Urology Clinic", "101"),
           ("Rheumatology Clinic", "410"), ("Oncology Clinic", "370"))

# ---------------------------------------------------------------------------------------------
# Documented fixture patients (always the first rows). Key facts only; see _fixture_rows().
# ---------------------------------------------------------------------------------------------
FIXTURE_PATIENTS: list[dict[str, Any]] = [
    {"patnt_refno": 100001, "pasid": "D0000001", "nhs_number": "9990000018",
     "surname": "SMITH", "forename": "JANE", "second_forename": "ELIZABETH", "sex": "2",
     "birth_date": "19650412", "deceased": None,
     "note": "two HOME addresses (one end-dated), current GP, old hospital number D0000005 "
             "from the merge of 100005, one discharged spell, two outpatient attendances"},
    {"patnt_refno": 100002, "pasid": "D0000002", "nhs_number": None,
     "surname": "JONES", "forename": "DAVID", "second_forename": None, "sex": "1",
     "birth_date": "19780923", "deceased": None, "note": "no NHS number"},
    {"patnt_refno": 100003, "pasid": "D0000003", "nhs_number": "9990000026",
     "surname": "BROWN", "forename": "MARGARET", "second_forename": "ANNE", "sex": "2",
     "birth_date": "19340117", "deceased": "202403150930",
     "note": "died in hospital: last spell discharged on the death date-time with method 4, "
             "destination 79; GP registration ended at death"},
    {"patnt_refno": 100004, "pasid": "D0000004", "nhs_number": "9990000034",
     "surname": "BRONTË", "forename": "CHARLOTTE", "second_forename": None, "sex": "2",
     "birth_date": "19880421", "deceased": None,
     "note": "non-ASCII surname, for accent-insensitive search"},
    {"patnt_refno": 100005, "pasid": "D0000005", "nhs_number": None,
     "surname": "SMITH", "forename": "JANE", "second_forename": None, "sex": "2",
     "birth_date": "19650412", "deceased": None,
     "note": "archived (ARCHV_FLAG Y): duplicate merged into 100001"},
    {"patnt_refno": 100006, "pasid": "D0000006", "nhs_number": "9990000042",
     "surname": "PATEL", "forename": "PRIYA", "second_forename": None, "sex": "2",
     "birth_date": "19920305", "deceased": None,
     "note": "unmapped ethnic code ZZ, language GUJ, currently admitted (spell status A)"},
]
_FIXTURE_NHS_INDEXES = frozenset({1, 2, 3, 4})  # 99900000{01..04}+check: kept off the generator

_NHS_SPACE = 1_000_000  # 999 + six digits + check digit
_NHS_STRIDE = 611_953  # coprime with 10**6, so k -> k*stride mod 10**6 visits every base once


def nhs_check_digit(nine_digits: str) -> int | None:
    """Modulus 11 check digit of a 9-digit NHS number stem; None if the stem is unusable."""
    total = sum(int(d) * w for d, w in zip(nine_digits, range(10, 1, -1), strict=True))
    check = 11 - total % 11
    if check == 11:
        return 0
    return None if check == 10 else check


# ---------------------------------------------------------------------------------------------
# Fast formatting: only ~40k distinct days occur, so cache their strings.
# ---------------------------------------------------------------------------------------------
_REF_ORD = REFERENCE_DATE.toordinal()
_HHMM = [f"{m // 60:02d}{m % 60:02d}" for m in range(1440)]


@lru_cache(maxsize=65536)
def _ymd(ordinal: int) -> str:
    d = dt.date.fromordinal(ordinal)
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


@lru_cache(maxsize=65536)
def _iso(ordinal: int) -> str:
    d = dt.date.fromordinal(ordinal)
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}"


def _dttm(ordinal: int, minute: int) -> str:
    return _ymd(ordinal) + _HHMM[minute]


class _Picker:
    """Weighted choice with precomputed cumulative weights (much cheaper than rng.choices)."""

    def __init__(self, items: Sequence[str], weights: Sequence[float]) -> None:
        self.items = list(items)
        self.cum: list[float] = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)
        self.total = total

    @classmethod
    def of(cls, weights: dict[str, float] | dict[str, int]) -> _Picker:
        return cls(list(weights), list(weights.values()))

    def __call__(self, rnd: float) -> str:
        return self.items[bisect.bisect_right(self.cum, rnd * self.total)]


def _zipf(items: Sequence[str], exponent: float) -> _Picker:
    return _Picker(items, [1.0 / (i + 1) ** exponent for i in range(len(items))])


@dataclass(frozen=True)
class Batch:
    table: Table
    rows: list[Row]
    patients_done: int  # patients fully generated so far, for progress reporting


@dataclass
class _Practice:
    organ_refno: int
    town: str
    gps: list[int]


class DemoPasGenerator:
    """Produces the rows of every table; iterate `batches()` once."""

    def __init__(self, patients: int, seed: int, chunk_size: int = 5000) -> None:
        if patients < len(FIXTURE_PATIENTS):
            raise ValueError(f"patients must be at least {len(FIXTURE_PATIENTS)}")
        self.patients = patients
        self.chunk_size = chunk_size
        self.rng = random.Random(seed)
        # Running keys of the child tables (explicit keys: no autoincrement anywhere).
        self.next_addss = self.next_gpreg = self.next_patid = 1
        self.next_prvsp = self.next_opatt = 1
        self.nhs_k = 0
        self.practices: list[_Practice] = []
        self.practices_by_town: dict[str, list[_Practice]] = {}
        self.consultants_by_spec: dict[str, list[int]] = {}
        self.consultant_spec: dict[int, str] = {}
        self.consultant_picker: _Picker | None = None
        self.wards: list[int] = []
        self.clinics_by_spec: dict[str, list[int]] = {}
        self.all_clinics: list[int] = []
        self._town = _Picker([t[0] for t in TOWNS], [t[2] for t in TOWNS])
        self._town_info = {t[0]: t for t in TOWNS}
        self._surname = _zipf(SURNAMES, 0.7)
        self._male = _zipf(FORENAMES_MALE, 0.5)
        self._female = _zipf(FORENAMES_FEMALE, 0.5)
        self._sex = _Picker.of(SEX_WEIGHTS)
        self._ethnic = _Picker.of(ETHNIC_WEIGHTS)
        self._marital = _Picker.of(MARITAL_ADULT_WEIGHTS)
        self._nnnts = _Picker.of(NNNTS_WEIGHTS)
        self._lang = {k: _Picker(v[0], v[1]) for k, v in _LANG_BY_ETHNIC.items()}
        self._admet_el = _Picker.of(ADMET_ELECTIVE)
        self._admet_em = _Picker.of(ADMET_EMERGENCY)
        self._adsor = _Picker.of(ADSOR_WEIGHTS)
        self._dismt = _Picker.of(DISMT_LIVE)
        self._disde = _Picker.of(DISDE_LIVE)
        self._attnd = _Picker.of(ATTND_WEIGHTS)
        self._outcome = _Picker.of(OUTCOME_WEIGHTS)
        # Tables beside the PAS, each drawing from a random stream of its own.
        self.ae = epr_ae.AeAttendances(self, seed)

    # -- small helpers -------------------------------------------------------------------------
    def _phone(self, mobile: bool) -> str:
        # Ofcom numbers reserved for drama: 07700 900000-900999 and 01632 960000-960999.
        n = self.rng.randrange(1000)
        return f"07700 900{n:03d}" if mobile else f"01632 960{n:03d}"

    def _postcode(self, outward: str) -> str:
        r = self.rng.random
        li = _INWARD_LETTERS
        return f"{outward} {int(r() * 10)}{li[int(r() * 20)]}{li[int(r() * 20)]}"

    def _street(self) -> str:
        rng = self.rng
        return f"{rng.choice(STREETS)} {rng.choice(STREET_SUFFIXES)}"

    def _address_lines(self, town: str) -> tuple[str, str | None, str, str, str]:
        rng = self.rng
        _, county, _, outwards, localities = self._town_info[town]
        line1 = f"{rng.randint(1, 240)} {self._street()}"
        if rng.random() < 0.08:
            line1 = f"Flat {rng.randint(1, 24)}, {line1}"
        locality = rng.choice(localities) if rng.random() < 0.45 else None
        return line1, locality, town, county, self._postcode(rng.choice(outwards))

    def _modif(self, lo_ord: int) -> str:
        """A last-modified stamp between `lo_ord` (at most three years back) and the reference."""
        r = self.rng.random
        lo = min(max(lo_ord, _REF_ORD - 3 * 365), _REF_ORD)
        o = lo + int(r() * (_REF_ORD - lo + 1))
        s = int(r() * 86400)
        return f"{_iso(o)} {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"

    def _next_nhs(self) -> str | None:
        """Next unused NHS number of the test range, visiting the range in scrambled order."""
        while self.nhs_k < _NHS_SPACE:
            idx = self.nhs_k * _NHS_STRIDE % _NHS_SPACE
            self.nhs_k += 1
            if idx in _FIXTURE_NHS_INDEXES:
                continue
            stem = f"999{idx:06d}"
            check = nhs_check_digit(stem)
            if check is not None:
                return f"{stem}{check}"
        return None  # ~909k valid numbers exist; beyond that patients simply have none

    # -- reference data ------------------------------------------------------------------------
    def _reference(self) -> Iterator[Batch]:
        rng = self.rng
        n_practices = max(10, round(self.patients / 1500))
        orgs: list[Row] = [{
            "ORGAN_REFNO": TRUST_ORGAN_REFNO, "ODS_CODE": TRUST_ODS, "ORG_NAME": TRUST_NAME,
            "ORGTY_CODE": "NHST", "ADDR_LINE1": "Trust Headquarters",
            "ADDR_LINE2": "Great George Street", "ADDR_LINE3": "Leeds", "PCODE": "LS1 3EX",
            "TEL_NO": "0113 496 0000", "PARENT_ODS": None, "ACTIVE_FLAG": "Y",
            "MODIF_DTTM": "2019-04-01 09:00:00"}]
        clins: list[Row] = []
        proca = 1
        for i in range(n_practices):
            town = "Leeds" if i == 0 else self._town(rng.random())  # fixtures' practice: Leeds
            line1, locality, _, _, pcode = self._address_lines(town)
            name_stem = rng.choice((rng.choice(STREETS), town, rng.choice(
                self._town_info[town][4])))
            refno = i + 2
            orgs.append({
                "ORGAN_REFNO": refno,
                "ODS_CODE": f"{_ODS_LETTERS[i % 14]}{81001 + i // 14}",
                "ORG_NAME": rng.choice(PRACTICE_NAME_FORMS).format(s=name_stem),
                "ORGTY_CODE": "GPP", "ADDR_LINE1": line1, "ADDR_LINE2": locality,
                "ADDR_LINE3": town, "PCODE": pcode, "TEL_NO": self._phone(False),
                "PARENT_ODS": rng.choice(CCG_CODES),
                "ACTIVE_FLAG": "N" if i > 0 and rng.random() < 0.02 else "Y",
                "MODIF_DTTM": self._modif(_REF_ORD - 3000)})
            practice = _Practice(refno, town, [])
            for _ in range(2 if rng.random() < 0.7 else 3):
                practice.gps.append(proca)
                clins.append(self._clinician(proca, "GP", GP_SPECIALTY, refno))
                proca += 1
            if orgs[-1]["ACTIVE_FLAG"] == "Y":  # nobody registers with a closed practice
                self.practices.append(practice)
                self.practices_by_town.setdefault(town, []).append(practice)
        specs = _Picker.of(CONSULTANT_SPECIALTIES)
        n_cons = max(20, round(self.patients / 500))
        for i in range(n_cons):
            # The first consultants cover every specialty once, so each has at least one.
            spec = list(CONSULTANT_SPECIALTIES)[i] if i < len(CONSULTANT_SPECIALTIES) else specs(
                rng.random())
            clins.append(self._clinician(proca, "CONS", spec, TRUST_ORGAN_REFNO))
            self.consultants_by_spec.setdefault(spec, []).append(proca)
            self.consultant_spec[proca] = spec
            proca += 1
        for _ in range(max(5, round(self.patients / 5000))):
            clins.append(self._clinician(proca, "NURS", None, TRUST_ORGAN_REFNO))
            proca += 1
        cons = list(self.consultant_spec)
        # Paediatricians and obstetricians are chosen by age/admission method, not at random.
        self.consultant_picker = _Picker([str(c) for c in cons], [
            0.0 if self.consultant_spec[c] in ("420", "501") else 1.0 for c in cons])
        yield Batch(schema.organisations, orgs, 0)
        yield Batch(schema.clinicians, clins, 0)
        yield Batch(schema.locations, self._locations(), 0)

    def _clinician(self, proca: int, kind: str, spec: str | None, organ: int) -> Row:
        rng = self.rng
        sex = "1" if rng.random() < 0.5 else "2"
        doctor = kind != "NURS"
        if doctor:
            surgeon = spec is not None and spec[0] == "1"  # UK surgeons keep Mr/Ms
            title = ("MR" if sex == "1" else "MS") if surgeon else "DR"
            if kind == "CONS" and rng.random() < 0.08:
                title = "PROF"
        else:
            title = "MR" if sex == "1" else rng.choice(("MRS", "MS", "MISS"))
        forename = (self._male if sex == "1" else self._female)(rng.random())
        return {
            "PROCA_REFNO": proca, "PRTYP_CODE": kind, "TITLE": title,
            "SURNAME": self._surname(rng.random()), "FORENAME": forename, "SEXXX_CODE": sex,
            "GMC_CODE": f"{2_000_000 + proca * 13:07d}" if doctor else None,
            "GMP_CODE": f"G{8_000_000 + proca:07d}" if kind == "GP" else None,
            "SDS_USER_ID": f"{555_000_000_000 + proca * 1009:012d}",
            "MAIN_SPECT_CODE": spec, "ORGAN_REFNO": organ,
            "TEL_NO": self._phone(False), "ACTIVE_FLAG": "Y" if rng.random() < 0.97 else "N",
            "MODIF_DTTM": self._modif(_REF_ORD - 2000)}

    def _locations(self) -> list[Row]:
        rows: list[Row] = []
        refno = 1
        ward_no, clinic_no = 10, 1
        for s, (code, name, line1, town, pcode) in enumerate(SITES):
            site_refno = refno
            rows.append({
                "LOCTN_REFNO": refno, "LOCTN_CODE": code, "LOCTN_NAME": name,
                "LOCTY_CODE": "SITE", "PARENT_REFNO": None, "ORGAN_REFNO": TRUST_ORGAN_REFNO,
                "ADDR_LINE1": line1, "ADDR_LINE2": None, "ADDR_LINE3": town, "PCODE": pcode,
                "TEL_NO": f"0113 496 0{s + 1:03d}", "ACTIVE_FLAG": "Y",
                "MODIF_DTTM": "2019-04-01 09:00:00"})
            refno += 1
            for w in range(8):
                label = WARD_NAMES[(s * 8 + w) % len(WARD_NAMES)]
                rows.append(self._child_location(refno, f"W{ward_no}",
                                                 f"Ward {ward_no} ({label})", "WARD", site_refno))
                self.wards.append(refno)
                ward_no += 1
                refno += 1
            for c in range(5):
                label, spec = CLINICS[s * 5 + c]
                rows.append(self._child_location(refno, f"CL{clinic_no:02d}", label, "CLIN",
                                                 site_refno))
                self.clinics_by_spec.setdefault(spec, []).append(refno)
                self.all_clinics.append(refno)
                clinic_no += 1
                refno += 1
        rows[-1]["ACTIVE_FLAG"] = "N"  # one closed clinic, for status filters
        return rows

    def _child_location(self, refno: int, code: str, name: str, kind: str, site: int) -> Row:
        return {"LOCTN_REFNO": refno, "LOCTN_CODE": code, "LOCTN_NAME": name,
                "LOCTY_CODE": kind, "PARENT_REFNO": site, "ORGAN_REFNO": TRUST_ORGAN_REFNO,
                "ADDR_LINE1": None, "ADDR_LINE2": None, "ADDR_LINE3": None, "PCODE": None,
                "TEL_NO": self._phone(False), "ACTIVE_FLAG": "Y",
                "MODIF_DTTM": self._modif(_REF_ORD - 2000)}

    # -- patients --------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        yield from self._reference()
        out: dict[Table, list[Row]] = {t: [] for t in _PATIENT_TABLES}
        self._fixture_rows(out)
        done = len(FIXTURE_PATIENTS)
        for refno in range(FIRST_PATNT_REFNO + done, FIRST_PATNT_REFNO + self.patients):
            self._patient(refno, out)
            done += 1
            if done % self.chunk_size == 0:
                yield from self._flush(out, done)
        yield from self._flush(out, done)

    @staticmethod
    def _flush(out: dict[Table, list[Row]], done: int) -> Iterator[Batch]:
        for table, rows in out.items():
            if rows:
                yield Batch(table, rows, done)
                out[table] = []

    def _patient(self, refno: int, out: dict[Table, list[Row]]) -> None:
        rng = self.rng
        r = rng.random
        sex = self._sex(r())
        birth = _REF_ORD - int(rng.betavariate(1.6, 1.4) * 36524)
        age_years = (_REF_ORD - birth) / 365.25
        death: tuple[int, int] | None = None
        if r() < 0.03 * (0.2 + 1.6 * age_years / 100):
            lo = max(birth + 1, _REF_ORD - 3650)
            if lo < _REF_ORD:
                death = (lo + int(r() * (_REF_ORD - lo)), int(r() * 1440))
        ethnic = None if r() < ETHNIC_NULL_RATE else self._ethnic(r())
        pool = _NAME_POOLS.get(ethnic or "")
        female = sex == "2" or (sex in "9X" and r() < 0.5)
        if pool is not None and r() < 0.8:
            surname = rng.choice(pool[0])
            forename = rng.choice(pool[1][1] if female else pool[1][0])
        else:
            surname = self._surname(r())
            forename = (self._female if female else self._male)(r())
        second = None
        if r() < 0.5:
            second = (self._female if female else self._male)(r())
            if second == forename:
                second = None
        adult = age_years >= 16
        marital = (self._marital(r()) if adult else "S") if r() < 0.9 else None
        if marital == "W" and age_years < 40 and r() < 0.8:
            marital = "M"
        if sex in "9X":
            title = "MX"
        elif sex == "1":
            title = "MR" if adult else "MSTR"
        elif adult and marital in ("M", "W", "D"):
            title = "MRS" if r() < 0.85 else "MS"
        else:
            title = "MISS" if not adult or r() < 0.6 else "MS"
        if adult and r() < 0.01:
            title = "DR"
        nhs = self._next_nhs() if r() >= 0.05 else None
        nnnts = None
        if nhs is not None:
            nnnts = "08" if _REF_ORD - birth < 42 and r() < 0.5 else self._nnnts(r())
        lang_picker = self._lang.get(ethnic or "WB", self._lang["WB"])
        lang = lang_picker(r()) if r() < 0.95 else None
        email = None
        if adult and r() < 0.35:
            local = "".join(ch for ch in f"{forename}.{surname}".lower() if ch.isalnum() or
                            ch == ".")
            email = f"{local}{rng.randint(1, 99)}@example.com"
        end_ord = death[0] if death else _REF_ORD
        out[schema.patients].append({
            "PATNT_REFNO": refno, "PASID": f"D{refno - 100000:07d}",
            "NHS_NUMBER": nhs, "NNNTS_CODE": nnnts, "TITLE": title,
            "SURNAME": surname, "FORENAME": forename, "SECOND_FORENAME": second,
            "SEXXX_CODE": sex, "DTTM_OF_BIRTH": _ymd(birth),
            "DTTM_OF_DEATH": _dttm(*death) if death else None,
            "ETHGR_CODE": ethnic, "MARRY_CODE": marital,
            "HOME_TEL": self._phone(False) if r() < 0.6 else None,
            "MOBILE_TEL": self._phone(True) if age_years >= 12 and r() < 0.7 else None,
            "EMAIL_ADDR": email, "LANG_CODE": lang,
            "ARCHV_FLAG": "Y" if r() < 0.005 else "N",
            "MODIF_DTTM": self._modif(birth)})
        town = self._addresses(refno, birth, end_ord, out)
        self._gp(refno, birth, death, town, out)
        if r() < 0.10:
            self._other_id(refno, birth, end_ord, out)
        self._activity(refno, sex, birth, death, out)
        self.ae.patient(refno, birth, death, _REF_ORD, out)

    def _addresses(self, refno: int, birth: int, end_ord: int,
                   out: dict[Table, list[Row]]) -> str:
        """Address history: earlier HOMEs end the day the next starts. Returns current town."""
        rng = self.rng
        r = rng.random
        n_old = 0 if r() < 0.75 else (1 if r() < 0.7 else 2)
        span = max(1, end_ord - birth)
        if n_old:  # lived here since birth, moved n_old times (same-day moves collapse)
            starts = sorted({birth, *(birth + int(r() * span) for _ in range(n_old))})
        else:  # earlier addresses never recorded
            starts = [birth + int(r() * span)]
        rows = out[schema.addresses]
        town = self._town(r())
        for i, start in enumerate(starts):
            if i and r() < 0.3:  # most moves are local; some come from or go elsewhere
                town = self._town(r())
            line1, locality, town_, county, pcode = self._address_lines(town)
            rows.append({
                "ADDSS_REFNO": self.next_addss, "PATNT_REFNO": refno, "ADTYP_CODE": "HOME",
                "LINE1": line1, "LINE2": locality, "LINE3": town_, "LINE4": county,
                "PCODE": pcode, "START_DTTM": _dttm(start, 0),
                "END_DTTM": _dttm(starts[i + 1], 0) if i + 1 < len(starts) else None})
            self.next_addss += 1
        extra = r()
        lo = max(birth, _REF_ORD - 730)
        # ~3% TEMP (student, respite...), ~1% CORR (a care-of address for letters)
        if extra < 0.04 and lo < end_ord:
            kind = "TEMP" if extra < 0.03 else "CORR"
            start = lo + int(r() * (end_ord - lo))
            ended = kind == "TEMP" and r() < 0.5 and start + 30 < end_ord
            line1, locality, town_, county, pcode = self._address_lines(self._town(r()))
            rows.append({
                "ADDSS_REFNO": self.next_addss, "PATNT_REFNO": refno, "ADTYP_CODE": kind,
                "LINE1": line1, "LINE2": locality, "LINE3": town_, "LINE4": county,
                "PCODE": pcode, "START_DTTM": _dttm(start, 0),
                "END_DTTM": _dttm(start + 30 + int(r() * (end_ord - start - 30)), 0)
                if ended else None})
            self.next_addss += 1
        return town

    def _gp(self, refno: int, birth: int, death: tuple[int, int] | None, town: str,
            out: dict[Table, list[Row]]) -> None:
        rng = self.rng
        r = rng.random
        end_ord = death[0] if death else _REF_ORD
        local = self.practices_by_town.get(town) or self.practices
        current = rng.choice(local)
        lo = max(birth, end_ord - 20 * 365)
        start = lo + int(r() * max(1, end_ord - lo))
        regs: list[tuple[_Practice, int, str | None]] = []
        if r() < 0.2 and start - birth > 60:
            old = rng.choice(self.practices)
            old_start = birth + int(r() * (start - birth))
            regs.append((old, old_start, _dttm(start, 0)))
        regs.append((current, start, _dttm(end_ord, 0) if death else None))
        for practice, s, end in regs:
            out[schema.gp_registrations].append({
                "GPREG_REFNO": self.next_gpreg, "PATNT_REFNO": refno,
                "PROCA_REFNO": rng.choice(practice.gps), "ORGAN_REFNO": practice.organ_refno,
                "START_DTTM": _dttm(s, 0), "END_DTTM": end})
            self.next_gpreg += 1

    def _other_id(self, refno: int, birth: int, end_ord: int,
                  out: dict[Table, list[Row]]) -> None:
        r = self.rng.random
        lo = max(birth, end_ord - 20 * 365)
        start = lo + int(r() * (end_ord - lo + 1))
        row: tuple[str, str, str, str | None]
        if r() < 0.7:  # a hospital number retired by a merge or a re-numbering
            row = ("OLDHN", f"H{(refno * 7_919) % 1_000_000:06d}", _dttm(start, 0),
                   _dttm(min(end_ord, start + int(r() * 2000)), 0))
        else:  # the number the second site's old system gave
            row = ("MRN2", f"S2{refno:08d}", _dttm(start, 0), None)
        out[schema.patient_ids].append({
            "PATID_REFNO": self.next_patid, "PATNT_REFNO": refno, "PITYP_CODE": row[0],
            "IDENTIFIER": row[1], "START_DTTM": row[2], "END_DTTM": row[3]})
        self.next_patid += 1

    def _consultant(self, age_years: float, spec: str | None = None) -> int:
        rng = self.rng
        if spec is None and age_years < 16 and rng.random() < 0.8:
            spec = "420"
        if spec is not None:
            return rng.choice(self.consultants_by_spec[spec])
        assert self.consultant_picker is not None
        return int(self.consultant_picker(rng.random()))

    def _activity(self, refno: int, sex: str, birth: int, death: tuple[int, int] | None,
                  out: dict[Table, list[Row]]) -> None:
        """Inpatient spells and outpatient attendances within the last five years of life."""
        rng = self.rng
        r = rng.random
        end_ord = death[0] if death else _REF_ORD
        lo = max(birth, _REF_ORD - 5 * 365)
        if end_ord <= lo:
            return
        age_at = (lo - birth) / 365.25
        # Spells: mean ~0.4 per patient.
        x = r()
        n_spells = 0 if x < 0.72 else 1 if x < 0.89 else 2 if x < 0.96 else 3 if x < 0.99 else 4
        died_in_hospital = death is not None and r() < 0.5
        last_possible = end_ord - (21 if died_in_hospital else 0)
        prev_end = lo
        spells = out[schema.provider_spells]
        admits = sorted(lo + int(r() * max(1, last_possible - lo)) for _ in range(n_spells))
        for i, admit in enumerate(admits):
            admit = max(admit, prev_end)
            if admit >= last_possible:
                break
            maternity = sex == "2" and 16 <= age_at + (admit - lo) / 365.25 <= 45 and r() < 0.15
            elective = not maternity and r() < 0.45
            day_case = elective and r() < 0.55
            if maternity:
                admet, cons, los = ADMET_MATERNITY, self._consultant(age_at, "501"), r() * 4
            else:
                admet = self._admet_el(r()) if elective else self._admet_em(r())
                cons = self._consultant(age_at)
                los = 0.0 if day_case else rng.expovariate(1 / 4.5)
            admit_min = (420 + int(r() * 180)) if elective else int(r() * 1440)
            disch, disch_min = admit + min(int(los), 60), 600 + int(r() * 600)
            status = "D"
            if r() < 0.01:
                status = "C"  # admission cancelled: no discharge
            elif i == len(admits) - 1 and death is None and r() < 0.04:
                status = "A"  # currently admitted: a recent admission, no discharge yet
                admit = max(admit, _REF_ORD - int(r() * 21))
            elif disch >= last_possible:
                if death is None:
                    status = "A"  # would be discharged after "today": still in hospital
                else:
                    disch = max(admit, last_possible - 1)
            if disch == admit and disch_min <= admit_min:
                disch_min = min(1439, admit_min + 120 + int(r() * 240))
            discharged = status == "D"
            spells.append(self._spell_row(
                refno, admit, admit_min, disch if discharged else None, disch_min, status,
                "2" if day_case else "1", admet, self._adsor(r()),
                self._dismt(r()) if discharged else None,
                self._disde(r()) if discharged else None, cons))
            prev_end = (disch + 1) if discharged else admit + 1
        if died_in_hospital and death is not None:
            admit = max(prev_end, death[0] - int(r() * 20))
            if admit <= death[0]:
                admit_min = int(r() * (death[1] if admit == death[0] else 1440))
                spells.append(self._spell_row(
                    refno, admit, admit_min, death[0], death[1], "D", "1",
                    self._admet_em(r()), "19", "4", DISDE_DIED, self._consultant(age_at)))
        # Outpatient attendances: mean ~1.5 per patient.
        x = r()
        n_op = (0 if x < 0.48 else 1 if x < 0.64 else 2 if x < 0.75 else 3 if x < 0.84 else
                4 if x < 0.90 else 5 if x < 0.94 else 6 if x < 0.97 else 8 if x < 0.99 else 10)
        seen: set[str] = set()
        ops = out[schema.outpatient_attendances]
        cons = self._consultant(age_at)
        for day in sorted(lo + int(r() * (end_ord - lo)) for _ in range(n_op)):
            if r() < 0.3:  # most patients keep seeing the same team
                cons = self._consultant(age_at)
            spec = self.consultant_spec[cons]
            clinics = self.clinics_by_spec.get(spec) or self.all_clinics
            attnd = self._attnd(r())
            first = "2" if spec in seen else "1"
            if attnd in "56":
                seen.add(spec)
            minute = 510 + 15 * int(r() * 32)  # 08:30-16:15 slots
            ops.append({
                "OPATT_REFNO": self.next_opatt, "PATNT_REFNO": refno,
                "ATTENDANCE_ID": f"OP{self.next_opatt:08d}", "APPT_DTTM": _dttm(day, minute),
                "ATTND_CODE": attnd, "FIRST_ATTND": first,
                "OUTCM_CODE": self._outcome(r()) if attnd in "56" else None,
                "PROCA_REFNO": cons, "LOCTN_REFNO": rng.choice(clinics),
                "MAIN_SPECT_CODE": spec, "MODIF_DTTM": self._modif(day)})
            self.next_opatt += 1

    def _spell_row(self, refno: int, admit: int, admit_min: int, disch: int | None,
                   disch_min: int, status: str, patcl: str, admet: str, adsor: str,
                   dismt: str | None, disde: str | None, cons: int) -> Row:
        row = {
            "PRVSP_REFNO": self.next_prvsp, "PATNT_REFNO": refno,
            "SPELL_NUMBER": f"IP{self.next_prvsp:08d}", "ADMIT_DTTM": _dttm(admit, admit_min),
            "DISCH_DTTM": _dttm(disch, disch_min) if disch is not None else None,
            "SPELL_STATUS": status, "PATCL_CODE": patcl, "ADMET_CODE": admet,
            "ADSOR_CODE": adsor, "DISMT_CODE": dismt, "DISDE_CODE": disde,
            "PROCA_REFNO": cons, "LOCTN_REFNO": self.rng.choice(self.wards),
            "MAIN_SPECT_CODE": self.consultant_spec[cons],
            "MODIF_DTTM": self._modif(disch if disch is not None else admit)}
        self.next_prvsp += 1
        return row

    # -- fixtures ------------------------------------------------------------------------------
    def _fixture_rows(self, out: dict[Table, list[Row]]) -> None:
        """The documented patients of FIXTURE_PATIENTS, written out in full."""
        leeds = self.practices_by_town["Leeds"][0]  # practice 0 is always in Leeds
        gp = leeds.gps[0]
        ward, clinic = self.wards[0], self.clinics_by_spec["320"][0]
        cons = self.consultants_by_spec["320"][0]
        extra: dict[int, Row] = {
            100001: {"NNNTS_CODE": "01", "TITLE": "MRS", "ETHGR_CODE": "WB", "MARRY_CODE": "M",
                     "HOME_TEL": "01632 960001", "MOBILE_TEL": "07700 900001",
                     "EMAIL_ADDR": "jane.smith@example.com", "LANG_CODE": "ENG"},
            100002: {"TITLE": "MR", "ETHGR_CODE": "WB", "MARRY_CODE": "S", "LANG_CODE": "ENG"},
            100003: {"NNNTS_CODE": "01", "TITLE": "MRS", "ETHGR_CODE": "WB", "MARRY_CODE": "W",
                     "HOME_TEL": "01632 960003", "LANG_CODE": "ENG"},
            100004: {"NNNTS_CODE": "01", "TITLE": "MS", "ETHGR_CODE": "WB", "MARRY_CODE": "S",
                     "MOBILE_TEL": "07700 900004", "LANG_CODE": "ENG"},
            100005: {"TITLE": "MRS", "ETHGR_CODE": "WB", "MARRY_CODE": "M", "LANG_CODE": "ENG",
                     "ARCHV_FLAG": "Y"},
            100006: {"NNNTS_CODE": "02", "TITLE": "MISS", "ETHGR_CODE": "ZZ", "MARRY_CODE": "S",
                     "MOBILE_TEL": "07700 900006", "LANG_CODE": "GUJ"},
        }
        for fx in FIXTURE_PATIENTS:
            refno = fx["patnt_refno"]
            row: Row = {c.name: None for c in schema.patients.columns}
            row.update({
                "PATNT_REFNO": refno, "PASID": fx["pasid"], "NHS_NUMBER": fx["nhs_number"],
                "SURNAME": fx["surname"], "FORENAME": fx["forename"],
                "SECOND_FORENAME": fx["second_forename"], "SEXXX_CODE": fx["sex"],
                "DTTM_OF_BIRTH": fx["birth_date"], "DTTM_OF_DEATH": fx["deceased"],
                "ARCHV_FLAG": "N", "MODIF_DTTM": "2025-06-01 10:15:00"})
            row.update(extra[refno])
            out[schema.patients].append(row)
        home = [
            (100001, "14 Cardigan Road", "Headingley", "LS6 1LJ", "199005010000", "201806300000"),
            (100001, "7 Church Lane", "Roundhay", "LS8 2DR", "201806300000", None),
            (100002, "221 Otley Road", None, "LS16 5LQ", "201002140000", None),
            (100003, "3 Victoria Terrace", "Armley", "LS12 3BN", "196105200000", None),
            (100004, "Flat 2, 40 Hyde Park Road", None, "LS6 1PY", "201909010000", None),
            (100005, "14 Cardigan Road", "Headingley", "LS6 1LJ", "199005010000", None),
            (100006, "58 Easterly Road", None, "LS8 3AN", "202101150000", None),
        ]
        for pat, line1, locality, pcode, start, end in home:
            out[schema.addresses].append({
                "ADDSS_REFNO": self.next_addss, "PATNT_REFNO": pat, "ADTYP_CODE": "HOME",
                "LINE1": line1, "LINE2": locality, "LINE3": "Leeds", "LINE4": "West Yorkshire",
                "PCODE": pcode, "START_DTTM": start, "END_DTTM": end})
            self.next_addss += 1
        for pat, start, end in ((100001, "201807020000", None), (100002, "201003010000", None),
                                (100003, "199001010000", "202403150000"),
                                (100004, "201909100000", None), (100005, "200301060000", None),
                                (100006, "202101200000", None)):
            out[schema.gp_registrations].append({
                "GPREG_REFNO": self.next_gpreg, "PATNT_REFNO": pat, "PROCA_REFNO": gp,
                "ORGAN_REFNO": leeds.organ_refno, "START_DTTM": start, "END_DTTM": end})
            self.next_gpreg += 1
        out[schema.patient_ids].append({
            "PATID_REFNO": self.next_patid, "PATNT_REFNO": 100001, "PITYP_CODE": "OLDHN",
            "IDENTIFIER": "D0000005", "START_DTTM": "200304110000",
            "END_DTTM": "201105160000"})
        self.next_patid += 1
        spells = [  # (patient, admit, disch, status, patcl, admet, adsor, dismt, disde)
            (100001, "202309041130", "202309071600", "D", "1", "21", "19", "1", "19"),
            (100003, "202403101422", "202403150930", "D", "1", "21", "19", "4", DISDE_DIED),
            (100006, "202611201015", None, "A", "1", "21", "19", None, None),
        ]
        for pat, admit, disch, status, patcl, admet, adsor, dismt, disde in spells:
            out[schema.provider_spells].append({
                "PRVSP_REFNO": self.next_prvsp, "PATNT_REFNO": pat,
                "SPELL_NUMBER": f"IP{self.next_prvsp:08d}", "ADMIT_DTTM": admit,
                "DISCH_DTTM": disch, "SPELL_STATUS": status, "PATCL_CODE": patcl,
                "ADMET_CODE": admet, "ADSOR_CODE": adsor, "DISMT_CODE": dismt,
                "DISDE_CODE": disde, "PROCA_REFNO": cons, "LOCTN_REFNO": ward,
                "MAIN_SPECT_CODE": "320", "MODIF_DTTM": "2026-11-20 10:20:00"})
            self.next_prvsp += 1
        for appt, attnd, first, outcome in (("202310170930", "5", "1", "2"),
                                            ("202401231045", "3", "2", None)):
            out[schema.outpatient_attendances].append({
                "OPATT_REFNO": self.next_opatt, "PATNT_REFNO": 100001,
                "ATTENDANCE_ID": f"OP{self.next_opatt:08d}", "APPT_DTTM": appt,
                "ATTND_CODE": attnd, "FIRST_ATTND": first, "OUTCM_CODE": outcome,
                "PROCA_REFNO": cons, "LOCTN_REFNO": clinic, "MAIN_SPECT_CODE": "320",
                "MODIF_DTTM": "2024-01-23 11:02:00"})
            self.next_opatt += 1
        self.ae.fixtures(out, _REF_ORD)


_PATIENT_TABLES = (schema.patients, schema.patient_ids, schema.addresses, schema.gp_registrations,
                   schema.provider_spells, schema.outpatient_attendances, *epr_ae.TABLES)


def generate(patients: int, seed: int, chunk_size: int = 5000) -> Iterator[Batch]:
    """All rows of the demo PAS, reference tables first, then patients in chunks."""
    return DemoPasGenerator(patients, seed, chunk_size).batches()
