"""Shared state on a real Redis server, and the declared behaviour when Redis is gone.

Two ``RedisState`` objects stand for two gateway processes: what one records, the other sees.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
import structlog
from prometheus_client import REGISTRY
from starlette.applications import Starlette

from gateway.state import SharedStateUnavailable
from gateway.state.local import LocalState
from gateway.state.redis import RedisState, _key
from tests.redis_server import TempRedis, free_port

pytestmark = pytest.mark.anyio


def fallbacks(store: str, action: str) -> float:
    value = REGISTRY.get_sample_value("ccg_shared_state_fallbacks_total",
                                      {"store": store, "action": action})
    return value or 0.0


async def test_a_rate_limit_is_shared_and_its_key_expires(redis_server: TempRedis) -> None:
    one, two = RedisState(redis_server.url), RedisState(redis_server.url)
    client = f"client:{uuid.uuid4()}"
    try:
        # burst 3 at 1 token a minute: 3 takes pass between the two "processes", then no more
        waits = [await (one if i % 2 else two).take(client, 1 / 60, 3) for i in range(4)]
        assert waits[:3] == [0.0, 0.0, 0.0]
        assert 55 < waits[3] <= 60  # a token a minute: about a minute to the next one
        assert await one.take(f"client:{uuid.uuid4()}", 1 / 60, 3) == 0.0  # per client
        ttl = await one.client.pttl(_key("rl", client))
        assert 0 < ttl <= 3 * 60_000 + 1000  # gone once the bucket would be full again
        assert client.encode() not in await one.client.keys("*")  # no client string as key
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_replayed_jti_is_seen_by_another_process(redis_server: TempRedis) -> None:
    one, two = RedisState(redis_server.url), RedisState(redis_server.url)
    jti = f"issuer\x00{uuid.uuid4()}"
    try:
        assert await one.seen(jti, time.time() + 30) is False
        assert await two.seen(jti, time.time() + 30) is True
        assert await one.seen(jti, time.time() + 30) is True
        ttl = await one.client.pttl(_key("jti", jti))
        assert 25_000 < ttl <= 30_000  # kept until the token expires, not longer
    finally:
        await one.aclose()
        await two.aclose()


async def test_redis_unavailable_replay_fails_closed_rate_limit_goes_local() -> None:
    timeout = 1.0
    dead = RedisState(f"redis://127.0.0.1:{free_port()}/0", timeout=timeout)
    try:
        refused = fallbacks("replay", "refused")
        with pytest.raises(SharedStateUnavailable) as caught:
            await dead.seen("issuer\x00abc", time.time() + 30)
        assert caught.value.status == 503
        assert caught.value.error_code == "SHARED_STATE_UNAVAILABLE"
        assert fallbacks("replay", "refused") == refused + 1
        # the next one is refused at once, without waiting for another timeout
        started = time.perf_counter()
        with pytest.raises(SharedStateUnavailable):
            await dead.seen("issuer\x00def", time.time() + 30)
        assert time.perf_counter() - started < timeout

        local = fallbacks("rate_limit", "local")
        with structlog.testing.capture_logs() as logs:
            waits = [await dead.take("client:x", 1 / 60, 2) for _ in range(3)]
        assert waits[:2] == [0.0, 0.0] and waits[2] > 0  # still limited, by this process
        assert fallbacks("rate_limit", "local") == local + 3
        warnings = [e for e in logs if e["event"] == "shared_state_unavailable"]
        assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"  # not one per call
    finally:
        await dead.aclose()


async def test_local_state_is_the_same_contract_in_one_process() -> None:
    state = LocalState()
    assert [await state.take("k", 1 / 60, 2) for _ in range(3)][2] > 0
    assert await state.seen("j", time.time() + 30) is False
    assert await state.seen("j", time.time() + 30) is True


async def test_a_gateway_with_redis_down_keeps_limiting_locally(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    app = make_app(demo_sqlite_url, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                   redis_timeout_ms=200, rate_limit_per_minute=1, rate_limit_burst=2,
                   audit_log=str(tmp_path / "audit.jsonl"))
    before = fallbacks("rate_limit", "local")
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        codes = [(await c.get("/STU3/Patient/100001")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert fallbacks("rate_limit", "local") == before + 3


async def test_a_gateway_with_redis_down_refuses_tokens_it_cannot_check(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    from gateway.auth.devkeys import mint_dev_token

    app = make_app(demo_sqlite_url, auth_mode="", jwt_jti_replay=True,
                   redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_ms=200,
                   audit_log=str(tmp_path / "audit.jsonl"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        token = mint_dev_token(app.state.settings.data_dir, "user/*.read")
        r = await c.get("/STU3/Patient/100001", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    codes = [c["code"] for i in r.json()["issue"] for c in i["details"]["coding"]]
    assert codes == ["SHARED_STATE_UNAVAILABLE"]


async def test_concurrency_leases_are_shared_and_end_by_themselves(
        redis_server: TempRedis) -> None:
    one, two = RedisState(redis_server.url), RedisState(redis_server.url)
    client = f"client:{uuid.uuid4()}"
    try:
        a = await one.acquire(client, 2, 30)
        b = await two.acquire(client, 2, 30)
        assert a and b and a != b
        assert await one.acquire(client, 2, 30) is None  # both slots held, across processes
        assert await two.acquire(f"client:{uuid.uuid4()}", 2, 30) is not None  # per client
        await two.release(client, a)
        c = await two.acquire(client, 2, 30)
        assert c is not None
        assert 0 < await one.client.pttl(_key("cc", client)) <= 30_000
        # a lease nobody gives back (its process died) ends by itself
        short = f"client:{uuid.uuid4()}"
        lease = 1.0  # long enough that a loaded machine still asks again within it
        assert await one.acquire(short, 1, lease) is not None
        assert await two.acquire(short, 1, lease) is None
        time.sleep(lease + 0.2)
        assert await two.acquire(short, 1, lease) is not None
    finally:
        await one.aclose()
        await two.aclose()


async def test_concurrency_with_redis_down_is_counted_locally() -> None:
    dead = RedisState(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        before = fallbacks("concurrency", "local")
        first = await dead.acquire("client:y", 1, 30)
        assert first is not None
        assert await dead.acquire("client:y", 1, 30) is None
        await dead.release("client:y", first)
        assert await dead.acquire("client:y", 1, 30) is not None
        assert fallbacks("concurrency", "local") == before + 3
    finally:
        await dead.aclose()
    local = LocalState()
    lease = await local.acquire("k", 1, 30)
    assert lease is not None and await local.acquire("k", 1, 30) is None
    await local.release("k", lease)
    assert local._in_flight == {}  # nothing kept for a client with nothing in flight


async def test_a_held_lease_is_renewed_and_an_abandoned_one_ends(
        redis_server: TempRedis) -> None:
    one, two = RedisState(redis_server.url), RedisState(redis_server.url)
    client = f"client:{uuid.uuid4()}"
    try:
        held = await one.acquire(client, 1, 0.3)
        assert held is not None
        await anyio.sleep(0.7)  # over twice its lifetime: its holder renewed it
        assert await two.acquire(client, 1, 0.3) is None
        # the holder stops renewing (as if it died): the slot comes back on its own
        assert one._renewer is not None
        one._renewer.cancel()
        await anyio.sleep(0.5)
        assert await two.acquire(client, 1, 0.3) is not None
        # a lease that ended is not brought back by a late renewal of its old holder
        assert await one._renew(keys=[_key("cc", client)], args=[300, held]) == 0
    finally:
        await one.aclose()
        await two.aclose()


async def test_per_address_buckets_are_shared_and_apart_from_the_client_rate(
        redis_server: TempRedis) -> None:
    one, two = RedisState(redis_server.url), RedisState(redis_server.url)
    address = f"ip:{uuid.uuid4()}"
    try:
        assert await one.peek(address, 1 / 60, 2, "authfail") == 0.0  # nothing yet: full
        assert await one.take(address, 1 / 60, 2, "authfail") == 0.0
        assert await two.peek(address, 1 / 60, 2, "authfail") == 0.0  # one token left
        assert await two.take(address, 1 / 60, 2, "authfail") == 0.0
        assert 55 < await one.peek(address, 1 / 60, 2, "authfail") <= 60  # used up, shared
        # the same address's request bucket and client bucket are other keys
        assert await one.take(address, 1 / 60, 2, "src") == 0.0
        assert await one.take(address, 1 / 60, 2) == 0.0
    finally:
        await one.aclose()
        await two.aclose()


async def test_per_address_buckets_with_redis_down_are_local() -> None:
    dead = RedisState(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        before = fallbacks("auth_failures", "local")
        assert await dead.take("ip:x", 1 / 60, 1, "authfail") == 0.0
        assert await dead.peek("ip:x", 1 / 60, 1, "authfail") > 0  # still limited, here
        assert await dead.take("ip:x", 1 / 60, 1, "src") == 0.0  # its own bucket
        assert fallbacks("auth_failures", "local") == before + 2
        assert fallbacks("source_limit", "local") >= 1
    finally:
        await dead.aclose()


async def test_admit_peeks_the_failures_and_takes_a_request_in_one_call(
        redis_server: TempRedis) -> None:
    one, two = RedisState(redis_server.url), RedisState(redis_server.url)
    address = f"ip:{uuid.uuid4()}"
    failures, requests = (1 / 60, 1), (1 / 60, 2)
    try:
        assert await one.admit(address, failures, requests) == 0.0
        assert await two.admit(address, failures, requests) == 0.0
        assert 55 < await one.admit(address, failures, requests) <= 60  # requests used up
        other = f"ip:{uuid.uuid4()}"
        assert await one.take(other, *failures, "authfail") == 0.0  # one failure: used up
        assert 55 < await two.admit(other, failures, requests) <= 60  # refused, nothing taken
        assert await one.peek(other, *requests, "src") == 0.0
    finally:
        await one.aclose()
        await two.aclose()
    local = LocalState()
    assert local.admit_now("k", failures, requests) == 0.0
    local.take_now("k", *failures, "authfail")
    assert local.admit_now("k", failures, requests) > 0


async def test_rate_and_lease_in_one_call(redis_server: TempRedis) -> None:
    one, two = RedisState(redis_server.url), RedisState(redis_server.url)
    client = f"client:{uuid.uuid4()}"
    try:
        wait, a = await one.acquire_rated(client, 1 / 60, 3, 1, 30)
        assert wait == 0.0 and a is not None
        wait, b = await two.acquire_rated(client, 1 / 60, 3, 1, 30)
        assert wait == 0.0 and b is None  # a token taken, the one slot held by the other
        await one.release(client, a)
        await anyio.sleep(0.05)  # sent to Redis (with any others) a moment later
        wait, c = await two.acquire_rated(client, 1 / 60, 3, 1, 30)
        assert wait == 0.0 and c is not None
        await two.release(client, c)
        wait, d = await one.acquire_rated(client, 1 / 60, 3, 1, 30)
        assert 55 < wait <= 60 and d is None  # the burst of 3 is spent: no lease taken
        await anyio.sleep(0.05)
        assert await one.client.zcard(_key("cc", client)) == 0  # nothing held, nothing taken
    finally:
        await one.aclose()
        await two.aclose()
    dead = RedisState(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        before = fallbacks("concurrency", "local")
        wait, lease = await dead.acquire_rated("client:z", 1 / 60, 1, 1, 30)
        assert wait == 0.0 and lease is not None and lease.startswith("l:")
        assert (await dead.acquire_rated("client:z", 1 / 60, 1, 1, 30))[0] > 0
        assert fallbacks("concurrency", "local") == before + 2
    finally:
        await dead.aclose()
