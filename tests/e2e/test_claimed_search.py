"""Every search parameter /metadata claims for the clinical types, walked by an independent
consumer (tests/e2e/claimed_search.py: httpx and its own reading of STU3 search, no gateway
code) over real HTTP, on both databases: each answer must be exactly the records the
consumer's own evaluation selects, every claimed _include and _revinclude must bring exactly what
refers or is referred to, and every STU3 parameter not claimed must be refused."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette

from tests.conftest import LiveServer
from tests.e2e import claimed_search


def test_every_claimed_parameter_answers_what_it_claims(
        demo_url: str, make_app: Callable[..., Starlette]) -> None:
    # the consumer sends ~1,200 requests: above the default per-client rate, which is not
    # what is under test here
    app = make_app(demo_url, rate_limit_per_minute=100_000, rate_limit_burst=100_000)
    with LiveServer(app) as server:
        report = claimed_search.run(server.url + "/STU3", patients=2)
    assert report.findings == []
    # it really walked: every clinical type, every claimed parameter had a value to try
    covered = dict(report.covered)
    assert covered.pop("_revinclude") == {"Patient", "Practitioner", "Organization", "Location",
                                          "Medication", "Encounter"}
    assert set(covered) == {*claimed_search.PATIENT_PARAM, *claimed_search.WHOLE}
    assert report.checks > 500
