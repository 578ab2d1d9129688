"""Gateway policy: keys with roles, rate limits per key and tenant in a real redis-server (and the in-process
store, which must behave the same), OpenAI's rate-limit headers, and limits that hold across gateways."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pagoda.gateway.config import AuditConfig, GatewayConfig, PriceConfig
from pagoda.gateway.errors import GatewayError
from pagoda.gateway.policy.audit import AuditLog, verify
from pagoda.gateway.policy.fair_queue import FairQueue
from pagoda.gateway.policy.answers import duration, rate_limit_headers
from pagoda.gateway.policy.guard import Guard, Ticket
from pagoda.gateway.policy.keys import KeyRecord, KeySpec, Limits, Principal, digest
from pagoda.gateway.policy.local_redis import LocalRedis
from pagoda.gateway.policy.records import UsageRecord
from pagoda.gateway.policy.redis_store import FLUSH_AFTER_S, RedisStore
from pagoda.gateway.policy.store import Ended, MemoryStore, Scope
from pagoda.gateway.policy.usage import CostModel
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
    run(_finish(store, "a", key, 400, 100))  # it used fewer than estimated
    assert admit(store, key, "c", 400, at=21).allowed
    too_big = admit(store, key, "d", 5000, at=22)
    assert too_big.denied_kind == "tokens" and too_big.retry_after_s == pytest.approx(60)


async def _finish(store, rid: str, scopes: list[Scope], charged: int, tokens: int | None) -> None:  # type: ignore[no-untyped-def]
    await store.finish([Ended(rid, scopes, charged, tokens)])
    if isinstance(store, RedisStore):
        await store.client.aclose()


def test_requests_in_flight_are_leases(store) -> None:
    key = [Scope("key:c", Limits(max_concurrency=2))]
    assert admit(store, key, "a").allowed and admit(store, key, "b").allowed
    assert admit(store, key, "c").denied_kind == "concurrency"
    run(_finish(store, "a", key, 1, None))
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
        garbled = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
        assert httpx.post(f"{gateway.url}/v1/chat/completions", **garbled).status_code == 401  # the key comes first
        assert httpx.post(f"{gateway.url}/v1/chat/completions", **{**garbled, "headers": {
            **garbled["headers"], "Authorization": f"Bearer {user['key']}"}}).status_code == 400
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


def test_a_request_forwarded_while_admitted_is_held_back_when_refused(tmp_path: Path, upstream: str,
                                                                        redis_server: LocalRedis) -> None:
    """Overlap: a gateway that last heard of ample room forwards a request while Redis decides. Another gateway
    filled the window meanwhile: the answer is the 429 (not a byte of the upstream's stream), the upstream saw
    the request, and the next request, with no room heard of, waits for its admission."""
    audit = tmp_path / "audit.jsonl"
    config = gateway_config(upstream, redis_url=redis_server.url, redis_prefix="overlap")
    first = Gateway(tmp_path, {**config, "policy": {**config["policy"], "audit": {"path": str(audit)}}})
    second = Gateway(tmp_path, config)
    try:
        limit = 40
        key = first.admin("POST", "/admin/keys", json={"tenant": "o", "rpm": limit}).json()["key"]
        assert chat(first.url, key).status_code == 200  # first hears: 39 left
        assert [chat(second.url, key).status_code for _ in range(limit - 1)] == [200] * (limit - 1)
        seen = httpx.get(f"{upstream}/health").json()["requests"]
        refused = chat(first.url, key, stream=True)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0" and "data:" not in refused.text
        assert httpx.get(f"{upstream}/health").json()["requests"] == seen + 1  # it was forwarded, then closed
        assert chat(first.url, key).status_code == 429
        assert httpx.get(f"{upstream}/health").json()["requests"] == seen + 1  # now 0 left was heard: held
        metrics = first.admin("GET", "/metrics").text
        assert 'pagoda_gateway_admission_overlaps_total{outcome="refused"} 1.0' in metrics
        overlapped = second.admin("GET", "/metrics").text
        assert 'pagoda_gateway_admission_overlaps_total{outcome="admitted"}' in overlapped  # the room was ample
    finally:
        first.stop()
        second.stop()
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["decision"] for e in entries if e["event"] == "request"] == ["allowed", "limited", "limited"]


def test_a_client_gone_before_its_admission_frees_its_slot() -> None:
    """The client leaves while the store decides: the slot the decision takes is given back once it comes (with
    the gateway's next admission, which settles ended requests before it decides)."""

    async def scenario() -> bool:
        config = GatewayConfig(models=[{"name": "m", "upstreams": [{"url": "http://127.0.0.1:9"}]}],
                               policy={"require_keys": True})
        guard = Guard(lambda: config, MemoryStore())
        scopes = [Scope("key:k", Limits(max_concurrency=1))]
        principal = Principal("k", "t", "user", limits=Limits(max_concurrency=1))
        decided = asyncio.Event()

        async def slow_admit() -> Ticket:
            await decided.wait()
            return await guard.admit(principal, scopes, 1)

        waiting = asyncio.ensure_future(guard._admitted(asyncio.ensure_future(slow_admit()), None))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        decided.set()
        for _ in range(5):
            await asyncio.sleep(0)
        try:
            await guard.admit(principal, scopes, 1)
        except GatewayError:
            return False
        return True

    assert asyncio.run(scenario())  # the abandoned request's slot was freed: the next one fits


def test_ended_requests_settle_with_the_next_admission_or_on_their_own(store) -> None:
    """A sequential client limited to one request at a time: its next request finds the slot its last one freed
    (the admission settles first), and with no next request the settlement goes alone within FLUSH_AFTER_S."""

    async def scenario() -> tuple[int, int]:
        config = GatewayConfig(models=[{"name": "m", "upstreams": [{"url": "http://127.0.0.1:9"}]}],
                               policy={"require_keys": True})
        guard = Guard(lambda: config, store)
        limits = Limits(max_concurrency=1, tpm=100)
        principal = Principal("seq", "t", "user", limits=limits)
        scopes = guard.scopes(principal)
        admitted = 0
        for _ in range(3):
            ticket = await guard.admit(principal, scopes, 50)  # GatewayError (429) if refused
            guard.settle(ticket, 10)  # used fewer tokens than charged
            admitted += 1
        await asyncio.sleep(FLUSH_AFTER_S * 4)
        verdict = await store.admit("probe", scopes, 1, time.time(), LEASE_S)
        await guard.stop()
        if isinstance(store, RedisStore):
            await store.client.aclose()
        return admitted, verdict.states[0].tokens

    admitted, tokens = asyncio.run(scenario())
    assert admitted == 3  # 3 x 50 charged against 100 a minute: only the corrections let them in
    assert tokens == 3 * 10 + 1  # each corrected to its use, the last one by the timer; the probe's 1


# ---- usage, cost, budgets, audit -------------------------------------------------------------------


def _record(ts: float, key: str, tenant: str, model: str, prompt: int, completion: int, cost: float) -> UsageRecord:
    return UsageRecord(ts, "r", key, tenant, model, "http://u", prompt, completion, cost, 1.0, 200)


def test_usage_adds_up_per_hour_and_spend_per_day_and_month(store) -> None:
    day1 = 1_796_601_600.0  # 2026-12-07 00:00 UTC
    records = [_record(day1 + 10, "k1", "acme", "echo", 10, 5, 0.5), _record(day1 + 20, "k1", "acme", "other", 1, 1, 0.25),
               _record(day1 + 4000, "k2", "acme", "echo", 100, 0, 1.0), _record(day1 + 90000, "k1", "acme", "echo", 2, 2, 2.0)]

    async def go():  # type: ignore[no-untyped-def]
        await store.add_usage(records[:2])
        await store.add_usage(records[2:])
        out = (await store.usage("key", day1, day1 + 3600), await store.usage("model", day1, day1 + 86400),
               await store.usage("tenant", day1 - 3600, day1 + 2 * 86400), await store.spent(["key:k1", "tenant:acme"], day1 + 50))
        if isinstance(store, RedisStore):
            await store.client.aclose()
        return out

    by_key, by_model, by_tenant, spent = run(go())
    assert {k: (t.requests, t.tokens) for k, t in by_key.items()} == {"k1": (2, 17)}  # the first hour only
    assert {k: (t.requests, t.prompt_tokens, t.completion_tokens) for k, t in by_model.items()} == \
        {"echo": (2, 110, 5), "other": (1, 1, 1)}
    assert by_tenant["acme"].requests == 4 and by_tenant["acme"].cost == pytest.approx(3.75)
    (key_day, key_month), (tenant_day, tenant_month) = spent
    assert (key_day.tokens, key_month.tokens, tenant_day.tokens, tenant_month.tokens) == (17, 21, 117, 121)
    assert tenant_month.cost == pytest.approx(3.75)


def test_prices_per_token_and_per_replica_hour() -> None:
    prices = {"cloud": PriceConfig(input_per_million=2.0, output_per_million=8.0),
              "local": PriceConfig(replica_hour=3.6)}
    costs = CostModel(lambda: prices)
    assert costs.cost("cloud", 1000, 500, 1, T0) == pytest.approx(0.006)
    assert costs.cost("free", 1000, 500, 1, T0) == 0.0
    costs.cost("local", 0, 0, 2, T0)  # first seen
    # Half an hour later, 2 replicas at $3.60/h cost $3.60 so far; the 1,000 tokens of the hour carry it.
    assert costs.cost("local", 600, 400, 2, T0 + 1800) == pytest.approx(3.6)
    assert costs.cost("local", 600, 400, 2, T0 + 1800) == pytest.approx(1.8)  # now shared by 2,000 tokens


def test_the_audit_chain_detects_edits_removals_and_survives_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(path=path, max_bytes=4096, keep=20))
    for i in range(60):
        log.append("request", key_id=f"k{i}", status=200, decision="allowed")
    log.close()
    assert len(list(tmp_path.glob("audit.jsonl.*"))) >= 2  # rotated by size
    ok, message = verify(path)
    assert ok and message.startswith("60 entries"), message
    reopened = AuditLog(AuditConfig(path=path, max_bytes=4096, keep=20))  # a restart continues the chain
    reopened.append("admin", route="/admin/keys", status=201)
    reopened.close()
    assert verify(path)[0]
    lines = path.read_bytes().splitlines()
    edited = lines[:]
    edited[0] = edited[0].replace(b'"status":200', b'"status":201')
    path.write_bytes(b"\n".join(edited) + b"\n")
    ok, message = verify(path)
    assert not ok and "changed" in message and f"{path}:1" in message
    path.write_bytes(b"\n".join(lines[:1] + lines[2:]) + b"\n")  # a line removed
    ok, message = verify(path)
    assert not ok and "chain is broken" in message
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert subprocess.run([sys.executable, "-m", "pagoda.cli", "audit", "verify", str(path)]).returncode == 0


def test_usage_cost_budgets_audit_and_tenant_metrics(tmp_path: Path, upstream: str) -> None:
    audit = tmp_path / "audit.jsonl"
    gateway = Gateway(tmp_path, gateway_config(
        upstream, prices={"echo": {"input_per_million": 1000, "output_per_million": 2000}},
        tenants={"capped": {"budget": {"daily_tokens": 10}}}, audit={"path": str(audit)}))
    try:
        acme = gateway.admin("POST", "/admin/keys", json={"tenant": "acme", "budget": {"daily_cost": 1}}).json()
        capped = gateway.admin("POST", "/admin/keys", json={"tenant": "capped"}).json()
        for _ in range(3):
            assert chat(gateway.url, acme["key"]).status_code == 200
        stream = chat(gateway.url, acme["key"], stream=True, stream_options={"include_usage": True})
        assert stream.status_code == 200 and "x-ratelimit-limit-requests" not in stream.headers  # no limits set
        assert chat(gateway.url, acme["key"], model="other").status_code == 200
        assert chat(gateway.url, None).status_code == 401
        assert chat(gateway.url, capped["key"]).status_code == 200  # 2 tokens: under 10
        for _ in range(4):
            chat(gateway.url, capped["key"])
        time.sleep(1.5)  # the usage buffer flushes every second
        over = chat(gateway.url, capped["key"])
        assert over.status_code == 429 and over.json()["error"]["type"] == "insufficient_quota"
        assert over.json()["error"]["code"] == "insufficient_quota" and "daily tokens" in over.json()["error"]["message"]
        rows = {r["group"]: r for r in gateway.admin("GET", "/admin/usage", params={"group_by": "model"}).json()["data"]}
        assert rows["echo"]["requests"] == 9 and rows["other"]["requests"] == 1
        # The responder's answers report 1 + 1 tokens, its stream 1 + 4 (in the usage chunk asked for).
        assert rows["echo"]["cost"] == pytest.approx((8 * (1000 + 2000) + 1000 + 4 * 2000) / 1e6)
        by_key = {r["group"]: r for r in gateway.admin("GET", "/admin/usage", params={"group_by": "key"}).json()["data"]}
        assert by_key[acme["key_id"]]["requests"] == 5 and by_key[capped["key_id"]]["requests"] == 5
        assert gateway.admin("GET", "/admin/usage", params={"group_by": "color"}).json()["error"]["param"] == "group_by"
        printed = subprocess.run([sys.executable, "-m", "pagoda.cli", "usage", "--url", gateway.url, "--admin-key", ADMIN,
                                  "--group-by", "tenant"], capture_output=True, text=True, check=True).stdout
        assert "acme" in printed and "capped" in printed and "cost ($)" in printed
        metrics = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        assert 'pagoda_gateway_tenant_requests_total{decision="limited",tenant="capped"} 1.0' in metrics
        assert 'pagoda_gateway_tenant_requests_total{decision="denied",tenant="unknown"} 1.0' in metrics
    finally:
        gateway.stop()
    ok, message = verify(audit)
    assert ok, message
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    decisions = [e["decision"] for e in entries if e["event"] == "request"]
    assert decisions.count("allowed") == 10 and decisions.count("limited") == 1 and decisions.count("denied") == 1
    assert [e["route"] for e in entries if e["event"] == "admin"][:2] == ["/admin/keys", "/admin/keys"]
    assert all("prompt" not in e for e in entries) and all(ADMIN not in line for line in audit.read_text().splitlines())


@pytest.mark.slow
def test_redis_stopped_mid_load_fails_open_or_closed_and_loses_no_usage(tmp_path: Path, upstream: str) -> None:
    server = LocalRedis(tmp_path / "redis", persist=True).start()
    config = gateway_config(upstream, redis_url=server.url, redis_prefix="outage", redis_timeout_s=0.5)
    closed = Gateway(tmp_path, config)
    opened = Gateway(tmp_path, {**config, "policy": {**config["policy"], "on_store_error": "open"}})
    try:
        key = closed.admin("POST", "/admin/keys", json={"tenant": "t", "rpm": 1000}).json()["key"]
        served = [chat(g.url, key).status_code for g in (closed, opened)]
        server.stop(kill=True)
        during = [chat(closed.url, key).status_code, chat(opened.url, key).status_code, chat(opened.url, key).status_code]
        assert during[0] == 503 and during[1:] == [200, 200]  # closed refuses; open goes on with its own limits
        server.start()
        time.sleep(1.5)  # the open gateway's buffered records flush
        after = [chat(g.url, key).status_code for g in (closed, opened)]
        assert served == [200, 200] and after == [200, 200]
        allowed = served.count(200) + during.count(200) + after.count(200)
        # Each gateway flushes its own buffer before it answers /admin/usage; a flush that meets a connection
        # Redis dropped keeps its records for the next one, so the sum arrives within a few flushes.
        counted: list[int] = []
        for _ in range(20):
            closed.admin("GET", "/admin/usage")
            rows = opened.admin("GET", "/admin/usage", params={"group_by": "tenant"}).json()["data"]
            counted.append(rows[0]["requests"] if rows and rows[0]["group"] == "t" else 0)
            if counted[-1] >= allowed:
                break
            time.sleep(0.25)
        assert counted[-1] == allowed and max(counted) == allowed, counted  # none lost, none counted twice
    finally:
        closed.stop()
        opened.stop()
        server.stop()


# ---- fair shares when saturated ----------------------------------------------------------------------


def _dispatch_order(requests: list[tuple[str, str, float, int]], capacity: int = 1) -> list[str]:
    """Queue ``requests`` (name, tenant, weight, priority) behind one that holds the only slot, then let them
    through one at a time: the order they got the slot in."""

    async def scenario() -> list[str]:
        queue, order, gates = FairQueue(), [], {}

        async def request(name: str, tenant: str, weight: float, priority: int) -> None:
            async with queue.slot(capacity, tenant, weight, priority, 1, 100, 10):
                order.append(name)
                gates[name] = asyncio.Event()
                await gates[name].wait()

        first = asyncio.create_task(request("first", "x", 1.0, 0))
        await asyncio.sleep(0)
        tasks = [first]
        for r in requests:
            tasks.append(asyncio.create_task(request(*r)))
            await asyncio.sleep(0)
        while len(order) < len(tasks) or any(not g.is_set() for g in gates.values()):
            await asyncio.sleep(0)
            for name in order:
                if not gates[name].is_set():
                    gates[name].set()
                    break
        await asyncio.gather(*tasks)
        return order[1:]

    return asyncio.run(scenario())


def test_a_saturated_group_serves_tenants_fairly_by_weight_and_key_priority() -> None:
    flood = [(f"a{i}", "a", 1.0, 0) for i in range(4)]
    # b's requests came after a's flood, and are served between a's, not after them.
    assert _dispatch_order(flood + [("b0", "b", 1.0, 0), ("b1", "b", 1.0, 0)]) == ["a0", "b0", "a1", "b1", "a2", "a3"]
    assert _dispatch_order(flood + [("vip", "c", 1.0, 5)])[0] == "vip"  # a key's priority goes first
    heavy = [(f"h{i}", "h", 3.0, 0) for i in range(6)] + [(f"l{i}", "l", 1.0, 0) for i in range(3)]
    order = _dispatch_order(heavy)
    assert [n[0] for n in order[:8]].count("h") == 6  # weight 3 against 1: three of every four slots


def test_a_full_queue_and_a_long_wait_answer_503() -> None:
    async def scenario() -> list[str]:
        queue = FairQueue()
        hold = asyncio.Event()

        async def holder() -> None:
            async with queue.slot(1, "a", 1.0, 0, 1, 1, 10):
                await hold.wait()

        async def waiter(timeout_s: float) -> str:
            try:
                async with queue.slot(1, "b", 1.0, 0, 1, 1, timeout_s):
                    return "served"
            except GatewayError as exc:
                return exc.code or ""

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        slow = asyncio.create_task(waiter(0.05))
        await asyncio.sleep(0)
        full = await waiter(10)  # one already waits: the queue of 1 is full
        timed_out = await slow
        hold.set()
        await task
        return [full, timed_out, await waiter(1)]

    assert asyncio.run(scenario()) == ["queue_full", "queue_timeout", "served"]


def test_requests_wait_for_a_saturated_upstream_in_fair_order(tmp_path: Path) -> None:
    url, process = responder(tmp_path, "slow", "--model", "slow", "--stream-chunks", "3", "--chunk-delay-ms", "150")
    gateway = Gateway(tmp_path, {"models": [{"name": "slow", "upstreams": [{"url": url, "max_concurrency": 1}]}],
                                 "policy": {"require_keys": True}})
    try:
        keys = {t: gateway.admin("POST", "/admin/keys", json={"tenant": t}).json()["key"] for t in ("a", "b")}
        done: list[str] = []

        def stream(name: str) -> int:
            answer = chat(gateway.url, keys[name[0]], model="slow", stream=True)
            done.append(name)
            return answer.status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            flood = [pool.submit(stream, f"a{i}") for i in range(4)]
            time.sleep(0.2)  # a's flood holds the slot and the queue
            late = pool.submit(stream, "b0")
            statuses = [f.result() for f in flood] + [late.result()]
        assert statuses == [200] * 5  # waited for the one slot instead of being refused
        assert done.index("b0") <= 2  # b got the next slot but one, not the last
    finally:
        gateway.stop()
        process.terminate()
        process.wait(10)
