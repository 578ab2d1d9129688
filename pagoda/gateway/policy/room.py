"""What this gateway last heard of each rate-limit window's use: whether a request may be forwarded while the
store still decides its admission (the guard holds its answer until then).

Overlapping the two hides the store's round trip. What it risks is a refusal after the upstream started the
request (which is then closed, costing the upstream a cancelled request), so it is done only while a window
had ample room when last heard of: then a refusal means other gateways used that room in the meantime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.gateway.policy.store import Scope, ScopeState

# A window has ample room while this share of each of its limits was left when last heard of, and at least
# AMPLE_REQUESTS requests (and as many times the request's estimated tokens).
AMPLE_SHARE = 0.25
AMPLE_REQUESTS = 8
FRESH_S = 5.0  # what was heard longer ago is not trusted
MAX_WINDOWS = 100_000  # windows remembered (keys made through the API cannot grow this without end)


@dataclass
class RoomSeen:
    heard: dict[str, tuple[ScopeState, float]] = field(default_factory=dict)  # by scope name: state, when

    def hear(self, scopes: list[Scope], states: list[ScopeState], now: float) -> None:
        if len(self.heard) > MAX_WINDOWS:
            self.heard.clear()
        for scope, state in zip(scopes, states):
            self.heard[scope.name] = (state, now)

    def forget(self) -> None:
        """The store went away: nothing heard before holds."""
        self.heard.clear()

    def ample(self, scopes: list[Scope], estimate: int, now: float) -> bool:
        return all(self._ample(scope, estimate, now) for scope in scopes)

    def _ample(self, scope: Scope, estimate: int, now: float) -> bool:
        heard = self.heard.get(scope.name)
        if heard is None or now - heard[1] > FRESH_S:
            return False
        state, limits = heard[0], scope.limits
        for limit, used, need in ((limits.rpm, state.requests, AMPLE_REQUESTS),
                                  (limits.tpm, state.tokens, AMPLE_REQUESTS * estimate),
                                  (limits.max_concurrency, state.in_flight, AMPLE_REQUESTS)):
            if limit is not None and limit - used < max(need, AMPLE_SHARE * limit):
                return False
        return True
