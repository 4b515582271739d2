"""A demo PAS that speaks HL7 v2: an MLLP server over the demo PAS database, with faults.

Split by concern: ``listener`` (MLLP, one message in, one reply out, idempotency memory),
``queries`` (QBP answers), ``adt`` (A28/A31/A01 applied to the tables), ``faults`` (scripted
failures), ``profiles`` (dialects: ``demo``, ``itk``, ``strict``), ``wire`` (ER7 in and out).
It is a demo and test peer, not part of the gateway's adapters.

It answers the NHS ITK query dialect (QBP^Q21, QBP^Q22, QBP^ZV1) and takes ADT^A28/A31/A01, from
the demo PAS tables (``gateway.demo_pas.schema``) through SQLAlchemy Core, in worker threads
so the server loop never waits on the database. ``Faults`` scripts what goes wrong next
(delays, dropped connections, NAKs, split or unterminated frames, a wrong MSA-2), so the
gateway's HL7 adapter can be tested against every failure a real PAS interface shows.

THE PAS CONTRACT — what the gateway's HL7 v2 mapping may assume of the PAS
=========================================================================

Every reply
    MSH-3/4 ``PAS``/``RX1``; MSH-5/6 echo the request's MSH-3/4; MSH-10 a new control id;
    MSH-12 ``2.4``; MSH-18 the request's character set. MSA-1 ``AA`` (or ``AE``/``AR``),
    **MSA-2 = the request's MSH-10**, MSA-3 a short text on errors. An error adds
    ``ERR|<seg>^1^<field>^<code>&<text>&HL70357`` (v2.4 ERR-1 = ELD: ERR-1.1-1.3 the segment,
    its sequence and the field at fault when one is, e.g. ``PID^1^3`` for a duplicate NHS
    number, else empty; ERR-1.4.1 code, ERR-1.4.2 text, from
    HL7 table 0357: 100 segment sequence / unreadable message, 101 required field missing,
    102 data type error, 103 value not supported, 200 unsupported message type, 201 unsupported
    event, 204 unknown key identifier, 205 duplicate key identifier, 207 application internal
    error). Error texts never contain patient data. A message that cannot be parsed gets an
    ``ACK`` with ``AR`` (code 100) if its MSH-10 can be read, else the connection is closed.
    Any other message type: ``AR`` with 200 (201 for an unknown QBP/ADT trigger). A refused
    query is still an RSP of its kind: MSA ``AE``, ERR, QAK-2 ``AE``, the QPD, no groups.

QBP^Q21 Get Person Demographics → RSP^K21 (structure RSP_K21)
    QPD-3 is one CX ``<id>^^^<authority>^<type>``: type ``PI`` (or authority ``RX1``) is the
    PAS number (PATIENTS.PASID), type ``NH`` (or authority ``NHS``) the NHS number. Other types
    → AE 103. Reply: MSA, QAK (QAK-1 = QPD-2 query tag, QAK-2 ``OK``/``NF``, QAK-3 = QPD-1,
    QAK-4/5/6 = 1/1/0 or 0/0/0), QPD (the request's, echoed), then PID and PD1 when found.
    An archived patient is not found (NF), even by its own PAS number.

QBP^Q22 Find Candidates → RSP^K22 (structure RSP_K22); QBP^ZV1 → RSP^ZV2 (RSP_ZV2)
    QPD-3 repeats ``@<field>^<value>``; all must hold (AND). Text compares case- and
    accent-insensitively; a trailing ``*`` makes it a prefix match (``SMITH*``).

    ==============  =====================================================================
    ``PID.3.1``     identifier, exact. With ``PID.3.5`` = ``PI`` the PAS number, ``NH`` the
                    NHS number, another type an old identifier of that type (PATIENT_IDS,
                    e.g. ``OLDHN``); without a type any of them. (``PID.3``, ``PID.3.1.1``
                    are read as ``PID.3.1``; ``PID.3.4`` ``NHS``/``RX1`` acts as a type.)
    ``PID.5.1``     family name (``PID.5``, ``PID.5.1.1`` too)
    ``PID.5.2``     given name: the first OR the second forename
    ``PID.5.3``     second forename
    ``PID.7``       birth date ``YYYYMMDD`` exactly; ``YYYY`` or ``YYYYMM`` for a year/month
    ``PID.8``       sex, ``M F O U`` or ``1 2 9 X`` (either set, whatever ``sex_codes``)
    ``PID.11.5``    postcode of any address, current or past, ignoring spaces
    ==============  =====================================================================

    ZV1 also takes ``PV1.2`` (``I`` ordinary / ``D`` day case), ``PV1.3`` ward code,
    ``PV1.7`` consultant GMC code, ``PV1.10`` specialty code, ``PV1.19`` spell number (all
    exact), and ``PV1.44`` / ``PV1.45`` admission / discharge date ranges written
    ``<from>-<to>`` with inclusive ``YYYYMMDD[HHMM]`` ends, either end open (``20240101-``,
    ``-20241231``), or a single ``YYYYMMDD`` meaning that day. Anything else → AE 103 (the
    field is named in the text); no criteria → AE 101.

    Archived patients (ARCHV_FLAG ``Y``, merged duplicates) are never returned, by any query.
    Q22 returns one PID [PD1] group per patient ordered by PATNT_REFNO; ZV1 one PID [PD1] PV1
    PV2 group per PROVIDER_SPELLS row, ordered by patient then spell key.

    Paging: RCP-2 ``<n>^RD`` is the page size, capped at ``max_quantity`` (also the default);
    ``0`` returns the counts only. QAK-4 = total hits, QAK-5 = hits in this reply, QAK-6 =
    hits remaining after it. When some remain, the reply ends with ``DSC|<pointer>|I``. To get
    the next page, send the same query (same QBP trigger and QPD-3; the QPD-2 tag may differ)
    with ``DSC|<pointer>|I``. The pointer is opaque (base64url of a hash of the query and the
    last key returned): for another query, or altered, it is AE 102. No hits → QAK-2 ``NF``
    and no groups (MSA-1 is still ``AA``).

PID (in every reply group)
    PID-1 set id; PID-3 repetitions ``<PASID>^^^RX1^PI``, ``<NHS number>^^^NHS^NH`` (if any),
    then each old identifier ``<id>^^^RX1^<type>^^<from YYYYMMDD>^<to YYYYMMDD>`` (CX-7/8);
    PID-5 ``SURNAME^FORENAME^SECOND^^TITLE^^L``; PID-7 birth date ``YYYYMMDD``; PID-8 sex
    (``sex_codes="hl7"``: M F O U; ``"nhs"``: the NHS Data Dictionary codes 1 2 9 X, as the
    ITK samples send); PID-11 every address, current ones first (then by start date):
    ``LINE1^LINE2^LINE3^LINE4^POSTCODE^^<type>^^^^^<from>&<to>`` with type ``H`` home,
    ``C`` temporary, ``M`` correspondence and XAD-12 the validity range (``YYYYMMDDHHMM``; no
    end = current); PID-13 ``<home>^PRN^PH``, ``<mobile>^ORN^CP``, ``^NET^Internet^<email>``
    (those present, in that order); PID-15 language (local code), PID-16 marital status
    (local code), PID-22 ethnic category (local code, as ITK), PID-29 date of death
    ``YYYYMMDDHHMM`` and PID-30 ``Y`` when dead, PID-32 the NHS number status as ITK
    table 0445: ``NSTS01`` .. ``NSTS08``.
PD1 (when there is a current GP registration)
    PD1-3 ``<practice name>^^<practice ODS code>``, PD1-4
    ``<GP national code>^<SURNAME>^<FORENAME>^^^<TITLE>^^^GMP``.
PV1 / PV2 (ZV2 only)
    PV1-1 set id; PV1-2 ``I`` ordinary admission / ``D`` day case (a local value);
    PV1-3 ``<ward code>^^^RX1^^^^^<ward name>``; PV1-4 admission method;
    PV1-7 ``<GMC code>^<SURNAME>^<FORENAME>^^^<TITLE>^^^GMC``; PV1-10 main specialty;
    PV1-14 source of admission; PV1-18 patient classification (local ``1``/``2``);
    PV1-19 ``<spell number>^^^RX1^VN``; PV1-36 discharge method; PV1-37 discharge
    destination; PV1-41 spell status (local ``A``/``D``/``C``); PV1-44 admitted, PV1-45
    discharged (``YYYYMMDDHHMM``). PV2 is empty (the demo PAS holds no expected dates).

ADT^A28 Add Person → ACK^A28
    Creates a patient from PID (and PD1): PID-5.1 family and PID-5.2 given name and PID-7
    birth date are required (AE 101); PID-8 missing means ``X`` (not known). PID-3: a ``PI``
    repetition that already exists → AE 205; a new one is used as the PAS number, otherwise
    the next free ``D`` + 7 digits is allocated. An ``NH`` repetition must be a valid NHS
    number (AE 102) that no patient has (AE 205). PID-11 repetitions become addresses (all, with
    their XAD-12 ranges; no start means now), PID-13 by equipment type (``CP`` mobile,
    ``Internet``/``X.400`` or use ``NET`` e-mail, else home phone), PID-15, 16, 22, 29, 32 as
    above. PD1-3.3 (practice ODS code) and PD1-4.1 (GP code) start a GP registration; an
    unknown code → AE 204. **The ACK (AA) carries ``PID|1||<PASID>^^^RX1^PI[~<NHS>^^^NHS^NH]``:
    the gateway learns the new patient's PAS number from the PID in the ACK.**
ADT^A31 Update Person → ACK^A31
    Finds the patient by the PID-3 ``PI`` repetition (none, unknown or archived → AE 204) and
    applies HL7 update rules: an empty or absent field leaves the value alone, ``""`` (the HL7
    null) clears it (AE 101 for a required one). A repeating field, when sent, is the new list:
    PID-13 replaces all three telecom columns. PID-11: for each address type sent without an
    end date, a different address end-dates the current one of that type and starts the new
    one (the same address changes nothing). A PD1-3/PD1-4 naming another practice or GP ends
    the current GP registration and starts a new one; PD1-3 ``""`` just ends it. MODIF_DTTM is
    set. The ACK carries the same PID-3 as for A28.
ADT^A01 Admit/Visit Notification → ACK^A01 (profiles ``demo`` and ``itk``; ``strict``: AR 201)
    Adds an inpatient spell (PROVIDER_SPELLS, status ``A``) for the patient named by the PID-3
    ``PI`` repetition (else the NHS number; none, unknown or archived → AE 204). PV1-44
    admitted ``YYYYMMDD[HHMM]`` is required (AE 101); PV1-2 ``I``/``D`` (AE 103 otherwise),
    PV1-3.1 ward code and PV1-7.1 consultant GMC code must be known (AE 204); PV1-4, PV1-10
    and PV1-14 are stored as sent. PV1-19.1, when sent, is the spell number (AE 205 if taken),
    otherwise the next free ``IP`` + 8 digits is allocated. With ``ack_pid`` the ACK (AA)
    carries ``PID|1||<PASID>^^^RX1^PI`` and ``PV1|1|...|<spell number>^^^RX1^VN`` (PV1-19);
    the spell is then in every ZV1 answer.
Resends
    A28, A31 and A01 are idempotent on (MSH-3, MSH-4, MSH-10): a message whose control id was
    already processed gets the very same ACK again (same bytes) without being applied twice —
    so a resend after a lost ACK never creates a duplicate patient. (Remembered in memory, for
    the last 10,000 messages.) Queries are simply answered again.

Faults (``PasSimulator.faults``, see :class:`Faults`)
    NAK faults answer without processing, with an ``ACK`` (for queries too) MSA-1 ``AE``/``AR``
    and ERR 207; they are not remembered, so a resend is processed. A dropped reply is a
    message processed (and, for ADT, remembered) whose connection closes without an answer.

The simulator is for tests and demos: writes are serialised, and its idempotency memory is
lost on restart. Use ``careconnect-gateway pas-simulator`` to run it on its own.
"""

from __future__ import annotations

from gateway.demo_pas.hl7v2.faults import Faults
from gateway.demo_pas.hl7v2.listener import PasSimulator
from gateway.demo_pas.hl7v2.profiles import PROFILES, Profile

__all__ = ["PROFILES", "Faults", "PasSimulator", "Profile"]
