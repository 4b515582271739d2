"""Code maps: local codes to national ones with an explicit policy for the unmapped, the
reverse direction for token searches, and each ``part:`` an expression can take."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import structlog
import structlog.testing
from starlette.applications import Starlette

import gateway.mapping.codemaps as codemaps_module
from adapters.base import Compare, Nothing, Or
from adapters.registry import create
from gateway.errors import UnmappableData
from gateway.mapping.codemaps import CodeMap, Target
from gateway.mapping.compile import CompileContext, CompileError, compile_expr
from gateway.mapping.loader import load_directory
from gateway.mapping.model import Expr
from gateway.mapping.storage import make_storage
from gateway.providers import Provider
from gateway.registry import Registry

REPO = Path(__file__).resolve().parents[3]
SEX = "http://hl7.org/fhir/administrative-gender"

pytestmark = pytest.mark.anyio


def sex_map(unmapped: str = "error", default: Target | None = None) -> CodeMap:
    return CodeMap(
        name="sex", target_system=SEX, unmapped=unmapped,  # type: ignore[arg-type]
        entries={"1": Target("male", "Male"), "2": Target("female", "Female"),
                 "9": Target("other", "Other"), "X": Target("unknown", "Unknown"),
                 "M": Target("male", "Male")},
        default=default)


# --- the unmapped policies --------------------------------------------------------------------


def test_a_listed_code_maps_and_surrounding_spaces_do_not_matter() -> None:
    cmap = sex_map()
    assert cmap.lookup("2") == Target("female", "Female")
    assert cmap.lookup(" 2 ") == Target("female", "Female")
    assert cmap.lookup(1) == Target("male", "Male")  # stored as a number


def test_omit_leaves_the_element_out_and_logs_the_map_not_the_value(
        monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[tuple[str, dict[str, object]]] = []

    class Log:
        def debug(self, event: str, **kw: object) -> None:
            logged.append((event, kw))

    monkeypatch.setattr(codemaps_module, "log", Log())
    assert sex_map("omit").lookup("Q") is None
    assert logged == [("unmapped_code", {"codemap": "sex"})]  # never the value itself


@pytest.mark.parametrize("policy", ["omit", "default", "error"])
def test_a_code_listed_without_target_is_left_out_silently(
        policy: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    logged: list[str] = []

    class Log:
        def debug(self, event: str, **kw: object) -> None:
            logged.append(event)

    monkeypatch.setattr(codemaps_module, "log", Log())
    (tmp_path / "kind.yaml").write_text(
        "name: kind\ntarget_system: http://hl7.org/fhir/address-type\n"
        f"unmapped: {policy}\n" + ("default: {code: both}\n" if policy == "default" else "")
        + "map:\n  CORR: {code: postal}\n  HOME: null\n")
    problems: list[object] = []
    cmap = codemaps_module_load(tmp_path, problems)["kind"]
    assert not problems
    assert cmap.lookup("HOME") is None and cmap.lookup(" HOME ") is None
    assert cmap.lookup("CORR") == Target("postal")
    assert logged == []  # a decision, not an unknown code
    assert cmap.local_codes("postal") == ("CORR",)
    assert [t.code for t in cmap.target_codes()] == ["postal"]
    if policy == "omit":
        assert cmap.lookup("Q") is None and logged == ["unmapped_code"]  # unknown: logged
    # through a compiled expression too (its table of listed codes)
    text = make_storage("string", ZoneInfo("Europe/London"))
    build = compile_expr(Expr.model_validate({"column": "a.T", "codemap": "kind"}),
                         CompileContext(codemaps={"kind": cmap}, storage=lambda _r: text),
                         "type")
    assert build({"a.T": "HOME"}) is None and build({"a.T": "CORR"}) == "postal"


def codemaps_module_load(directory: Path, problems: list[object]) -> dict[str, CodeMap]:
    from gateway.mapping.loader import load_codemaps

    return load_codemaps(directory, problems)  # type: ignore[arg-type]


@pytest.mark.parametrize(("level", "lines"), [
    (logging.DEBUG, [{"event": "unmapped_code", "codemap": "sex", "log_level": "debug"}]),
    (logging.INFO, []),
    (logging.WARNING, []),
])
def test_the_unmapped_code_line_follows_the_configured_level(level: int,
                                                             lines: list[object]) -> None:
    before = structlog.get_config()
    try:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
        with structlog.testing.capture_logs() as logs:
            assert sex_map("omit").lookup("Q") is None
        assert logs == lines
    finally:
        structlog.configure(**before)


def test_default_uses_the_declared_target() -> None:
    cmap = sex_map("default", Target("unknown", "Unknown"))
    assert cmap.lookup("Q") == Target("unknown", "Unknown")
    assert cmap.lookup("1") == Target("male", "Male")


def test_error_is_a_502_unmapped_source_code_without_the_value() -> None:
    cmap = sex_map("error")
    with pytest.raises(UnmappableData) as info:
        cmap.lookup("Q-SECRET")
    assert info.value.status == 502
    assert info.value.error_code == "UNMAPPED_SOURCE_CODE"
    assert info.value.issue_code == "code-invalid"
    assert "sex" in info.value.message
    assert "Q-SECRET" not in info.value.message


# --- reverse lookup for token search ----------------------------------------------------------


def test_reverse_lookup_finds_every_local_code_for_a_target() -> None:
    cmap = sex_map()
    assert cmap.local_codes("male") == ("1", "M")
    assert cmap.local_codes("female") == ("2",)
    assert cmap.local_codes("Female") == ()  # codes are case-sensitive
    assert cmap.local_codes("nonsense") == ()
    assert [t.code for t in cmap.target_codes()] == ["male", "female", "other", "unknown"]


def test_reverse_lookup_of_a_default_code_matches_only_the_listed_codes() -> None:
    cmap = sex_map("default", Target("unknown", "Unknown"))
    assert cmap.local_codes("unknown") == ("X",)
    only_default = CodeMap("m", SEX, "default", {"1": Target("male")}, Target("unknown"))
    assert only_default.local_codes("unknown") == ()


def test_the_demo_code_maps_reverse_to_several_local_codes(demo_sqlite_url: str) -> None:
    loaded = load_directory(REPO / "mappings" / "demo-pas", create,
                            urls={"pas": demo_sqlite_url})
    assert loaded.codemaps["address-use"].local_codes("home") == ("HOME", "CORR")
    assert loaded.codemaps["marital-status"].local_codes("M") == ("M", "C")
    assert loaded.codemaps["encounter-class-inpatient"].local_codes("SS") == ("2",)


def test_a_token_search_is_planned_on_the_local_codes(demo_sqlite_url: str) -> None:
    loaded = load_directory(REPO / "mappings" / "demo-pas", create,
                            urls={"pas": demo_sqlite_url})
    # The inpatient Encounter source alone (the others plan on their own columns).
    registry = Registry(Provider(m) for m in loaded.mappings if not m.spec.id_prefix)

    def criteria(rtype: str, pairs: list[tuple[str, str]]) -> object:
        plan = registry.plan(registry.get(rtype), pairs, default_count=20, max_count=100,
                             strict=True)
        return plan.criteria

    assert criteria("Location", [("type", "HU")]) == Compare("l.LOCTY_CODE", "=", "WARD")
    assert criteria("Location", [("type", "http://hl7.org/fhir/v3/RoleCode|OF")]) == Compare(
        "l.LOCTY_CODE", "=", "CLIN")
    assert criteria("Location", [("type", "http://snomed.info/sct|OF")]) == Nothing()
    assert criteria("Location", [("type", "WARD")]) == Nothing()  # a local code is not a code
    assert criteria("Practitioner", [("gender", "male")]) == Compare("c.SEXXX_CODE", "=", "1")
    assert criteria("Encounter", [("status", "in-progress")]) == Compare(
        "s.SPELL_STATUS", "=", "A")
    assert criteria("Encounter", [("class", "IMP,SS")]) == Or((
        Compare("s.PATCL_CODE", "=", "1"), Compare("s.PATCL_CODE", "=", "2")))


# --- parts ------------------------------------------------------------------------------------


def build(expr: dict[str, object], cmap: CodeMap | None = None) -> Callable[[dict[str, object]],
                                                                           object]:
    ctx = CompileContext(codemaps={"sex": cmap or sex_map()},
                         storage=lambda ref: make_storage("string", ZoneInfo("Europe/London")))
    return compile_expr(Expr.model_validate(expr), ctx, "gender")


def test_part_code_display_system() -> None:
    rec = {"p.SEX": "2"}
    assert build({"column": "p.SEX", "codemap": "sex"})(rec) == "female"
    assert build({"column": "p.SEX", "codemap": "sex", "part": "code"})(rec) == "female"
    assert build({"column": "p.SEX", "codemap": "sex", "part": "display"})(rec) == "Female"
    assert build({"column": "p.SEX", "codemap": "sex", "part": "system"})(rec) == SEX


def test_part_coding_and_codeable_concept() -> None:
    rec = {"p.SEX": "9"}
    coding = {"system": SEX, "code": "other", "display": "Other"}
    assert build({"column": "p.SEX", "codemap": "sex", "part": "coding"})(rec) == coding
    assert build({"column": "p.SEX", "codemap": "sex", "part": "codeable-concept"})(rec) == {
        "coding": [coding]}


def test_a_target_without_display_has_no_display_key() -> None:
    cmap = CodeMap("sex", SEX, "omit", {"1": Target("male")})
    assert build({"column": "p.SEX", "codemap": "sex", "part": "coding"}, cmap)(
        {"p.SEX": "1"}) == {"system": SEX, "code": "male"}
    assert build({"column": "p.SEX", "codemap": "sex", "part": "display"}, cmap)(
        {"p.SEX": "1"}) is None


@pytest.mark.parametrize("part", ["code", "display", "system", "coding", "codeable-concept"])
def test_every_part_is_omitted_for_an_unmapped_or_empty_value(part: str) -> None:
    fn = build({"column": "p.SEX", "codemap": "sex", "part": part}, sex_map("omit"))
    assert fn({"p.SEX": "Q"}) is None
    assert fn({"p.SEX": None}) is None
    assert fn({"p.SEX": "   "}) is None  # blank is empty, not an unmapped code
    assert fn({}) is None


@pytest.mark.parametrize("part", ["code", "display", "system", "coding", "codeable-concept"])
def test_every_part_raises_for_an_unmapped_value_under_error(part: str) -> None:
    fn = build({"column": "p.SEX", "codemap": "sex", "part": part}, sex_map("error"))
    with pytest.raises(UnmappableData):
        fn({"p.SEX": "Q"})
    assert fn({"p.SEX": None}) is None  # an empty value is not unmapped


@pytest.mark.parametrize("part", ["code", "display", "system", "coding", "codeable-concept"])
def test_every_part_of_a_default_target_and_of_codes_stored_as_numbers(part: str) -> None:
    fn = build({"column": "p.SEX", "codemap": "sex", "part": part},
               sex_map("default", Target("unknown", "Unknown")))
    unknown, male = fn({"p.SEX": "Q"}), fn({"p.SEX": 1})
    assert unknown == {"code": "unknown", "display": "Unknown", "system": SEX,
                       "coding": {"system": SEX, "code": "unknown", "display": "Unknown"},
                       "codeable-concept": {"coding": [
                           {"system": SEX, "code": "unknown", "display": "Unknown"}]}}[part]
    assert male == fn({"p.SEX": " M "}) == build({"column": "p.SEX", "codemap": "sex",
                                                  "part": part})({"p.SEX": "1"})


def test_an_unmapped_code_is_logged_every_time_it_is_met(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    logged: list[str] = []

    class Log:
        def debug(self, event: str, **kw: object) -> None:
            logged.append(event)

    monkeypatch.setattr(codemaps_module, "log", Log())
    fn = build({"column": "p.SEX", "codemap": "sex", "part": "coding"}, sex_map("omit"))
    assert [fn({"p.SEX": "Q"}), fn({"p.SEX": "Q"}), fn({"p.SEX": "2"})] == [
        None, None, {"system": SEX, "code": "female", "display": "Female"}]
    assert logged == ["unmapped_code", "unmapped_code"]


@pytest.mark.parametrize("part", ["system", "coding", "codeable-concept"])
def test_parts_needing_a_system_need_a_map_with_one(part: str) -> None:
    no_system = CodeMap("sex", None, "omit", {"1": Target("male")})
    with pytest.raises(CompileError) as info:
        build({"column": "p.SEX", "codemap": "sex", "part": part}, no_system)
    assert info.value.message == "codemap 'sex' declares no target_system"
    # code and display work without one (the Location identifier system map is like this).
    assert build({"column": "p.SEX", "codemap": "sex"}, no_system)({"p.SEX": "1"}) == "male"


# --- end to end: an unmapped code under "error" is a 502, not a wrong resource ---------------


async def test_an_unmappable_code_answers_502(demo_sqlite_url: str, tmp_path: Path,
                                              make_app: Callable[..., Starlette]) -> None:
    shutil.copytree(REPO / "mappings" / "demo-pas", tmp_path / "demo-pas")
    shutil.copytree(REPO / "mappings" / "codemaps", tmp_path / "codemaps")
    sex = tmp_path / "codemaps" / "sex.yaml"
    text = sex.read_text(encoding="utf-8")
    assert '  "2": {code: female, display: Female}\n' in text
    sex.write_text(text.replace('  "2": {code: female, display: Female}\n', ""), encoding="utf-8")
    # A copied mapping directory is a production configuration: insecure-demo is refused.
    keys = tmp_path / "api-keys.yaml"
    keys.write_text("keys: [{client_id: t, sha256: "
                    "'" + hashlib.sha256(b"test-key").hexdigest() + "', scopes: system/*.read}]")
    app = make_app(demo_sqlite_url, mappings_dir=tmp_path / "demo-pas", auth_mode="api-key",
                   api_keys_file=str(keys), audit_log=str(tmp_path / "audit.jsonl"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway",
                                     headers={"X-API-Key": "test-key"}) as client:
            female = await client.get("/STU3/Patient/100001")  # SEXXX_CODE 2
            male = await client.get("/STU3/Patient/100002")  # SEXXX_CODE 1
    assert male.status_code == 200
    assert male.json()["gender"] == "male"
    assert female.status_code == 502
    outcome = female.json()
    assert outcome["resourceType"] == "OperationOutcome"
    [issue] = outcome["issue"]
    assert issue["code"] == "code-invalid"
    assert issue["details"]["coding"][0]["code"] == "UNMAPPED_SOURCE_CODE"
    assert "sex" in issue["diagnostics"]

