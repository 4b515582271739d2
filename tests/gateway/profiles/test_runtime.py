"""CCG_VALIDATE_RESPONSES: outgoing resources are validated and issues logged and counted,
without changing a byte of the response."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway import logging as gateway_logging
from gateway.profiles.runtime import ResponseValidation
from gateway.settings import Settings
from tests.gateway.profiles.resources import CC, patient

pytestmark = pytest.mark.anyio


def test_setting_defaults_off_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().validate_responses is False
    monkeypatch.setenv("CCG_VALIDATE_RESPONSES", "true")
    assert Settings.from_env().validate_responses is True


async def _get(app: Starlette, path: str) -> httpx.Response:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            return await c.get(path)


async def test_responses_are_unchanged(demo_sqlite_url: str,
                                       make_app: Callable[..., Starlette]) -> None:
    plain = make_app(demo_sqlite_url)
    checked = make_app(demo_sqlite_url, validate_responses=True)
    assert plain.state.response_validation is None
    rv: ResponseValidation = checked.state.response_validation
    for path in ("/STU3/Patient/100001", "/STU3/Encounter?patient=100001"):
        a, b = await _get(plain, path), await _get(checked, path)
        assert a.status_code == b.status_code == 200
        if path.startswith("/STU3/Patient"):
            assert a.content == b.content
    assert rv.resources >= 2
    # $everything builds a section's resources as a batch (Provider.resources): checked too
    before = rv.resources
    r = await _get(checked, "/STU3/Patient/100001/$everything?_count=50")
    assert r.status_code == 200
    assert rv.resources - before == len(r.json()["entry"])  # 1 + 50 matches + included
    assert not rv.counts


def test_non_conformant_resource_is_logged_and_counted(
        capsys: pytest.CaptureFixture[str]) -> None:
    gateway_logging.configure("warning")
    bad = patient()
    bad["gender"] = "man"
    provider = SimpleNamespace(resource=lambda rec: bad, profile=CC + "CareConnect-Patient-1")
    rv = ResponseValidation()
    rv.wrap(provider)  # type: ignore[arg-type]
    served: dict[str, Any] = provider.resource({})
    assert served is bad and served["gender"] == "man"  # served as built
    assert rv.counts == {("Patient", "error", "code-invalid"): 1}
    logged = capsys.readouterr().out
    assert "response_not_conformant" in logged
    assert '"expression":"Patient.gender"' in logged and '"code":"code-invalid"' in logged
    assert '"id":"100001"' in logged
    assert '"man"' not in logged and "Smith" not in logged and "9990000018" not in logged
