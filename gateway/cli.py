"""``careconnect-gateway``: serve, check mappings, build the demo PAS."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.settings import Settings, SettingsError, mappings_path

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from gateway.mapping.loader import LoadedSet, Problem


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "mappings_dir": getattr(args, "mappings", None),
        "demo_patients": getattr(args, "demo_patients", None),
        "base_path": getattr(args, "base_path", None),
        "log_level": getattr(args, "log_level", None),
        "data_dir": getattr(args, "data_dir", None),
        "workers": getattr(args, "workers", None),
    }
    return Settings.from_env(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import workers

    concurrency = os.environ.get("WEB_CONCURRENCY", "").strip()
    if concurrency not in ("", "1"):
        # uvicorn's variable: set by someone expecting worker processes. The gateway's own
        # setting is --workers (CCG_WORKERS), which comes with shared state (CCG_REDIS_URL).
        print("refusing to start: WEB_CONCURRENCY is set to "
              f"{concurrency[:20]!r}; the gateway does not read it (unset it, or set it to 1, "
              "and use --workers / CCG_WORKERS with CCG_REDIS_URL)", file=sys.stderr)
        return 2
    settings = _settings(args)
    if settings.workers < 1:
        print("refusing to start: --workers must be at least 1", file=sys.stderr)
        return 2
    if settings.workers > 1:  # before anything imports gateway.metrics
        settings = workers.prepare_multiprocess(settings)
    elif os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # set by hand: it must exist
        Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)

    from gateway.app import build_app
    from gateway.auth.errors import AuthConfigError
    from gateway.mapping.loader import MappingError
    from gateway.tracing import TracingUnavailable

    problem = _port_problem(settings.host, settings.port)
    if problem:  # before building anything, and before the banner
        print(f"refusing to start: {problem}", file=sys.stderr)
        return 2
    try:
        # With workers, this checks the configuration (and builds the demo PAS and the dev
        # key) once, before any worker starts; each worker then builds its own app.
        app = build_app(settings)
    except MappingError as exc:
        print(f"refusing to start: {len(exc.problems)} mapping problem(s)", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    except (AuthConfigError, TracingUnavailable) as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 2
    from gateway.auth.serve import banner, uvicorn_tls_options

    if settings.workers > 1:
        del app
    else:
        workers.tune_gc()

    scheme = "https" if settings.ssl_certfile else "http"
    url = f"{scheme}://{settings.host}:{settings.port}{settings.base_path}"
    print(f"Care Connect gateway serving {url}  (try {url}/Patient?family=smith&gender=female)"
          + (f"  with {settings.workers} workers" if settings.workers > 1 else ""),
          file=sys.stderr, flush=True)
    print(banner(settings), file=sys.stderr, flush=True)
    print(f"Audit trail: {app.state.audit.sink.destination}" if settings.workers == 1 else
          "Audit trail: see CCG_AUDIT_LOG (one per worker process)", file=sys.stderr, flush=True)
    # with --workers, the parent passes SIGHUP on to every worker (gateway.workers)
    print(f"Mappings: {settings.mappings_dir} (reload them after an edit: kill -HUP "
          f"{os.getpid()})", file=sys.stderr, flush=True)
    return workers.serve(app if settings.workers == 1 else None, settings,
                         proxy_headers=args.proxy_headers, tls=uvicorn_tls_options(settings))


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, no such address), or None. Checked
    before the banner, so a second ``serve`` does not announce itself and then fail."""
    import socket

    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            sock.bind(address)
        except OSError as exc:
            import errno

            if exc.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use (another gateway?); "
                        "choose another with --port or CCG_PORT")
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _print_problems(problems: list[Problem], count: bool = True) -> int:
    """Each problem on its line (file:line: message), then how many; the exit status."""
    for p in problems:
        print(str(p))
    if count:
        print(f"{len(problems)} problem(s)")
    return 1


def _load_or_print(settings: Settings, directory: Path, count: bool = True) -> LoadedSet | None:
    """The mappings in ``directory``; None once their problems are printed."""
    from adapters import registry as adapter_registry
    from gateway.app import demo_database_url
    from gateway.mapping.loader import MappingError, load_directory

    try:
        return load_directory(directory, adapter_registry.create,
                              demo_url=lambda: demo_database_url(settings))
    except MappingError as exc:
        _print_problems(exc.problems, count)
        return None


def cmd_mappings_check(args: argparse.Namespace) -> int:
    from gateway.mapping.loader import MappingError

    settings = _settings(args)
    if args.dir is not None:
        settings = replace(settings, mappings_dir=args.dir)
    settings = replace(settings, progress=False)
    loaded = _load_or_print(settings, settings.mappings_dir)
    if loaded is None:
        return 1
    for m in loaded.mappings:
        print(f"ok  {m.file.name}: {m.resource_type} via {m.connection} "
              f"({len(m.spec.search)} search parameters)")
    from gateway.messaging.config import load_messaging
    from gateway.operations.document import load_documents
    from gateway.operations.structured import load_operations
    from gateway.providers import Provider
    from gateway.registry import Registry

    registry = Registry(Provider(m) for m in loaded.mappings)
    try:
        operations = load_operations(loaded.directory, registry)
        documents = load_documents(loaded.directory, registry)
        messaging = load_messaging(loaded.directory, registry)
    except MappingError as exc:
        return _print_problems(exc.problems)
    for op in operations:
        print(f"ok  operation ${op.name}: {len(op.spec.sections)} section(s)")
    for doc in documents:
        print(f"ok  document {doc.name} ({doc.subject}/[id]/$document): "
              f"{len(doc.sections)} section(s)")
    if messaging is not None:
        print(f"ok  messaging: {len(messaging.events)} event(s): "
              + ", ".join(messaging.events))
    from gateway.mapping.cases import case_files, report, run_all
    from gateway.profiles.golden import check_cli

    status = check_cli(loaded, getattr(args, "golden", None))
    if case_files(loaded.directory):
        status = max(status, 1 if report(run_all(loaded.directory, loaded.mappings)) else 0)
    return status


def cmd_mappings_test(args: argparse.Namespace) -> int:
    """Run the golden cases in DIR/cases through the mappings (no server, no database)."""
    from gateway.mapping.cases import CASES_DIR, case_files, report, run_all

    settings = replace(_settings(args), progress=False)
    directory = args.dir if args.dir is not None else settings.mappings_dir
    loaded = _load_or_print(settings, directory)
    if loaded is None:
        return 1
    if not case_files(loaded.directory):
        print(f"no cases in {loaded.directory / CASES_DIR} (see mappings/README.md, "
              "'Testing a mapping')")
        return 1
    import structlog

    from gateway import logging as gateway_logging

    if not structlog.is_configured():  # mapping debug lines would drown the report
        gateway_logging.configure("warning")
    return 1 if report(run_all(loaded.directory, loaded.mappings)) else 0


def cmd_mappings_explain(args: argparse.Namespace) -> int:
    """The plan of one search, without running it."""
    from gateway.explain import explain_cli

    settings = replace(_settings(args), progress=False)
    loaded = _load_or_print(settings, settings.mappings_dir, count=False)
    if loaded is None:
        return 1
    if args.lenient:
        settings = replace(settings, strict_search=False)
    return explain_cli(loaded, settings, args.search, args.cost)


def cmd_mappings_coverage(args: argparse.Namespace) -> int:
    from gateway.profiles.coverage import coverage_cli

    settings = replace(_settings(args), progress=False)
    directory = args.dir if args.dir is not None else settings.mappings_dir
    loaded = _load_or_print(settings, directory, count=False)
    if loaded is None:
        return 1
    return coverage_cli(loaded, args.html)


def cmd_demo_build(args: argparse.Namespace) -> int:
    from gateway.demo_pas import build_database, demo_file_name, ensure_sqlite_demo

    if args.url:
        build_database(args.url, patients=args.patients, progress=True)
        print(f"built demo PAS with {args.patients} patients at the given URL")
    else:
        settings = _settings(args)
        path = args.path or settings.data_dir / demo_file_name(args.patients)
        ensure_sqlite_demo(path, patients=args.patients, progress=True)
        print(path)
    return 0


def cmd_demo_reset(args: argparse.Namespace) -> int:
    """Rebuild the embedded demo PAS from scratch: undo writes made through the HL7 demo."""
    from gateway.demo_pas import demo_file_name, ensure_sqlite_demo

    settings = _settings(args)
    path = settings.data_dir / demo_file_name(settings.demo_patients)  # the file serve uses
    removed = path.exists()
    for leftover in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        leftover.unlink(missing_ok=True)
    ensure_sqlite_demo(path, patients=settings.demo_patients, progress=settings.progress)
    print(f"{'rebuilt' if removed else 'built'} the demo PAS: {path}")
    return 0


def cmd_pas_simulator(args: argparse.Namespace) -> int:
    import asyncio

    from gateway import lifecycle
    from gateway.app import demo_database_url
    from gateway.demo_pas.hl7v2 import PasSimulator

    settings = _settings(argparse.Namespace())
    if args.db is not None:
        if not args.db.is_file():
            print(f"no demo PAS database at {args.db}", file=sys.stderr)
            return 2
        url = f"sqlite:///{args.db.resolve()}"
    else:
        url = demo_database_url(settings)

    async def run(stop: asyncio.Event) -> None:
        sim = PasSimulator(url, host=args.host, port=args.port, sex_codes=args.sex_codes,
                           dialect=args.dialect)
        await sim.start()
        try:
            print(f"PAS simulator (HL7 v2.4, {args.dialect} dialect) listening on "
                  f"mllp://{args.host}:{sim.port}  "
                  "(Ctrl-C stops it)", file=sys.stderr, flush=True)
            await stop.wait()
        finally:  # the answers being written are finished first (not when cancelled)
            await sim.stop(settings.shutdown_timeout if stop.is_set() else 0.0)

    return lifecycle.run_until_stopped(run, name="pas_simulator",
                                       timeout=settings.shutdown_timeout)


def cmd_adt_listener(args: argparse.Namespace) -> int:
    import asyncio

    from gateway import lifecycle
    from gateway import logging as gateway_logging
    from gateway.adt.config import AdtSettings
    from gateway.adt.runtime import run_forever

    settings = _settings(args)
    gateway_logging.configure(settings.log_level)
    host, _, port = (args.listen or "").rpartition(":")
    adt = AdtSettings.from_env(settings, listen_host=host or None,
                               listen_port=int(port) if port else None,
                               mappings_dir=args.mappings_adt)

    def ready(bound: int) -> None:
        print(f"ADT listener on mllp://{adt.listen_host}:{bound}  (store {adt.store_url.split('://')[0]})",
              file=sys.stderr, flush=True)

    base = settings.public_base_url or f"http://{settings.host}:{settings.port}{settings.base_path}"

    def run(stop: asyncio.Event) -> Awaitable[None]:
        return run_forever(settings, adt, base_url=base, ready=ready, stop=stop,
                           grace=settings.shutdown_timeout)

    # SIGTERM/SIGINT: the message being recorded is ACKed (or, past the bound, not ACKed:
    # resent), the notifications being sent finish or stay pending, the store is closed
    return lifecycle.run_until_stopped(run, name="adt_listener",
                                       timeout=settings.shutdown_timeout)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("careconnect-gateway")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _group(parser: argparse.ArgumentParser, dest: str) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    """Subcommands of ``parser``; the bare group prints its help (and exits 2) instead of a
    one-line 'required' error."""
    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)
    return parser.add_subparsers(dest=dest, metavar="COMMAND")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="careconnect-gateway",
                                description="Care Connect (FHIR STU3) API over legacy PAS systems")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                   help="print the version and exit")
    sub = _group(p, "command")

    serve = sub.add_parser("serve", help="start the gateway (default: on the embedded demo PAS)")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--mappings", type=mappings_path,
                       help="mapping directory, or the name of a bundled one (demo-pas, "
                            "demo-hl7v2, demo-hl7v2-mixed); default: demo-pas")
    serve.add_argument("--base-path", help="FHIR base path (default /STU3)")
    serve.add_argument("--demo-patients", type=int, help="size of the demo PAS (default 10000)")
    serve.add_argument("--data-dir", type=Path,
                       help="where the demo PAS database, dev key and demo audit file are kept")
    serve.add_argument("--log-level", help="debug, info, warning, error (default info)")
    serve.add_argument("--workers", type=int,
                       help="worker processes (default 1; in production about one per core, "
                            "with CCG_REDIS_URL so they share rate limits and the replay cache)")
    serve.add_argument("--proxy-headers", action="store_true",
                       help="trust X-Forwarded-* from the proxy in front")
    serve.set_defaults(func=cmd_serve)

    mappings = sub.add_parser("mappings", help="work with mapping files")
    msub = _group(mappings, "mappings_command")
    check = msub.add_parser("check", help="validate a mapping directory without serving")
    check.add_argument("dir", nargs="?", type=mappings_path,
                       help="mapping directory or bundled name (default: demo-pas)")
    check.add_argument("--golden", type=Path, help="golden inputs (<Type>/<case>.input.json) to "
                       "map and validate against the profiles (default: DIR/golden, or the "
                       "repository's tests/golden for the demo)")
    check.set_defaults(func=cmd_mappings_check)
    test = msub.add_parser("test", help="run the golden cases in DIR/cases through the "
                           "mappings (no server): input rows or an HL7 message -> expected")
    test.add_argument("dir", nargs="?", type=mappings_path,
                      help="mapping directory or bundled name (default: demo-pas)")
    test.set_defaults(func=cmd_mappings_test)
    expl = msub.add_parser("explain", help="print what a search would do (parameters, SQL "
                           "with placeholders or HL7 QPD fields, children) without running it")
    expl.add_argument("search", help="the search, e.g. 'Patient?family=smith&gender=female'")
    expl.add_argument("--mappings", type=mappings_path,
                      help="mapping directory or bundled name (default: demo-pas)")
    expl.add_argument("--cost", action="store_true",
                      help="also ask the database for its plan and cost estimate (EXPLAIN: "
                           "connects, runs nothing)")
    expl.add_argument("--lenient", action="store_true",
                      help="as a request sending 'Prefer: handling=lenient': unknown "
                           "parameters are listed as ignored instead of refused")
    expl.set_defaults(func=cmd_mappings_explain)
    cov = msub.add_parser("coverage", help="which profile elements each mapping fills")
    cov.add_argument("dir", nargs="?", type=mappings_path,
                     help="mapping directory or bundled name (default: demo-pas)")
    cov.add_argument("--html", type=Path, help="also write a standalone HTML report here")
    cov.set_defaults(func=cmd_mappings_coverage)

    demo = sub.add_parser("demo", help="the embedded demo PAS")
    dsub = _group(demo, "demo_command")
    build = dsub.add_parser("build", help="build a demo PAS database")
    build.add_argument("--patients", type=int, default=10_000,
                       help="how many synthetic patients (default 10000)")
    build.add_argument("--path", type=Path, help="SQLite file to create")
    build.add_argument("--url", help="SQLAlchemy URL of an empty database to fill instead")
    build.add_argument("--data-dir", type=Path,
                       help="data directory for the default file (as serve)")
    build.set_defaults(func=cmd_demo_build)
    reset = dsub.add_parser(
        "reset", help="rebuild the embedded demo PAS, undoing every write made through the "
                      "HL7 demo (stop the gateway and pas-simulator first)")
    reset.add_argument("--demo-patients", type=int, help="size of the demo PAS (default 10000)")
    reset.add_argument("--data-dir", type=Path, help="the data directory (as serve)")
    reset.set_defaults(func=cmd_demo_reset)

    sim = sub.add_parser("pas-simulator",
                         help="serve the demo PAS as an HL7 v2.4 PAS over MLLP (for testing)")
    sim.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    sim.add_argument("--port", type=int, default=2575, help="MLLP port (default 2575)")
    sim.add_argument("--db", type=Path,
                     help="demo PAS SQLite file (default: the embedded demo, built if missing)")
    sim.add_argument("--sex-codes", choices=["hl7", "nhs"], default="hl7",
                     help="PID-8 as HL7 M/F/O/U or NHS 1/2/9/X (default hl7)")
    sim.add_argument("--dialect", choices=["demo", "itk", "strict"], default="demo",
                     help="how this PAS speaks HL7 v2 (gateway/demo_pas/hl7v2/profiles.py): "
                          "demo (default), itk (plain ACKs, ITK sample style), strict "
                          "(CX-5 identifiers, native prefix match, no qualifiers, no A01)")
    sim.set_defaults(func=cmd_pas_simulator)

    adt = sub.add_parser("adt-listener", help="receive the PAS's ADT feed over MLLP and send "
                         "Subscription notifications")
    adt.add_argument("--listen", help="host:port (default CCG_ADT_LISTEN or 127.0.0.1:2576)")
    adt.add_argument("--mappings-adt", type=Path, help="HL7 v2 mapping directory with "
                     "adt/events.yaml (default CCG_ADT_MAPPINGS or mappings/demo-hl7v2)")
    adt.add_argument("--data-dir", type=Path, help="where the default SQLite store is kept")
    adt.add_argument("--log-level", help="debug, info, warning, error (default info)")
    adt.set_defaults(func=cmd_adt_listener)

    from gateway.auth.cli import register as register_auth_commands

    register_auth_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SettingsError as exc:
        print(f"careconnect-gateway: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
