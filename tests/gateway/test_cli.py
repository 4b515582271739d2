"""The ``careconnect-gateway`` command: arguments, settings precedence, refusing a broken
mapping directory, ``mappings check``, ``demo build``, and a real ``serve`` subprocess."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
import yaml

from gateway import cli
from gateway.demo_pas import demo_file_name
from gateway.settings import bundled_mappings_roots, default_mappings_dir

DEMO = default_mappings_dir()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CCG_"):
            monkeypatch.delenv(key)
    saved = structlog.get_config()  # serve configures logging onto the captured stdout
    yield
    structlog.configure(**saved)


# --- arguments ---------------------------------------------------------------------------------


def test_serve_defaults_leave_settings_to_the_environment() -> None:
    args = cli.parser().parse_args(["serve"])
    assert args.func is cli.cmd_serve
    assert (args.host, args.port, args.mappings, args.base_path, args.demo_patients,
            args.data_dir, args.log_level, args.proxy_headers) == (
        None, None, None, None, None, None, None, False)


def test_serve_flags(tmp_path: Path) -> None:
    args = cli.parser().parse_args([
        "serve", "--host", "0.0.0.0", "--port", "9090", "--mappings", str(tmp_path),
        "--base-path", "/fhir", "--demo-patients", "300", "--data-dir", str(tmp_path / "d"),
        "--log-level", "debug", "--proxy-headers"])
    assert (args.host, args.port, args.mappings, args.base_path, args.demo_patients,
            args.data_dir, args.log_level, args.proxy_headers) == (
        "0.0.0.0", 9090, tmp_path, "/fhir", 300, tmp_path / "d", "debug", True)


@pytest.mark.parametrize("argv", [
    ["serve", "--port", "eighty"],
    ["serve", "--demo-patients", "many"],
    ["serve", "--colour"],
    ["demo", "build", "--patients", "x"],
    ["launch"],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "usage: careconnect-gateway" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["mappings"], ["demo"], ["api-key"]])
def test_a_bare_command_group_prints_its_help(argv: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: careconnect-gateway" + "".join(f" {a}" for a in argv))
    sub = {(): "serve", ("mappings",): "coverage", ("demo",): "reset", ("api-key",): "new"}
    assert sub[tuple(argv)] in out  # the subcommands are listed


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    expected = f"careconnect-gateway {version('careconnect-gateway')}"
    assert capsys.readouterr().out.strip() == expected


def _parsers(p: argparse.ArgumentParser, path: str = "careconnect-gateway"
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_option_and_command_has_help_text() -> None:
    missing = []
    for path, p in _parsers(cli.parser()):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{path} {c.dest}" for c in action._choices_actions if not c.help]
            elif action.help is None or not action.help.strip():
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_a_bad_setting_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCG_PORT", "abc")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err == "careconnect-gateway: CCG_PORT must be a whole number, not 'abc'\n"
    monkeypatch.setenv("CCG_PORT", "8080")
    monkeypatch.setenv("CCG_MAX_COUNT", "lots")
    assert cli.main(["mappings", "check"]) == 2
    assert "CCG_MAX_COUNT" in capsys.readouterr().err
    monkeypatch.delenv("CCG_MAX_COUNT")
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert "65535" in capsys.readouterr().err


def test_bundled_mapping_directories_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    from gateway.settings import Settings, mappings_path

    monkeypatch.chdir(tmp_path)
    hl7 = mappings_path("demo-hl7v2")
    assert hl7.is_dir() and (hl7 / "Patient.hl7v2.yaml").is_file()
    assert mappings_path("demo-pas") == DEMO
    assert cli.parser().parse_args(["serve", "--mappings", "demo-hl7v2"]).mappings == hl7
    monkeypatch.setenv("CCG_MAPPINGS_DIR", "demo-hl7v2")
    assert Settings.from_env().mappings_dir == hl7
    # a directory of that name here wins; other names are left as given
    (tmp_path / "demo-hl7v2").mkdir()
    assert mappings_path("demo-hl7v2") == Path("demo-hl7v2")
    assert mappings_path("codemaps") == Path("codemaps")
    assert mappings_path("no-such") == Path("no-such")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--demo-patients" in out
    # every bundled demo the README says --mappings takes by name is named in the help
    flat = " ".join(out.split())
    bundled = {d.name for root in bundled_mappings_roots() if root.is_dir()
               for d in root.iterdir() if d.is_dir() and d.name != "codemaps"}
    assert {"demo-pas", "demo-hl7v2", "demo-hl7v2-mixed"} <= bundled
    assert [name for name in sorted(bundled) if name not in flat.replace("- ", "-")] == []


def test_other_commands_parse() -> None:
    check = cli.parser().parse_args(["mappings", "check"])
    assert (check.func, check.dir) == (cli.cmd_mappings_check, None)
    build = cli.parser().parse_args(["demo", "build"])
    assert (build.func, build.patients, build.path, build.url, build.data_dir) == (
        cli.cmd_demo_build, 10_000, None, None, None)


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CCG_PORT", "9000")
    monkeypatch.setenv("CCG_DEMO_PATIENTS", "700")
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CCG_BASE_PATH", "/env")
    from_env = cli._settings(cli.parser().parse_args(["serve"]))
    assert (from_env.port, from_env.demo_patients, from_env.data_dir, from_env.base_path) == (
        9000, 700, tmp_path, "/env")
    flagged = cli._settings(cli.parser().parse_args(
        ["serve", "--port", "9001", "--base-path", "/flag"]))
    assert (flagged.port, flagged.demo_patients, flagged.base_path) == (9001, 700, "/flag")


# --- a broken mapping directory ------------------------------------------------------------------


def broken_copy(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """The demo mappings with two mistakes; returns the directory and file → broken line."""
    root = tmp_path / "mappings"
    shutil.copytree(DEMO.parent / "codemaps", root / "codemaps")
    shutil.copytree(DEMO, root / "demo-pas")
    lines: dict[str, int] = {}
    for name, old, new in [
        ("Patient.sql.yaml", "gender: {type: token,", "gender: {type: tokn,"),
        ("Organization.sql.yaml", "name: {type: string, column: o.ORG_NAME,",
         "name: {type: string, column: o.ORG_NAME, colour: red,"),
    ]:
        path = root / "demo-pas" / name
        text = path.read_text()
        assert text.count(old) == 1
        path.write_text(text.replace(old, new))
        lines[name] = text[: text.index(old)].count("\n") + 1
    return root / "demo-pas", lines


def problem_lines(text: str) -> dict[str, int]:
    return {Path(m.group(1)).name: int(m.group(2))
            for m in re.finditer(r"^\s*(\S+\.yaml):(\d+): \S", text, re.MULTILINE)}


def test_serve_refuses_a_broken_mapping_directory(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    directory, broken = broken_copy(tmp_path)
    code = cli.main(["serve", "--mappings", str(directory), "--data-dir", str(tmp_path / "d"),
                     "--demo-patients", "300", "--port", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to start: 2 mapping problem(s)\n" in err
    assert problem_lines(err) == broken
    assert str(directory / "Patient.sql.yaml") in err
    assert "serving" not in err


def test_mappings_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("CCG_DEMO_PATIENTS", "300")
    directory, broken = broken_copy(tmp_path)
    assert cli.main(["mappings", "check", str(directory)]) == 1
    out = capsys.readouterr().out
    assert problem_lines(out) == broken
    assert out.rstrip().endswith("2 problem(s)")

    assert cli.main(["mappings", "check"]) == 0
    ok = [line for line in capsys.readouterr().out.splitlines()  # not the golden cases
          if line.startswith("ok  ") and ".yaml:" in line]
    expected = []
    for f in sorted(DEMO.glob("*.sql.yaml")):
        doc = yaml.safe_load(f.read_text())
        expected.append(f"ok  {f.name}: {doc['resource']} via {doc['source']['connection']} "
                        f"({len(doc['search'])} search parameters)")
    assert sorted(ok) == sorted(expected)


def test_demo_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "pas.sqlite"
    assert cli.main(["demo", "build", "--patients", "300", "--path", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    with sqlite3.connect(target) as db:
        assert db.execute("SELECT COUNT(*) FROM PATIENTS").fetchone() == (300,)
    # Without --path: named by size in the data directory.
    assert cli.main(["demo", "build", "--patients", "300", "--data-dir", str(tmp_path)]) == 0
    named = tmp_path / demo_file_name(300)  # by size and schema fingerprint
    assert capsys.readouterr().out.strip() == str(named)
    assert named.is_file()


# --- the real thing ----------------------------------------------------------------------------


def executable() -> list[str]:
    script = Path(sys.executable).with_name("careconnect-gateway")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gateway.cli"]


def test_serve_subprocess_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCG_")}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [*executable(), "serve", "--port", str(port), "--data-dir", str(tmp_path / "d"),
             "--demo-patients", "300"],
            stdout=o, stderr=e, env=env, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=base, timeout=5) as c:
            while True:
                assert proc.poll() is None, err.read_text()
                try:
                    if c.get("/_health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not come up in 20 s"
                time.sleep(0.1)
            # The demo trusts the local development key (README: dev-token)
            token = subprocess.run(
                [*executable(), "dev-token", "--scope", "user/*.read",
                 "--data-dir", str(tmp_path / "d")],
                env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
            r = c.get("/STU3/Patient", params={"family": "smith", "gender": "female"},
                      headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
            bundle = r.json()
            assert bundle["type"] == "searchset" and bundle["entry"]
            assert {e["resource"]["resourceType"] for e in bundle["entry"]} == {"Patient"}
            assert c.get("/_health").json() == {"status": "pass"}
        assert (tmp_path / "d" / demo_file_name(300)).is_file()  # built on first start
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the parent sees it
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert f"serving http://127.0.0.1:{port}/STU3" in stderr
    # the demo's audit trail goes to a file in the data directory, said at start-up, and not
    # to the terminal (it holds patient ids and search values)
    audit = tmp_path / "d" / "audit.jsonl"
    assert f"Audit trail: {audit}" in stderr
    assert '"logger":"gateway.audit"' not in stderr and '"event":"access"' not in stderr
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert any(r["query"] and ["family", "smith"] in r["query"] for r in records)
    log = out.read_text()
    assert '"event":"started"' in log
    assert log.count('"event":"request"') == 3
    assert "smith" not in log.lower()


def test_a_port_in_use_is_reported_before_the_banner(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCG_")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [*executable(), "serve", "--port", str(port), "--data-dir", str(tmp_path / "d"),
             "--demo-patients", "50"], env=env, cwd=tmp_path, capture_output=True, text=True,
            timeout=60)
    assert done.returncode == 2
    assert done.stderr == (f"refusing to start: port {port} on 127.0.0.1 is already in use "
                           "(another gateway?); choose another with --port or CCG_PORT\n")
    assert not (tmp_path / "d").exists()  # nothing built for a server that cannot listen


def test_demo_reset_rebuilds_the_database(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d"
    assert cli.main(["demo", "build", "--patients", "40", "--data-dir", str(data)]) == 0
    from gateway.demo_pas import demo_file_name

    db = data / demo_file_name(40)  # the file serve reads (its name carries the schema)
    with sqlite3.connect(db) as conn:  # a write through the HL7 demo, say
        conn.execute("UPDATE PATIENTS SET SURNAME = 'CHANGED' WHERE PATNT_REFNO = 100001")
    conn.close()
    capsys.readouterr()
    assert cli.main(["demo", "reset", "--demo-patients", "40", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.strip() == f"rebuilt the demo PAS: {db}"
    with sqlite3.connect(db) as conn:
        [(surname,)] = conn.execute("SELECT SURNAME FROM PATIENTS WHERE PATNT_REFNO = 100001")
    conn.close()
    assert surname == "SMITH"


@pytest.mark.parametrize("workers", ["2", "4", "lots"])
def test_serve_refuses_several_workers(workers: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # deploy/README.md says so: limits and caches are per process (issue 13)
    monkeypatch.setenv("WEB_CONCURRENCY", workers)
    code = cli.main(["serve", "--data-dir", str(tmp_path / "d"), "--port", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to start: WEB_CONCURRENCY" in err and "serving" not in err
