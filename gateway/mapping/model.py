"""The schema of a mapping file, checked with pydantic at load time (never on the hot path).

A mapping file describes one FHIR resource type served from one source:

    resource / profile          what it produces
    source                      where records come from (adapter-specific; checked by the adapter)
    types                       how the source stores values that need interpreting
    id / last_updated           the record key and update timestamp
    search / search_policy      which FHIR search parameters work and how they translate
    output                      the resource, shaped like the FHIR it produces

See mappings/README.md for the operations-facing description.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.mapping.storage import STORAGE_TYPES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


ID_PREFIX_RE = r"^[A-Za-z0-9]{1,15}[-.]$"


class RefSource(_Strict):
    """One column of a reference and the source of the target type its keys belong to:
    ``{column: h.OPATT_REFNO, id_prefix: op-}`` holds keys of the target's source declaring
    ``id_prefix: op-`` (served as ``Encounter/op-<key>``); without ``id_prefix``, of its
    source without one."""

    column: str
    id_prefix: str | None = Field(default=None, pattern=ID_PREFIX_RE)


class RefColumn(NamedTuple):
    """One column of a reference parameter (SearchParam.reference_columns)."""

    target: str
    """The resource type it refers to."""
    ref: str
    """The source reference (``alias.COLUMN``) holding the target's keys."""
    prefix: str
    """The ``id_prefix`` of the target's source those keys belong to ("" for none)."""


class Expr(_Strict):
    """A value read from a record: ``{column: p.SURNAME, transform: title_case}``."""

    column: str | None = None
    field: str | None = None
    function: str | None = None
    args: list[str] = Field(default_factory=list)
    transform: str | list[str] | None = None
    codemap: str | None = None
    part: Literal["code", "display", "system", "coding", "codeable-concept"] = "code"
    ref: str | None = None
    id_prefix: str | None = Field(default=None, pattern=ID_PREFIX_RE)
    """With ``ref``: the column holds keys of the target type's source with this prefix
    (``{column: e.AEATT_REFNO, ref: Encounter, id_prefix: ae-}`` → ``Encounter/ae-5``)."""
    sources: list[RefSource] | None = None
    """With ``ref`` instead of ``column``: the first of these columns with a value, each
    naming the target's source its keys belong to (a record linked to an inpatient spell or
    to an outpatient attendance)."""
    where: dict[str, str] = Field(default_factory=dict)
    """HL7 v2: pick the repetition whose other components hold these values
    (``{field: PID-3.1, where: {PID-3.5: NH}}`` — the CX whose identifier type is NH)."""

    @model_validator(mode="after")
    def _one_source(self) -> Expr:
        if self.sources is not None:
            if not self.ref:
                raise ValueError("sources: lists the columns of a reference; it goes with ref")
            if not self.sources:
                raise ValueError("sources: lists at least one column")
            if (self.column or self.field or self.function or self.transform or self.codemap
                    or self.id_prefix or self.where):
                raise ValueError("a reference with sources takes only ref (each source names "
                                 "its column and id_prefix)")
            return self
        if self.id_prefix and not self.ref:
            raise ValueError("id_prefix names a source of the referenced type; it goes with ref")
        given = [k for k in ("column", "field", "function") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("an expression needs exactly one of: column, field, function")
        if self.function and (self.transform or self.codemap):
            raise ValueError("a function's result cannot be transformed or code-mapped")
        if self.where and not self.field:
            raise ValueError("where: selects an HL7 v2 repetition; it goes with field")
        if self.part != "code" and not self.codemap:
            raise ValueError("part: display/system/coding/codeable-concept needs a codemap")
        return self

    @property
    def source_ref(self) -> str | None:
        return with_where(self.column or self.field, self.where)


def with_where(ref: str | None, where: dict[str, str]) -> str | None:
    """The record key of a reference narrowed by ``where``: ``PID-3.1[PID-3.5=NH]``."""
    if ref is None or not where:
        return ref
    return ref + "[" + ",".join(f"{k}={v}" for k, v in sorted(where.items())) + "]"


EXPR_KEYS = frozenset({"column", "field", "function", "sources"})


class TokenSystem(_Strict):
    system: str
    column: str | None = None
    field: str | None = None
    check: Literal["nhs-number"] | None = None
    when: dict[str, str | list[str]] = Field(default_factory=dict)
    """Only rows where these references hold these values carry this system."""
    where: dict[str, str] = Field(default_factory=dict)
    """HL7 v2: the repetition whose other components hold these values (see Expr.where)."""
    codemap: str | None = None
    """The column holds local codes this code map translates into ``system``: a search code is
    turned into the local codes that map to it (Read v2 stored, SNOMED CT searched)."""

    @property
    def source_ref(self) -> str:
        ref = with_where(self.column or self.field, self.where)
        assert ref
        return ref

    @model_validator(mode="after")
    def _has_ref(self) -> TokenSystem:
        if not (self.column or self.field):
            raise ValueError("an identifier system needs a column or field")
        return self


class Period(_Strict):
    start: str
    end: str


class QuantityUnit(_Strict):
    """Where a ``quantity`` parameter finds the unit: a column, translated by a code map into
    the code system a search names (UCUM), or matched as stored when no map is given."""

    column: str
    codemap: str | None = None


class SearchParam(_Strict):
    type: Literal["string", "token", "date", "reference", "quantity"]
    description: str | None = None
    column: str | None = None
    field: str | None = None
    columns: list[str] | None = None
    codemap: str | None = None
    systems: list[TokenSystem] | None = None
    period: Period | None = None
    target: str | None = None
    targets: dict[str, str] | None = None
    unit: QuantityUnit | None = None
    """A ``quantity`` parameter's unit (the number is ``column``)."""
    id_prefix: str | None = Field(default=None, pattern=ID_PREFIX_RE)
    """A reference parameter with ``target`` and ``column``: the column holds keys of the
    target's source with this prefix (``encounter=ae-5`` compares the column with 5)."""
    sources: list[RefSource] | None = None
    """A reference parameter with ``target``: several columns, each holding keys of one
    source of the target (a match through any of them)."""

    @model_validator(mode="after")
    def _shape(self) -> SearchParam:
        single = self.column or self.field
        if self.unit is not None and self.type != "quantity":
            raise ValueError("unit is only for quantity parameters")
        if (self.id_prefix or self.sources is not None) and not (
                self.type == "reference" and self.target):
            raise ValueError("id_prefix and sources are for reference parameters with target")
        if self.sources is not None:
            if single or self.columns or self.id_prefix:
                raise ValueError("use either sources or column (+ id_prefix), not both")
            if not self.sources:
                raise ValueError("sources: lists at least one column")
            return self
        if self.type == "quantity":
            if not self.column or self.field or self.columns:
                raise ValueError("a quantity parameter reads its number from one column "
                                 "(SQL sources)")
        elif self.type == "reference":
            if bool(self.targets) == bool(self.target):
                raise ValueError("a reference parameter needs either target (+ column) or targets")
            if self.target and not single:
                raise ValueError("a reference parameter with target needs a column")
        elif self.type == "token" and self.systems:
            if single or self.columns or self.codemap:
                raise ValueError("use either systems or column/columns (+ codemap), not both")
        elif self.type == "date" and self.period:
            if single or self.columns:
                raise ValueError("use either period or column, not both")
        elif sum(bool(x) for x in (single, self.columns)) != 1:
            raise ValueError("a search parameter needs one of: column, columns")
        if self.codemap and self.type != "token":
            raise ValueError("codemap is only for token parameters")
        return self

    system: str | None = None
    """For a plain token parameter: the one system its codes belong to."""
    where: dict[str, str] = Field(default_factory=dict)
    """HL7 v2: narrow column/field/columns/target to a repetition (see Expr.where)."""

    @property
    def refs(self) -> list[str]:
        if self.sources:
            return [s.column for s in self.sources]
        if self.systems:
            return [s.source_ref for s in self.systems]
        if self.period:
            return [self.period.start, self.period.end]
        if self.targets:
            return [with_where(r, self.where) or r for r in self.targets.values()]
        single = self.column or self.field
        refs = [single] if single else list(self.columns or [])
        if self.unit is not None:  # the number first: what a sort or :missing reads
            refs.append(self.unit.column)
        return [with_where(r, self.where) or r for r in refs]

    def reference_targets(self) -> dict[str, str]:
        """Target type → its first column. Only for which types it refers to: a type may
        have several columns (``sources``); :meth:`reference_columns` gives them all."""
        out: dict[str, str] = {}
        for c in self.reference_columns():
            out.setdefault(c.target, c.ref)
        return out

    def reference_columns(self) -> list[RefColumn]:
        """Every column of a reference parameter, with its target type and the id prefix of
        the target's source whose keys it holds."""
        if self.targets:
            return [RefColumn(t, with_where(r, self.where) or r, "")
                    for t, r in self.targets.items()]
        if self.target and self.sources:
            return [RefColumn(self.target, s.column, s.id_prefix or "") for s in self.sources]
        if self.target:
            return [RefColumn(self.target, self.refs[0], self.id_prefix or "")]
        return []


class SearchPolicy(_Strict):
    """Care Connect-style rules on which combinations a search must use."""

    minimum_parameters: int = 1
    distinct_types: bool = False
    unless_any_of: list[str] = Field(default_factory=list)
    chains: bool = True
    """Also for chained parameters into this type from another type's search
    (``Observation?subject:Patient.birthdate=...``); false: only for its own search."""


class BinaryBlob(_Strict):
    table: str
    key: str
    column: str


class BinaryContent(_Strict):
    """Where ``Binary/[id]`` finds the bytes of this type's records (gateway/binary.py; SQL
    sources only). ``media_type`` and ``file`` are ``alias.COLUMN`` of the main table; a row
    with a ``file`` path is read under the document root, any other from ``blob``."""

    media_type: str
    file: str | None = None
    blob: BinaryBlob | None = None


class MappingFile(_Strict):
    resource: str
    profile: str
    description: str | None = None
    id_prefix: str | None = Field(default=None, pattern=ID_PREFIX_RE)
    """Put before every id of this source (``op-``): ids stay unique when several sources
    serve one type, and a read by id goes to the source whose prefix it carries."""
    source: dict[str, Any]
    types: dict[str, str] = Field(default_factory=dict)
    id: Expr
    last_updated: Expr | None = None
    search: dict[str, SearchParam] = Field(default_factory=dict)
    search_policy: SearchPolicy | None = None
    sort: list[str] = Field(default_factory=list)
    binary: BinaryContent | None = None
    output: dict[str, Any]

    @model_validator(mode="after")
    def _check(self) -> MappingFile:
        for ref, kind in self.types.items():
            if kind not in STORAGE_TYPES:
                raise ValueError(
                    f"types.{ref}: unknown storage type {kind!r} "
                    f"(one of: {', '.join(STORAGE_TYPES)})"
                )
        if self.binary is not None:
            alias = self.source.get("alias")
            for key in ("media_type", "file"):
                ref = getattr(self.binary, key)
                if ref is not None and (not alias or ref.split(".", 1)[0] != alias
                                        or "." not in ref):
                    raise ValueError(f"binary.{key}: must be a column of the main table "
                                     f"({alias}.COLUMN), not {ref!r}")
        for key in ("resourceType", "id", "meta"):
            if key in self.output:
                raise ValueError(f"output.{key}: must not be set (resourceType, id and meta "
                                 "are derived)")
        for name in self.search:
            if name.startswith("_"):
                raise ValueError(f"search.{name}: parameters starting with '_' are built in")
        for name in self.sort:
            param = self.search.get(name)
            if param is None or param.type not in ("string", "date") or len(param.refs) != (
                2 if param.period else 1
            ):
                raise ValueError(
                    f"sort: {name!r} must be a declared string or date parameter on one column"
                )
        return self


class Connection(_Strict):
    adapter: str
    url: str | None = None
    url_env: str | None = None
    default: Literal["embedded-demo"] | None = None
    timezone: str = "Europe/London"
    pool_size: int = 5
    timeout_seconds: float = 10.0
    options: dict[str, Any] = Field(default_factory=dict)


class MappingSet(_Strict):
    """``connections.yaml`` of a mapping directory."""

    connections: dict[str, Connection]
    codemaps: str = "../codemaps"
    include: list[str] = Field(default_factory=list)
    """Mapping files from elsewhere to load as if they were here (shared, not copied)."""
    base_url: str | None = None
