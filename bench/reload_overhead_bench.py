"""What pinning each request to a mapping generation costs (gateway/reload.py).

One app on the SQLite demo, in-process (httpx ASGITransport, no sockets), measured two ways
in alternating rounds of the same process: as built (``PinLayer`` innermost), and with that
one layer taken out of the middleware stack — the baseline, in the same run. The handlers'
``Api.registry`` property is the same in both (outside a pinned request it falls back to
the current generation).

    python bench/reload_overhead_bench.py [--requests 2000] [--rounds 7]

Bounded: a fixed number of requests per round; no network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


async def run(requests: int, rounds: int, patients: int) -> None:
    import httpx

    from gateway.app import build_app
    from gateway.demo_pas import ensure_sqlite_demo
    from gateway.reload import PinLayer
    from gateway.settings import Settings

    data = Path(tempfile.mkdtemp(prefix="ccg-reload-bench-"))
    db = ensure_sqlite_demo(data / f"demo-pas-{patients}.sqlite", patients=patients,
                            progress=False)

    def app(pinned: bool) -> object:
        built = build_app(Settings(data_dir=data, connection_urls={"pas": f"sqlite:///{db}"},
                                   paging_secret="bench", log_level="warning", progress=False,
                                   auth_mode="insecure-demo", audit_log=str(data / "a.jsonl"),
                                   rate_limit_per_minute=0, max_in_flight=0))
        if not pinned:
            built.user_middleware = [m for m in built.user_middleware if m.cls is not PinLayer]
        return built

    apps = {"pinned": app(True), "baseline (no PinLayer)": app(False)}
    paths = [f"/STU3/Patient/{100001 + i % patients}" for i in range(requests)]
    times: dict[str, list[float]] = {name: [] for name in apps}
    stack = contextlib.AsyncExitStack()
    for a in apps.values():  # serving (the audit file open) for the whole measurement
        await stack.enter_async_context(a.router.lifespan_context(a))  # type: ignore[attr-defined]
    clients = {}
    for name, a in apps.items():
        transport = httpx.ASGITransport(app=a)  # type: ignore[arg-type]
        clients[name] = httpx.AsyncClient(transport=transport, base_url="http://bench")
        for p in paths[:200]:  # warm-up
            assert (await clients[name].get(p)).status_code == 200
    for _ in range(rounds):
        for name, client in clients.items():  # alternating: drift hits both alike
            started = time.perf_counter()
            for p in paths:
                await client.get(p)
            times[name].append((time.perf_counter() - started) / requests * 1e6)
    for client in clients.values():
        await client.aclose()
    await stack.aclose()
    base = statistics.median(times["baseline (no PinLayer)"])
    print(f"{requests} reads per round, {rounds} rounds, in-process; median µs per request:")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:<24} {med:8.1f} µs   rounds: "
              + " ".join(f"{v:.0f}" for v in values) + f"   ({med / base:.3f}x baseline)")


async def layer_only(calls: int, rounds: int) -> None:
    """The layer alone around a do-nothing ASGI app: its own cost, free of the request's."""
    from gateway.registry import Registry
    from gateway.reload import LiveMappings, PinLayer

    async def inner(scope: object, receive: object, send: object) -> None:
        return None

    layer = PinLayer(inner, LiveMappings(Registry([])))  # type: ignore[arg-type]
    scope = {"type": "http"}
    times: dict[str, list[float]] = {"PinLayer + app": [], "app alone (baseline)": []}
    for _ in range(rounds):
        for name, target in (("PinLayer + app", layer), ("app alone (baseline)", inner)):
            started = time.perf_counter()
            for _ in range(calls):
                await target(scope, None, None)  # type: ignore[arg-type]
            times[name].append((time.perf_counter() - started) / calls * 1e9)
    base = statistics.median(times["app alone (baseline)"])
    print(f"{calls} calls per round, {rounds} rounds; median ns per call:")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:<24} {med:8.0f} ns   (+{med - base:.0f} ns over the baseline)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--patients", type=int, default=2000)
    args = ap.parse_args()
    asyncio.run(layer_only(200_000, args.rounds))
    asyncio.run(run(args.requests, args.rounds, args.patients))


if __name__ == "__main__":
    main()
