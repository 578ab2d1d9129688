"""Gateway policy: keys with roles, rate limits per key and tenant in a real redis-server (and the in-process
store, which must behave the same), OpenAI's rate-limit headers, and limits that hold across gateways."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pagoda.gateway.policy.guard import duration, rate_limit_headers
from pagoda.gateway.policy.keys import KeyRecord, KeySpec, Limits, digest
from pagoda.gateway.policy.local_redis import LocalRedis
from pagoda.gateway.policy.store import MemoryStore, RedisStore, Scope
from tests.gateway.conftest import ADMIN, Gateway, responder

LEASE_S = 30.0
T0 = 1_000_000.0  # the stores take the time as an argument: the windows' arithmetic is tested exactly


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with LocalRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_server: LocalRedis) -> Iterator[MemoryStore | RedisStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    prefix = f"t{request.node.name.__hash__() & 0xFFFFFF:x}"  # each test its own keys in the shared server
    store = RedisStore(redis_server.url, prefix)
    yield store
    asyncio.run(store.close())


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def admit(store, scopes: list[Scope], rid: str, cost: int = 1, at: float = 0.0):  # type: ignore[no-untyped-def]
    async def call():  # type: ignore[no-untyped-def]
        try:
            return await store.admit(rid, scopes, cost, T0 + at, LEASE_S)
        finally:
            if isinstance(store, RedisStore):
                await store.client.aclose()  # a new event loop each call: no pooled connection may outlive it
    return run(call())


def test_requests_per_minute_admit_exactly_the_limit_and_say_when(store) -> None:
    key = [Scope("key:a", Limits(rpm=5))]
    verdicts = [admit(store, key, f"r{i}", at=i) for i in range(7)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 2
    assert verdicts[4].states[0].requests == 5 and verdicts[0].states[0].requests_reset_s == pytest.approx(60)
    refused = verdicts[5]
    assert refused.denied_kind == "requests" and refused.retry_after_s == pytest.approx(55)  # r0 leaves at 60
    assert admit(store, key, "late", at=60.5).allowed  # r0 has left the window
    assert not admit(store, key, "later", at=60.6).allowed


def test_tokens_per_minute_are_charged_corrected_and_refunded(store) -> None:
    key = [Scope("key:t", Limits(tpm=1000))]
    assert admit(store, key, "a", 400).allowed and admit(store, key, "b", 400, at=10).allowed
    refused = admit(store, key, "c", 400, at=20)
    assert refused.denied_kind == "tokens" and refused.retry_after_s == pytest.approx(40)
    run(_settle(store, "a", key, 100))  # it used fewer than estimated
    assert admit(store, key, "c", 400, at=21).allowed
    too_big = admit(store, key, "d", 5000, at=22)
    assert too_big.denied_kind == "tokens" and too_big.retry_after_s == pytest.approx(60)


async def _settle(store, rid: str, scopes: list[Scope], tokens: int) -> None:  # type: ignore[no-untyped-def]
    await store.settle(rid, scopes, tokens)
    if isinstance(store, RedisStore):
        await store.client.aclose()


async def _release(store, rid: str, scopes: list[Scope]) -> None:  # type: ignore[no-untyped-def]
    await store.release(rid, scopes)
    if isinstance(store, RedisStore):
        await store.client.aclose()


def test_requests_in_flight_are_leases(store) -> None:
    key = [Scope("key:c", Limits(max_concurrency=2))]
    assert admit(store, key, "a").allowed and admit(store, key, "b").allowed
    assert admit(store, key, "c").denied_kind == "concurrency"
    run(_release(store, "a", key))
    assert admit(store, key, "c").allowed
    assert admit(store, key, "d", at=LEASE_S + 1).allowed  # the leases of a gateway that died have expired


def test_every_scope_or_none_is_charged(store) -> None:
    """The tenant's window refuses: the key's is not charged either (one atomic decision)."""
    scopes = [Scope("key:k", Limits(rpm=10, tpm=100)), Scope("tenant:acme", Limits(rpm=3))]
    verdicts = [admit(store, scopes, f"r{i}", 10, at=i) for i in range(4)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert verdicts[3].denied_scope == 1 and verdicts[3].states[0].requests == 3
    headers = rate_limit_headers(scopes, verdicts[2])
    assert headers == {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0",
                       "x-ratelimit-reset-requests": "58s", "x-ratelimit-limit-tokens": "100",
                       "x-ratelimit-remaining-tokens": "70", "x-ratelimit-reset-tokens": "58s"}


def test_keys_are_stored_by_digest_only(store) -> None:
    key, record = KeyRecord.issue(KeySpec(tenant="acme", role="read-only", models=["smol"], rpm=5))

    async def roundtrip():  # type: ignore[no-untyped-def]
        await store.save_key(record)
        found = (await store.key_for(digest(key)), await store.key_for(digest(key + "x")),
                 await store.key_by_id(record.key_id), await store.keys())
        if isinstance(store, RedisStore):
            raw = b"".join([v for k in await store.client.keys(f"{store.prefix}:*") for v in
                            [await store.client.dump(k) or b""]])
            assert key.encode() not in raw  # the key's text is nowhere in Redis
            await store.client.aclose()
        return found

    by_digest, unknown, by_id, listed = run(roundtrip())
    assert by_digest == record == by_id and unknown is None and record in listed
    assert key.startswith("pk-") and len(key) == 46 and key not in str(record.public())


def test_durations_read_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0.02, 1.5, 12, 360)] == ["20ms", "1.5s", "12s", "6m0s"]


# ---- gateways --------------------------------------------------------------------------------------


def chat(url: str, key: str | None, model: str = "echo", **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url, process = responder(tmp_path_factory.mktemp("responder"), "echo", "--model", "echo", "--model", "other")
    yield url
    process.terminate()
    process.wait(10)


def gateway_config(upstream: str, **policy) -> dict:  # type: ignore[no-untyped-def]
    return {"models": [{"name": "echo", "upstreams": [{"url": upstream, "model": "echo"}]},
                       {"name": "other", "upstreams": [{"url": upstream, "model": "other"}]}],
            "policy": {"require_keys": True, **policy}}


def test_keys_roles_models_revocation_and_rotation(tmp_path: Path, upstream: str, redis_server: LocalRedis) -> None:
    gateway = Gateway(tmp_path, gateway_config(upstream, redis_url=redis_server.url, redis_prefix="roles"))
    try:
        def make(**spec) -> dict:  # type: ignore[no-untyped-def]
            answer = gateway.admin("POST", "/admin/keys", json=spec)
            assert answer.status_code == 201, answer.text
            return answer.json()

        user = make(tenant="acme", models=["echo"])
        viewer = make(tenant="acme", role="read-only")
        boss = make(tenant="ops", role="admin")
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=user["key"], max_retries=0)
        out = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert out.choices[0].message.content
        assert [m.id for m in client.models.list().data] == ["echo"]  # only what the key may use
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
        assert denied.value.body["param"] == "model"
        for bad in (None, "pk-" + "A" * 43, "not a key at all", user["key"] + "x"):
            answer = chat(gateway.url, bad)
            assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error", bad
        assert chat(gateway.url, viewer["key"]).status_code == 403  # read-only: no inference
        assert httpx.get(f"{gateway.url}/admin/keys", headers={"Authorization": f"Bearer {viewer['key']}"}).status_code == 200
        assert httpx.post(f"{gateway.url}/admin/keys", json={"tenant": "x"},
                          headers={"Authorization": f"Bearer {viewer['key']}"}).status_code == 403
        made = httpx.post(f"{gateway.url}/admin/keys", json={"tenant": "beta", "rpm": 2},
                          headers={"Authorization": f"Bearer {boss['key']}"})
        assert made.status_code == 201  # an admin-role key administers
        listed = gateway.admin("GET", "/admin/keys").json()["keys"]
        assert {k["key_id"] for k in listed} >= {user["key_id"], viewer["key_id"], made.json()["key_id"]}
        assert all("key" not in k and "digest" not in k for k in listed)
        for body, named in (({}, "tenant"), ({"tenant": "a", "role": "root"}, "role"), ({"tenant": "a", "rpm": 0}, "rpm"),
                            ({"tenant": "a", "budgets": 1}, "budgets")):
            answer = gateway.admin("POST", "/admin/keys", json=body)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == named, body
        rotated = gateway.admin("POST", f"/admin/keys/{user['key_id']}/rotate").json()
        assert rotated["replaces"] == user["key_id"] and rotated["models"] == ["echo"]
        assert chat(gateway.url, user["key"]).status_code == 401 and chat(gateway.url, rotated["key"]).status_code == 200
        assert gateway.admin("DELETE", f"/admin/keys/{rotated['key_id']}").json()["revoked"] is not None
        assert chat(gateway.url, rotated["key"]).status_code == 401
        assert gateway.admin("DELETE", "/admin/keys/nope").status_code == 404
        assert httpx.get(f"{gateway.url}/metrics").status_code == 401  # every route but /health wants a key
        assert httpx.get(f"{gateway.url}/health").status_code == 200
    finally:
        gateway.stop()


def test_rate_limits_answer_as_openai_does(tmp_path: Path, upstream: str) -> None:
    """The in-process store (no Redis): a key's window, its tenant's, and the headers of both."""
    gateway = Gateway(tmp_path, gateway_config(upstream, tenants={"small": {"tpm": 60}}))
    try:
        key = gateway.admin("POST", "/admin/keys", json={"tenant": "acme", "rpm": 3}).json()["key"]
        answers = [chat(gateway.url, key) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
        refused = answers[3]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert 50 <= int(refused.headers["Retry-After"]) <= 60
        small = gateway.admin("POST", "/admin/keys", json={"tenant": "small"}).json()["key"]
        first = chat(gateway.url, small, max_tokens=20)  # charged 20 + the prompt's few, corrected to its usage
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "60"
        assert chat(gateway.url, small, max_tokens=50).status_code == 200  # the correction left room
        too_big = chat(gateway.url, small, max_tokens=100)
        assert too_big.status_code == 429 and "lower max_tokens" in too_big.json()["error"]["message"]
    finally:
        gateway.stop()


@pytest.mark.slow
def test_four_gateways_sharing_redis_admit_exactly_the_limit(tmp_path: Path, upstream: str,
                                                             redis_server: LocalRedis) -> None:
    limit = 12
    config = gateway_config(upstream, redis_url=redis_server.url, redis_prefix="exact")
    gateways = [Gateway(tmp_path, config) for _ in range(4)]
    try:
        key = gateways[0].admin("POST", "/admin/keys", json={"tenant": "burst", "rpm": limit}).json()["key"]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(lambda i: chat(gateways[i % 4].url, key).status_code, range(10 * limit)))
        assert statuses.count(200) == limit and statuses.count(429) == 9 * limit
    finally:
        for g in gateways:
            g.stop()
