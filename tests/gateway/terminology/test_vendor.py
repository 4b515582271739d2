"""The vendored terminology is what gateway.terminology.vendor makes from ../shared."""

from __future__ import annotations

from pathlib import Path

from gateway.terminology import vendor
from gateway.terminology.content import DATA, catalogue


def test_regenerating_from_shared_gives_the_committed_data(shared: Path, tmp_path: Path
                                                            ) -> None:
    counts = vendor.vendor(shared.parent, tmp_path / "careconnect.json")
    assert (tmp_path / "careconnect.json").read_bytes() == DATA.read_bytes()
    assert (tmp_path / "NOTICE.md").read_bytes() == (DATA.parent / "NOTICE.md").read_bytes()
    held = catalogue()
    assert counts == {"valueSets": len(held.value_sets), "codeSystems": len(held.code_systems)}
    # Every Care Connect ValueSet a profile binds to and ../shared publishes is held.
    published = vendor._index(shared / "valuesets")
    assert {u for u in vendor.bound_valuesets() if u in published} <= {
        v["url"] for v in held.value_sets}
