"""``careconnect-gateway``: serve, check mappings, build the demo PAS."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import replace
from pathlib import Path

from gateway.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "mappings_dir": getattr(args, "mappings", None),
        "demo_patients": getattr(args, "demo_patients", None),
        "base_path": getattr(args, "base_path", None),
        "log_level": getattr(args, "log_level", None),
        "data_dir": getattr(args, "data_dir", None),
    }
    return Settings.from_env(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import build_app
    from gateway.auth.errors import AuthConfigError
    from gateway.mapping.loader import MappingError

    workers = os.environ.get("WEB_CONCURRENCY", "").strip()
    if workers not in ("", "1"):
        # Limits, rate buckets and caches live in this process: several workers would each
        # grant a client the full allowance. Run more instances behind the load balancer.
        print("refusing to start: WEB_CONCURRENCY is set to "
              f"{workers[:20]!r}; the gateway runs as one process (unset it, or set it to 1, "
              "and run more instances instead)", file=sys.stderr)
        return 2
    settings = _settings(args)
    try:
        app = build_app(settings)
    except MappingError as exc:
        print(f"refusing to start: {len(exc.problems)} mapping problem(s)", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    except AuthConfigError as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 2
    from gateway.auth.serve import banner, uvicorn_tls_options

    # Everything built so far (fhir.resources' models, mappings, code maps) lives as long as
    # the process, yet every full collection walked it: under load those took 9% of the time,
    # up to 36 ms each (the p99 of a read). Frozen, the collector leaves it alone.
    gc.collect()
    gc.freeze()
    # A search page allocates thousands of short-lived dicts; at the default 700 the young
    # generation was collected ~200 times a second under load (GC 184 ms in 8 s of family
    # searches; 45 ms at 10,000). Nearly all of it is freed by reference counting anyway.
    gc.set_threshold(10_000, 20, 100)

    scheme = "https" if settings.ssl_certfile else "http"
    url = f"{scheme}://{settings.host}:{settings.port}{settings.base_path}"
    print(f"Care Connect gateway serving {url}  (try {url}/Patient?family=smith&gender=female)",
          file=sys.stderr, flush=True)
    print(banner(settings), file=sys.stderr, flush=True)
    from gateway.server import uvicorn_options

    tls = uvicorn_tls_options(settings)
    options = {**tls, **uvicorn_options(settings.header_timeout_seconds, tls.get("http"))}
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None,
                access_log=False, server_header=False, proxy_headers=args.proxy_headers,
                **options)
    return 0


def cmd_mappings_check(args: argparse.Namespace) -> int:
    from adapters import registry as adapter_registry
    from gateway.app import demo_database_url
    from gateway.mapping.loader import MappingError, load_directory

    settings = _settings(args)
    if args.dir is not None:
        settings = replace(settings, mappings_dir=args.dir)
    settings = replace(settings, progress=False)
    try:
        loaded = load_directory(settings.mappings_dir, adapter_registry.create,
                                demo_url=lambda: demo_database_url(settings))
    except MappingError as exc:
        for p in exc.problems:
            print(str(p))
        print(f"{len(exc.problems)} problem(s)")
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
        for p in exc.problems:
            print(str(p))
        print(f"{len(exc.problems)} problem(s)")
        return 1
    for op in operations:
        print(f"ok  operation ${op.name}: {len(op.spec.sections)} section(s)")
    for doc in documents:
        print(f"ok  document {doc.name} ({doc.subject}/[id]/$document): "
              f"{len(doc.sections)} section(s)")
    if messaging is not None:
        print(f"ok  messaging: {len(messaging.events)} event(s): "
              + ", ".join(messaging.events))
    from gateway.profiles.golden import check_cli

    return check_cli(loaded, getattr(args, "golden", None))


def cmd_mappings_coverage(args: argparse.Namespace) -> int:
    from adapters import registry as adapter_registry
    from gateway.app import demo_database_url
    from gateway.mapping.loader import MappingError, load_directory
    from gateway.profiles.coverage import coverage_cli

    settings = replace(_settings(args), progress=False)
    directory = args.dir if args.dir is not None else settings.mappings_dir
    try:
        loaded = load_directory(directory, adapter_registry.create,
                                demo_url=lambda: demo_database_url(settings))
    except MappingError as exc:
        for p in exc.problems:
            print(str(p))
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


def cmd_pas_simulator(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from gateway.app import demo_database_url
    from gateway.demo_pas.hl7v2 import PasSimulator

    if args.db is not None:
        if not args.db.is_file():
            print(f"no demo PAS database at {args.db}", file=sys.stderr)
            return 2
        url = f"sqlite:///{args.db.resolve()}"
    else:
        url = demo_database_url(_settings(argparse.Namespace()))

    async def run() -> None:
        async with PasSimulator(url, host=args.host, port=args.port,
                                sex_codes=args.sex_codes, dialect=args.dialect) as sim:
            print(f"PAS simulator (HL7 v2.4, {args.dialect} dialect) listening on "
                  f"mllp://{args.host}:{sim.port}  "
                  "(Ctrl-C stops it)", file=sys.stderr, flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="careconnect-gateway",
                                description="Care Connect (FHIR STU3) API over legacy PAS systems")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the gateway (default: on the embedded demo PAS)")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--mappings", type=Path, help="mapping directory (default: the demo)")
    serve.add_argument("--base-path", help="FHIR base path (default /STU3)")
    serve.add_argument("--demo-patients", type=int, help="size of the demo PAS (default 10000)")
    serve.add_argument("--data-dir", type=Path, help="where the demo PAS database is kept")
    serve.add_argument("--log-level", help="debug, info, warning, error (default info)")
    serve.add_argument("--proxy-headers", action="store_true",
                       help="trust X-Forwarded-* from the proxy in front")
    serve.set_defaults(func=cmd_serve)

    mappings = sub.add_parser("mappings", help="work with mapping files")
    msub = mappings.add_subparsers(dest="mappings_command", required=True)
    check = msub.add_parser("check", help="validate a mapping directory without serving")
    check.add_argument("dir", nargs="?", type=Path, help="mapping directory (default: the demo)")
    check.add_argument("--golden", type=Path, help="golden inputs (<Type>/<case>.input.json) to "
                       "map and validate against the profiles (default: DIR/golden, or the "
                       "repository's tests/golden for the demo)")
    check.set_defaults(func=cmd_mappings_check)
    cov = msub.add_parser("coverage", help="which profile elements each mapping fills")
    cov.add_argument("dir", nargs="?", type=Path, help="mapping directory (default: the demo)")
    cov.add_argument("--html", type=Path, help="also write a standalone HTML report here")
    cov.set_defaults(func=cmd_mappings_coverage)

    demo = sub.add_parser("demo", help="the embedded demo PAS")
    dsub = demo.add_subparsers(dest="demo_command", required=True)
    build = dsub.add_parser("build", help="build a demo PAS database")
    build.add_argument("--patients", type=int, default=10_000)
    build.add_argument("--path", type=Path, help="SQLite file to create")
    build.add_argument("--url", help="SQLAlchemy URL of an empty database to fill instead")
    build.add_argument("--data-dir", type=Path)
    build.set_defaults(func=cmd_demo_build)

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
                          "(CX-5 identifiers, native prefix match, no qualifiers)")
    sim.set_defaults(func=cmd_pas_simulator)

    from gateway.auth.cli import register as register_auth_commands

    register_auth_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
