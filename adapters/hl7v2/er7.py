"""A fast, lazy reader for HL7 v2 ER7 ("pipe and hat") messages.

hl7apy builds a full object tree (≈6 ms a message); the gateway only reads a few dozen values
from each reply, so this reader does the least work that can answer ``value()``:

* ``parse`` decodes the bytes, finds the encoding characters in MSH-1/MSH-2 and splits the
  text into segments — nothing more;
* a segment splits into fields on its first ``value()``/``raw()`` and keeps the split;
* repetitions, components and sub-components are split on demand, and escape sequences are
  decoded only in the value asked for.

Every input either parses or raises :class:`Er7Error` (property-tested on arbitrary bytes and
text); the work is linear in the input, so nothing can make it hang. Error messages name a
position or a rule, never content: a message is PHI.

Decisions (see also ``decode`` and ``parse``):

* Segments end with ``\\r``; files that use ``\\n`` or ``\\r\\n`` line ends are accepted too.
  When a message contains any ``\\r``, only ``\\r`` ends a segment (an ``\\n`` beside it, or
  at the very end, is part of the line end), so a line feed inside a value (free text from a
  PAS) stays data instead of starting a bogus segment.
* ``""`` (the HL7 null, "delete this value") and empty values both read as ``None``.
* Bytes are decoded before splitting (UTF-8 continuation bytes and most legacy encodings
  never collide with delimiters, but splitting text is the only safe order).
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "Encoding",
    "Er7Error",
    "Message",
    "Segment",
    "charset_of",
    "decode",
    "encode",
    "parse",
    "python_to_hl7_charset",
]


class Er7Error(Exception):
    """Any malformed input. The ONLY exception ``parse()`` raises."""


class _Er7InternalError(Er7Error):
    """An unexpected failure inside the reader, reported as Er7Error to keep the contract.

    A separate class so the property tests can tell a reader bug from malformed input.
    """


def _delimiter_problem(chars: str) -> str | None:
    """Why these would not work as encoding characters, or None if they would."""
    if len(set(chars)) != len(chars):
        return "encoding characters must all differ"
    for c in chars:
        # Letters, digits and spaces would be read as data; control characters as framing.
        if c.isalnum() or c == " " or not c.isprintable():
            return "encoding characters must be printable punctuation"
    return None


@dataclass(frozen=True, slots=True)
class Encoding:
    """The five delimiters from MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    def __post_init__(self) -> None:
        chars = (self.field, self.component, self.repetition, self.escape, self.subcomponent)
        problem = (_delimiter_problem("".join(chars)) if all(len(c) == 1 for c in chars)
                   else "each encoding character is one character")
        if problem is not None:
            raise ValueError(problem)


DEFAULT_ENCODING = Encoding()

# --- character sets ---------------------------------------------------------------------------

# HL7 table 0211 (v2.4, plus the v2.5 UTF-8 name) → Python codec names. Only character sets in
# which ASCII, and so the delimiters and MLLP framing bytes, keep their one-byte values: UTF-16
# and UTF-32 cannot travel over MLLP as framed here, and the ISO 2022 / double-byte sets are not
# used by UK PAS systems (and can put delimiter bytes inside characters).
_HL7_TO_PYTHON: dict[str, str] = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    # v2.4 has only "UNICODE" (ISO 10646, no encoding form named). The NHS ITK samples use it
    # for messages whose bytes are ASCII/UTF-8; a message whose MSH-18 we could read as bytes
    # is in an ASCII-compatible form, so UTF-8 is the only reading that makes sense.
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    # Not in table 0211, but seen from real senders and unambiguous.
    "UTF-8": "utf-8",
}

# Reverse, keyed by the codec's canonical name; UTF-8 goes out under its unambiguous v2.5 name.
_PYTHON_TO_HL7: dict[str, str] = {
    codecs.lookup(codec).name: name
    for name, codec in _HL7_TO_PYTHON.items()
    if name not in ("UNICODE", "UTF-8")
}

def charset_of(msh18: str | None) -> str:
    """The Python codec for an MSH-18 character set name (HL7 table 0211).

    ``None`` or empty (MSH-18 not valued) means the HL7 default, read as UTF-8 (ASCII is a
    subset of it). Names compare case-insensitively, ignoring surrounding and repeated spaces.
    An unknown name raises :class:`Er7Error`: decoding a name with the wrong character set
    silently corrupts it, which is worse than refusing the message.
    """
    if msh18 is None:
        return "utf-8"
    key = " ".join(msh18.split()).upper()
    if not key:
        return "utf-8"
    try:
        return _HL7_TO_PYTHON[key]
    except KeyError:
        # Not echoed: in a garbled MSH the text in this position could be anything, PHI too.
        raise Er7Error("unsupported MSH-18 character set") from None


def python_to_hl7_charset(codec: str, *, version: str = "2.5") -> str:
    """The MSH-18 name for a Python codec (the reverse of :func:`charset_of`).

    UTF-8 is ``UNICODE UTF-8`` (v2.5 and later); pass ``version="2.4"`` (or earlier) to get
    ``UNICODE``, the only v2.4 name for it. Codecs with no table 0211 name raise Er7Error.
    """
    try:
        canonical = codecs.lookup(codec).name
    except LookupError:
        raise Er7Error("unknown Python codec") from None
    name = _PYTHON_TO_HL7.get(canonical)
    if name is None:
        raise Er7Error(f"codec {canonical!r} has no HL7 table 0211 name")
    if name == "UNICODE UTF-8" and _version_tuple(version) < (2, 5):
        return "UNICODE"
    return name


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for part in version.split(".")[:3]:
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


# --- escape sequences -------------------------------------------------------------------------

_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})*")
_FORMATTING = re.compile(r"\.(br|sp|sk|ce|fi|nf|in|ti)(?:[+-]?[0-9]{0,4})")
# What the FT formatting commands become in plain text. Line breaks become "\n", the line end
# of the FHIR strings and Python text this feeds (a "\r" would be re-read as a segment end if
# the value were ever written back into a message); layout-only commands are dropped. Counts
# ("\.sp3\") are not reproduced: a count must never make the output grow without bound.
_FORMAT_TEXT = {"br": "\n", "sp": "\n", "ce": "\n", "sk": " ",
                "fi": "", "nf": "", "in": "", "ti": ""}


def _hex_text(digits: str) -> str:
    data = bytes.fromhex(digits)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _escape_text(seq: str, enc: Encoding) -> str | None:
    """The text for one escape sequence (without its escape characters), None if unknown."""
    if not seq:  # two escape characters in a row
        return None
    if len(seq) == 1:
        if seq == "F":
            return enc.field
        if seq == "S":
            return enc.component
        if seq == "T":
            return enc.subcomponent
        if seq == "R":
            return enc.repetition
        if seq == "E":
            return enc.escape
        if seq in "HNX":  # highlighting on/off: no meaning in plain text; X: no hex digits
            return ""
        return None
    if seq[0] == "X":
        digits = seq[1:]
        return _hex_text(digits) if _HEX.fullmatch(digits) else None
    m = _FORMATTING.fullmatch(seq)
    if m is not None:
        return _FORMAT_TEXT[m.group(1)]
    return None


def decode(text: str, enc: Encoding) -> str:
    """Replace HL7 escape sequences in one value (a component or sub-component).

    * ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` → the delimiter characters of ``enc``;
    * ``\\Xhh..\\`` → those bytes, read as UTF-8 when they are valid UTF-8, else as Latin-1
      (for the ASCII controls senders escape, ``\\X0D\\`` ``\\X0A\\``, both agree);
    * ``\\.br\\``, ``\\.sp\\``, ``\\.ce\\`` → ``"\\n"``; ``\\.sk\\`` → a space;
      ``\\.fi\\ \\.nf\\ \\.in\\ \\.ti\\`` and highlighting ``\\H\\ \\N\\`` → nothing;
    * anything else (``\\Zxx\\`` local escapes, ``\\C..\\``/``\\M..\\`` character-set switches,
      a malformed ``\\X\\``, an escape character with no closing one) is kept exactly as sent:
      an unrecognised sequence loses no data, and legacy senders often put an unescaped
      backslash in free text.
    """
    esc = enc.escape
    if esc not in text:
        return text
    out: list[str] = []
    pos = 0
    while True:
        start = text.find(esc, pos)
        if start < 0:
            break
        end = text.find(esc, start + 1)
        if end < 0:
            break
        replacement = _escape_text(text[start + 1 : end], enc)
        out.append(text[pos:start])
        out.append(text[start : end + 1] if replacement is None else replacement)
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


@functools.lru_cache(maxsize=64)
def _escape_table(enc: Encoding) -> dict[int, str]:
    e = enc.escape
    table = {ord(c): f"{e}X{ord(c):02X}{e}" for c in map(chr, [*range(0x20), 0x7F])}
    table.update({
        ord(enc.escape): f"{e}E{e}",
        ord(enc.field): f"{e}F{e}",
        ord(enc.component): f"{e}S{e}",
        ord(enc.subcomponent): f"{e}T{e}",
        ord(enc.repetition): f"{e}R{e}",
    })
    return table


def encode(text: str, enc: Encoding) -> str:
    """Escape a value for output, so that ``decode(encode(x, enc), enc) == x`` for any ``x``.

    The delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``; control characters (which include
    ``\\r``, the segment end, and ``0x0B``/``0x1C``, the MLLP frame bytes) become ``\\Xhh\\``.
    The one value HL7 cannot carry is the literal two-character string ``""``, which every
    reader takes as the HL7 null.
    """
    return text.translate(_escape_table(enc))


# --- the message model ------------------------------------------------------------------------


class Segment:
    """One segment. Fields are numbered as in HL7: for MSH, field 1 is the field separator."""

    __slots__ = ("_enc", "_fields", "_msh", "_text", "name")

    def __init__(self, name: str, text: str, enc: Encoding) -> None:
        self.name = name
        self._text = text
        self._enc = enc
        self._msh = name == "MSH"
        self._fields: list[str] | None = None

    def _split(self) -> list[str]:
        fields = self._text.split(self._enc.field)
        if self._msh:
            # "MSH|^~\&|APP" splits to MSH, ^~\&, APP: put MSH-1 (the separator) in its place.
            fields.insert(1, self._enc.field)
        self._fields = fields
        return fields

    def __len__(self) -> int:
        """The number of the last field present."""
        fields = self._fields if self._fields is not None else self._split()
        return len(fields) - 1

    def __bool__(self) -> bool:  # a segment with no fields is still there
        return True

    def __repr__(self) -> str:  # never the content: it is PHI
        return f"<Segment {self.name} with {len(self)} fields>"

    def raw(self, field: int) -> str:
        """The field's text as sent (all repetitions, escapes not decoded); '' if absent."""
        if field < 1:
            raise ValueError("HL7 fields are numbered from 1")
        fields = self._fields if self._fields is not None else self._split()
        return fields[field] if field < len(fields) else ""

    def repetitions(self, field: int) -> int:
        """How many repetitions the field has (0 if it is empty or absent)."""
        text = self.raw(field)
        if not text:
            return 0
        if self._msh and field < 3:
            return 1
        return text.count(self._enc.repetition) + 1

    def value(
        self, field: int, component: int = 1, subcomponent: int = 1, repetition: int = 0
    ) -> str | None:
        """One decoded value: ``value(5, 1)`` is PID-5.1, ``value(3, 5, repetition=1)`` is the
        identifier type of PID-3's second repetition. Components and sub-components count from
        1, repetitions from 0. Empty, ``""`` (the HL7 null) and absent values are ``None``.
        """
        fields = self._fields if self._fields is not None else self._split()
        if field < 1 or component < 1 or subcomponent < 1 or repetition < 0:
            raise ValueError("fields, components and sub-components count from 1, "
                             "repetitions from 0")
        if field >= len(fields):
            return None
        text = fields[field]
        if not text:
            return None
        if self._msh and field < 3:
            # MSH-1 and MSH-2 are the delimiters themselves: never split or decoded.
            return text if component == 1 and subcomponent == 1 and repetition == 0 else None
        enc = self._enc
        if repetition or enc.repetition in text:
            parts = text.split(enc.repetition)
            if repetition >= len(parts):
                return None
            text = parts[repetition]
        if component > 1 or enc.component in text:
            parts = text.split(enc.component)
            if component > len(parts):
                return None
            text = parts[component - 1]
        if subcomponent > 1 or enc.subcomponent in text:
            parts = text.split(enc.subcomponent)
            if subcomponent > len(parts):
                return None
            text = parts[subcomponent - 1]
        if not text or text == '""':
            return None
        if enc.escape in text:
            return decode(text, enc)
        return text


class Message:
    """A parsed message: its delimiters and its segments, in order."""

    __slots__ = ("_index", "charset", "encoding", "segments")

    def __init__(self, encoding: Encoding, segments: list[Segment], charset: str | None) -> None:
        self.encoding = encoding
        self.segments = segments
        self.charset = charset
        """The codec the bytes were decoded with (None when parsed from ``str``). ``latin-1``
        where MSH-18 said (or implied) UTF-8 means the sender's bytes were not valid UTF-8."""
        self._index: dict[str, list[Segment]] | None = None

    def __repr__(self) -> str:  # control id and type are not PHI; the rest may be
        return (f"<Message {self.message_type or '?'} control_id={self.control_id!r} "
                f"with {len(self.segments)} segments>")

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def _by_name(self) -> dict[str, list[Segment]]:
        if self._index is None:
            index: dict[str, list[Segment]] = {}
            for seg in self.segments:
                index.setdefault(seg.name, []).append(seg)
            self._index = index
        return self._index

    def segment(self, name: str) -> Segment | None:
        """The first segment with this name."""
        found = self._by_name().get(name)
        return found[0] if found else None

    def all(self, name: str) -> list[Segment]:
        return list(self._by_name().get(name, ()))

    def groups(self, start: str, until: set[str] | None = None) -> list[list[Segment]]:
        """Split into groups that each begin at a ``start`` segment.

        A group holds its ``start`` segment and the segments after it, up to the next
        ``start`` or the first segment named in ``until`` (which belongs to no group).
        Segments before the first ``start`` belong to no group. In an RSP^K22,
        ``groups("PID", {"DSC"})`` gives one PID/PD1/NK1/QRI... list per patient.
        """
        out: list[list[Segment]] = []
        current: list[Segment] | None = None
        for seg in self.segments:
            if seg.name == start:
                current = [seg]
                out.append(current)
            elif until is not None and seg.name in until:
                current = None
            elif current is not None:
                current.append(seg)
        return out

    @property
    def control_id(self) -> str | None:
        """MSH-10."""
        return self.segments[0].value(10)

    @property
    def message_type(self) -> str | None:
        """MSH-9 as sent, e.g. ``RSP^K22^RSP_K21``."""
        return self.segments[0].raw(9) or None


# --- parsing ----------------------------------------------------------------------------------

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_UTF8_BOM = b"\xef\xbb\xbf"
# Blank lines before MSH, then the rest of the MSH line: how MSH-18 is found in raw bytes.
# Linear: the only backtracking is over one run of spaces and tabs.
_LEADING_BLANK_LINES = re.compile(rb"(?:[ \t]*[\r\n])*")
_REST_OF_LINE = re.compile(rb"[^\r\n]*")


def parse(data: str | bytes, *, charset: str | None = None) -> Message:
    """Read one ER7 message.

    Bytes are decoded with ``charset`` (a Python codec name) when given, strictly. Otherwise
    with the character set MSH-18 names (read from the raw bytes; see :func:`charset_of`);
    when that is UTF-8 or ASCII (or MSH-18 is empty) and the bytes are not valid in it, they
    are read as Latin-1, which cannot fail and is what such senders almost always meant
    (``Message.charset`` says which codec was used). A leading UTF-8 byte order mark is
    skipped.

    The first non-blank segment must be MSH; MSH-1 and MSH-2 give the delimiters (four
    encoding characters, or five with the v2.7 truncation character, which is not used).
    """
    try:
        if isinstance(data, str):
            return _parse_text(data, None)
        if isinstance(data, bytes | bytearray | memoryview):
            text, used = _decode_bytes(bytes(data), charset)
            return _parse_text(text, used)
        raise Er7Error(f"expected str or bytes, got {type(data).__name__}")
    except Er7Error:
        raise
    except Exception as exc:  # the contract is Er7Error only; tests look for this class
        raise _Er7InternalError(f"unreadable message ({type(exc).__name__})") from exc


def _decode_bytes(data: bytes, charset: str | None) -> tuple[str, str]:
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    if charset is not None:
        try:
            codec = codecs.lookup(charset).name
        except LookupError:
            raise Er7Error("unknown character set") from None
        try:
            return data.decode(codec), codec
        except UnicodeDecodeError:
            raise Er7Error(f"message is not valid {codec}") from None
    codec = charset_of(_sniff_msh18(data))
    try:
        return data.decode(codec), codec
    except UnicodeDecodeError:
        if codec not in ("utf-8", "ascii"):
            raise Er7Error(f"message is not valid {codec} (as MSH-18 declares)") from None
    if codec == "ascii":  # declared ASCII, but not: UTF-8 is the superset to try first
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1"), "latin-1"


def _sniff_msh18(data: bytes) -> str | None:
    """MSH-18 (first repetition) read from the raw bytes, or None if not there."""
    start = _LEADING_BLANK_LINES.match(data)
    pos = start.end() if start else 0
    if data[pos : pos + 3] != b"MSH" or len(data) < pos + 8:
        return None
    line_end = _REST_OF_LINE.match(data, pos)
    line = data[pos : line_end.end() if line_end else len(data)]
    fs = line[3:4]
    fields = line.split(fs, 18)  # fields[k] is MSH-(k+1); fields[17] is all of MSH-18
    if len(fields) < 18:
        return None
    value = fields[17]
    rep = fields[1][1:2]
    if rep and rep != fs:
        value = value.split(rep, 1)[0]
    try:
        return value.decode("ascii").strip() or None
    except UnicodeDecodeError:
        raise Er7Error("MSH-18 is not a character set name") from None


def _encoding_of(msh: str) -> Encoding:
    if len(msh) < 8:
        raise Er7Error("MSH segment too short to hold the encoding characters")
    fs = msh[3]
    end = msh.find(fs, 4)
    chars = msh[4:] if end < 0 else msh[4:end]
    if len(chars) not in (4, 5):
        raise Er7Error("MSH-2 must hold four encoding characters")
    problem = _delimiter_problem(fs + chars)
    if problem is not None:
        raise Er7Error(problem)
    return Encoding(fs, chars[0], chars[1], chars[2], chars[3])


def _parse_text(text: str, charset: str | None) -> Message:
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        # Only CR ends a segment; an LF next to a CR (CRLF, LFCR, or an editor's newline at
        # the end of the file) is part of the line end, any other LF is data.
        lines = text.replace("\r\n", "\r").replace("\n\r", "\r").split("\r")
        lines[-1] = lines[-1].rstrip("\n")
    else:
        lines = text.split("\n")
    enc: Encoding | None = None
    fs = ""
    segments: list[Segment] = []
    valid_ids: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line or (line[0] in " \t\n" and not line.strip(" \t\n")):
            continue  # blank line
        name = line[:3]
        if enc is None:
            if name != "MSH":
                raise Er7Error("message does not start with an MSH segment")
            enc = _encoding_of(line)
            fs = enc.field
            valid_ids.add(name)
        elif name not in valid_ids:
            if not _SEGMENT_ID.fullmatch(name):
                raise Er7Error(f"line {number}: not a segment (bad segment name)")
            valid_ids.add(name)
        if len(line) > 3 and line[3] != fs:
            raise Er7Error(f"line {number}: segment name not followed by the field separator")
        # A second MSH (batches are not read here) must use the same delimiters.
        if name == "MSH" and segments and _encoding_of(line) != enc:
            raise Er7Error(f"line {number}: MSH with different encoding characters")
        segments.append(Segment(name, line, enc))
    if enc is None:
        raise Er7Error("empty message")
    return Message(enc, segments, charset)
