"""The gateway's parts without sockets: config validation, the breaker, the policies, the retry budget."""

from __future__ import annotations

import collections
import random

import pytest

from pagoda.gateway.config import BreakerConfig, GatewayConfig, GatewayConfigError, PrefixConfig, SessionConfig, parse_config
from pagoda.gateway.policies import (
    PowerOfTwo,
    PrefixAware,
    RouteContext,
    SessionAffinity,
    Weighted,
    prefix_hashes,
)
from pagoda.gateway.health import scrape_load
from pagoda.gateway.proxy import prompt_text
from pagoda.gateway.router import RoutingTable
from pagoda.gateway.upstream import BreakerState, CircuitBreaker, Upstream


def _config(**extra):
    return parse_config({"models": [
        {"name": "m", "version": "v1", "upstreams": [{"url": "http://127.0.0.1:9001"}]},
        {"name": "m", "version": "v2", "aliases": ["gpt-x"], "fallbacks": ["other"],
         "upstreams": [{"url": "http://127.0.0.1:9002", "model": "m-real", "weight": 3}]},
        {"name": "other", "upstreams": [{"url": "http://127.0.0.1:9003"}]}], **extra})


def _table(config: GatewayConfig) -> RoutingTable:
    return RoutingTable(config, config.models)


@pytest.mark.parametrize(("raw", "named"), [
    ({}, "no upstreams"),
    ({"models": [{"name": "m", "upstreams": []}]}, "models.0.upstreams"),
    ({"models": [{"name": "m", "upstreams": [{"url": "not a url"}]}]}, "models.0.upstreams.0.url"),
    ({"models": [{"name": "m", "policy": "random", "upstreams": [{"url": "http://a"}]}]}, "models.0.policy"),
    ({"models": [{"name": "m", "upstreams": [{"url": "http://a", "weight": 0}]}]}, "models.0.upstreams.0.weight"),
    ({"models": [{"name": "m", "upstreams": [{"url": "http://a", "api_key_env": "PAGODA_UNSET_KEY"}]}]},
     "PAGODA_UNSET_KEY"),
    ({"models": [{"name": "m", "fallbacks": ["nope"], "upstreams": [{"url": "http://a"}]}]}, "unknown model nope"),
    ({"port": 70000, "discover": [{"url": "http://a"}]}, "port"),
    ({"discover": [{"url": "http://a"}], "typo": 1}, "typo"),
    ({"health": {"interval_s": -1}, "discover": [{"url": "http://a"}]}, "health.interval_s"),
    ({"policy": {"tenants": {"acme": {"rpm": 0}}}, "discover": [{"url": "http://a"}]}, "policy.tenants.acme.rpm"),
    ({"policy": {"tenants": {"acme": {"tpm": "lots"}}}, "discover": [{"url": "http://a"}]}, "policy.tenants.acme.tpm"),
    ({"policy": {"redis_url": "http://a"}, "discover": [{"url": "http://a"}]}, "policy.redis_url"),
    ({"policy": {"require_key": True}, "discover": [{"url": "http://a"}]}, "policy.require_key"),
])
def test_config_errors_name_the_field(raw, named) -> None:
    with pytest.raises(GatewayConfigError, match=named):
        parse_config(raw)


def test_names_resolve_to_the_current_version_aliases_and_explicit_versions() -> None:
    table = RoutingTable(_config(), _config().models)
    assert table.resolve("m").key == "m@v2" and table.resolve("m@v1").key == "m@v1"
    assert table.resolve("gpt-x").key == "m@v2" and table.resolve("nope") is None
    assert [g.key for g in table.route_chain(table.resolve("m"))] == ["m@v2", "other"]
    assert table.resolve("m").upstreams[0].model == "m-real"
    # A reload keeps the live state of the upstreams it still lists.
    table.resolve("m").upstreams[0].in_flight = 3
    again = RoutingTable(_config(), _config().models, table)
    assert again.resolve("m").upstreams[0].in_flight == 3


def test_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=2, open_s=5, half_open_requests=1), lambda: now[0])
    breaker.on_failure()
    assert breaker.allows()
    breaker.on_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allows()
    now[0] = 5.0
    assert breaker.allows() and breaker.state is BreakerState.HALF_OPEN
    breaker.on_send()
    assert not breaker.allows()  # one trial at a time
    breaker.on_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allows()
    now[0] = 10.0
    assert breaker.allows()
    breaker.on_send()
    breaker.on_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allows()


def _upstreams(n: int, weights=None) -> list[Upstream]:
    table = RoutingTable(parse_config({"models": [{"name": "m", "upstreams": [
        {"url": f"http://127.0.0.1:{9000 + i}", "weight": (weights or [1] * n)[i]} for i in range(n)]}]}),
        parse_config({"models": [{"name": "m", "upstreams": [
            {"url": f"http://127.0.0.1:{9000 + i}", "weight": (weights or [1] * n)[i]} for i in range(n)]}]}).models)
    return table.resolve("m").upstreams


def test_weighted_round_robin_gives_each_its_share_interleaved() -> None:
    ups = _upstreams(3, [1, 2, 5])
    policy = Weighted()
    picks = [policy.order(ups, RouteContext())[0].url[-1] for _ in range(80)]
    assert collections.Counter(picks) == {"0": 10, "1": 20, "2": 50}
    assert "2222222" not in "".join(picks[:8])  # smooth: never a long run on the heaviest


def test_power_of_two_never_picks_the_most_loaded() -> None:
    ups = _upstreams(3)
    ups[0].in_flight, ups[1].in_flight, ups[2].in_flight = 9, 1, 5
    policy = PowerOfTwo(random.Random(0))
    assert all(policy.order(ups, RouteContext())[0] is not ups[0] for _ in range(50))


def test_session_affinity_is_sticky_bounded_and_moves_few_keys() -> None:
    ups = _upstreams(4)
    policy = SessionAffinity(SessionConfig())
    keys = [f"user-{i}" for i in range(400)]
    first = {k: policy.order(ups, RouteContext(session_key=k))[0].url for k in keys}
    assert first == {k: policy.order(ups, RouteContext(session_key=k))[0].url for k in keys}
    assert len(set(first.values())) == 4
    # One upstream gone: only its sessions move.
    moved = {k: policy.order(ups[:3], RouteContext(session_key=k))[0].url for k in keys}
    assert all(moved[k] == first[k] for k in keys if first[k] != ups[3].url)
    # Over the load bound the session's upstream is skipped.
    home = next(u for u in ups if u.url == first["user-0"])
    home.in_flight = 50
    assert policy.order(ups, RouteContext(session_key="user-0"))[0] is not home


def test_prefix_aware_follows_the_prefix_unless_overloaded() -> None:
    ups = _upstreams(3)
    config = PrefixConfig(block_chars=16)
    policy = PrefixAware(config)
    system = "You are a careful assistant. " * 4
    ctx = RouteContext(prefix_hashes=prefix_hashes(system + "question one", config))
    ups[0].in_flight, ups[1].in_flight = 2, 1
    chosen = policy.order(ups, ctx)[0]
    assert chosen is ups[2]  # the least loaded; nothing known yet
    policy.routed(chosen, ctx)
    other = RouteContext(prefix_hashes=prefix_hashes(system + "another question entirely", config))
    ups[2].in_flight = 3
    assert policy.order(ups, other)[0] is ups[2]  # same system prompt: same replica, within the bound
    ups[2].in_flight = 30
    assert policy.order(ups, other)[0] is ups[1]  # over the bound: the least loaded


def test_prompt_text_follows_messages_and_prompts() -> None:
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert prompt_text(chat) == "system\x1fS\x1euser\x1fU\x1e"
    assert prompt_text({"prompt": ["a", "b"]}) == "a" and prompt_text({"prompt": [1, 2]}) == "1,2"
    assert prompt_text({}) == ""


def test_a_full_draining_down_or_open_upstream_is_not_a_candidate() -> None:
    table = _table(parse_config({"models": [{"name": "m", "upstreams": [
        {"url": "http://127.0.0.1:9001", "max_concurrency": 1}, {"url": "http://127.0.0.1:9002"}]}]}))
    group = table.resolve("m")
    first, second = group.upstreams
    assert {u.url for u in group.candidates(RouteContext())} == {first.url, second.url}
    first.in_flight = 1  # at its limit
    assert group.candidates(RouteContext()) == [second]
    first.in_flight = 0
    for make_unavailable, undo in ((lambda: setattr(second, "draining", True), lambda: setattr(second, "draining", False)),
                                   (lambda: setattr(second, "healthy", False), lambda: setattr(second, "healthy", True))):
        make_unavailable()
        assert group.candidates(RouteContext()) == [first]
        undo()
    for _ in range(table.config.breaker.consecutive_failures):
        second.breaker.on_failure()
    assert group.candidates(RouteContext()) == [first]


def test_the_retry_budget_is_a_share_of_recent_requests_plus_a_floor() -> None:
    table = _table(_config(retries={"budget_ratio": 0.5, "min_retries_per_s": 0.1}))
    budget = table.retry_budget
    # The floor: 0.1 retries/s over the 10 s window is one retry with no requests at all.
    assert budget.try_spend() and not budget.try_spend()
    for _ in range(10):
        budget.on_request()
    assert sum(budget.try_spend() for _ in range(20)) == 5  # half of 10 requests, plus the floor, minus the one spent


def test_scraped_load_counts_other_clients_requests_and_kv_usage_once() -> None:
    page = "\n".join(["# HELP pagoda:num_requests_running x", 'pagoda:num_requests_running{model_name="m"} 3.0',
                      'pagoda:num_requests_waiting{model_name="m"} 2.0', 'pagoda:kv_cache_usage_perc{model_name="m"} 0.5',
                      "other_metric 9"])
    assert scrape_load(page) == (5.0, 0.5) and scrape_load("nothing 1") == (None, None)
    upstream = Upstream(parse_config({"discover": [{"url": "http://a"}]}).discover[0],
                        CircuitBreaker(BreakerConfig()), "m", "m")
    upstream.in_flight = 4  # four of the replica's five are this gateway's own
    upstream.observe_replica(5.0, 0.5)
    assert upstream.load() == 5.0 and upstream.kv_usage == 0.5
    upstream.in_flight = 1
    assert upstream.load() == 2.0  # live: the other client's one plus ours


def test_prefix_owner_with_a_nearly_full_kv_cache_is_skipped() -> None:
    policy = PrefixAware(PrefixConfig(max_kv_usage=0.9))
    config = parse_config({"discover": [{"url": "http://a"}, {"url": "http://b"}]})
    a, b = (Upstream(u, CircuitBreaker(BreakerConfig()), "m", "m") for u in config.discover)
    ctx = RouteContext(prefix_hashes=prefix_hashes("x" * 1024, PrefixConfig()))
    policy.routed(b, ctx)
    assert policy.order([a, b], ctx)[0] is b
    b.observe_replica(0.0, 0.95)
    assert policy.order([a, b], ctx)[0] is a


def test_local_replicas_share_the_cores(monkeypatch) -> None:
    from pagoda.gateway.cli import replica_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert replica_env(2)["OMP_NUM_THREADS"] == "4" and replica_env(3)["OMP_NUM_THREADS"] == "2"
    assert replica_env(16)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert replica_env(2)["OMP_NUM_THREADS"] == "3"
