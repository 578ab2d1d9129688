"""Shares of a rate-limit window: a gateway reserves, in one Redis script call, room for the next second's
requests of a key (its scopes: the key's window and its tenant's), and admits them here without a round trip.

Exact by construction: a share's requests, tokens and concurrency slots are counted in Redis from the moment it
is granted, so the scopes never admit more than their limits across all gateways; the reserved requests are
logged at the share's end time (the latest a request of the share can come), so they stay in the window at
least as long as the requests themselves would. What a share costs is room held back: it is granted only while
its scopes stay at least ROOM_LEFT of each limit below it and it is at most MAX_FRACTION of any limit (a key near
its limit, or a small limit, is decided request by request), and its unused part is given back when it closes
(at its end, spent, or replaced by the next share).

Redis names a share's parts by its id: request slots "<id>.<j>:<tokens>" in the window's log (slot 1 carries the
tokens), concurrency slots "<id>.c<j>" among the leases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagoda.gateway.policy.store import Ended, Scope, ScopeState, Verdict

SHARE_S = 1.0  # how long a share admits
MIN_REQUESTS = 16  # the smallest share asked for
MIN_DEMAND = 8  # admissions in this SHARE_S and the last before a key's scopes are worth a share
ROOM_LEFT = 0.25  # of each limit, left unreserved after a share is granted
MAX_FRACTION = 0.05  # of each limit, the most one share may take
MAX_BOOKED = 100_000  # key scopes whose demand is remembered


@dataclass(frozen=True)
class ShareAsk:
    requests: int
    tokens: int
    concurrency: int  # 0 when no scope limits concurrency


@dataclass
class Share:
    share_id: str
    scopes: list[Scope]
    ask: ShareAsk
    until: float  # wall time: it admits nothing after
    states: list[ScopeState]  # its scopes' windows when granted (the reservation counted)
    used: int = 0  # requests admitted from it
    charged: int = 0  # their tokens: what the ended ones used, the estimate of those in flight
    in_flight: int = 0
    closed_charge: int | None = None  # slot 1's charge in Redis once closed

    def admits(self, cost: int, now: float) -> bool:
        if self.closed_charge is not None or now >= self.until or self.used >= self.ask.requests:
            return False
        if self.ask.concurrency and self.in_flight >= self.ask.concurrency:
            return False
        return self.charged + cost <= self.ask.tokens

    def view(self) -> list[ScopeState]:
        """Its scopes' windows as of the grant, with this gateway's use of the share since in place of the
        reservation (what the rate-limit headers say)."""
        return [ScopeState(s.requests - self.ask.requests + self.used, s.tokens - self.ask.tokens + self.charged,
                           s.in_flight - self.ask.concurrency + self.in_flight, s.requests_reset_s, s.tokens_reset_s)
                for s in self.states]


@dataclass(frozen=True)
class Withdrawal:
    """A share closed: its request slots from ``used + 1`` on leave the log, and slot 1's tokens go from the
    reservation to what is charged now (all of it when none was used)."""

    share_id: str
    scopes: list[Scope]
    used: int
    reserved: int
    reserved_tokens: int
    charged: int


@dataclass
class _Demand:
    """A key's admissions, and the most of its share's requests in flight at once, in the current and the last
    SHARE_S: what its next share is sized by."""

    period: int = 0
    count: int = 0
    last_count: int = 0
    tokens: int = 0
    peak: int = 0
    last_peak: int = 0

    def add(self, cost: int, now: float) -> None:
        self._turn(now)
        self.count += 1
        self.tokens += cost

    def in_flight(self, count: int, now: float) -> None:
        self._turn(now)
        self.peak = max(self.peak, count)

    def _turn(self, now: float) -> None:
        period = int(now // SHARE_S)
        if period != self.period:
            follows = period == self.period + 1
            self.last_count, self.last_peak = (self.count, self.peak) if follows else (0, 0)
            self.period, self.count, self.tokens, self.peak = period, 0, 0, 0

    def ask(self, scopes: list[Scope]) -> ShareAsk | None:
        """Twice the recent demand, each part at most MAX_FRACTION of its scopes' limits; None when that leaves
        less than MIN_REQUESTS requests, a request's tokens or a concurrency slot."""
        requests = max(MIN_REQUESTS, 2 * max(self.count, self.last_count))
        per_request = math.ceil(self.tokens / max(self.count, 1))
        concurrent = any(s.limits.max_concurrency is not None for s in scopes)
        concurrency = max(4, 2 * max(self.peak, self.last_peak)) if concurrent else 0
        for scope in scopes:
            rpm, tpm, most = scope.limits.rpm, scope.limits.tpm, scope.limits.max_concurrency
            if rpm is not None:
                requests = min(requests, int(MAX_FRACTION * rpm))
            if tpm is not None:
                requests = min(requests, int(MAX_FRACTION * tpm) // max(per_request, 1))
            if most is not None:
                concurrency = min(concurrency, int(MAX_FRACTION * most))
        if requests < MIN_REQUESTS or (concurrent and concurrency < 1):
            return None
        return ShareAsk(requests, requests * per_request, concurrency)


@dataclass
class ShareBook:
    """This gateway's shares: the open one per key (its tuple of scope names), the closed ones with requests
    in flight, and what Redis must be told of them (sent with the store's next script call)."""

    open: dict[tuple[str, ...], Share] = field(default_factory=dict)
    by_request: dict[str, Share] = field(default_factory=dict)
    demand: dict[tuple[str, ...], _Demand] = field(default_factory=dict)
    asking: set[tuple[str, ...]] = field(default_factory=set)
    declined_until: dict[tuple[str, ...], float] = field(default_factory=dict)
    withdrawals: list[Withdrawal] = field(default_factory=list)
    releases: list[Ended] = field(default_factory=list)  # slot 1's final charge, the concurrency slots

    def admit(self, request_id: str, scopes: list[Scope], cost: int, now: float) -> Verdict | None:
        """Admitted from the key's open share, or None (the store decides)."""
        share = self.open.get(_names(scopes))
        if share is None or not share.admits(cost, now):
            return None
        share.used += 1
        share.charged += cost
        share.in_flight += 1
        self.by_request[request_id] = share
        demand = self.demand.get(_names(scopes))
        if demand is not None:
            demand.in_flight(share.in_flight, now)
        return Verdict(True, share.view())

    def note(self, scopes: list[Scope], cost: int, now: float) -> ShareAsk | None:
        """Count an admission; the share to ask for when the key's demand is worth one and its open share (if
        any) is half spent or half over."""
        names = _names(scopes)
        demand = self.demand.get(names)
        if demand is None:
            if len(self.demand) > MAX_BOOKED:
                self.demand.clear()
                self.declined_until.clear()
            demand = self.demand[names] = _Demand()
        demand.add(cost, now)
        if names in self.asking or self.declined_until.get(names, 0.0) > now:
            return None
        if demand.count + demand.last_count < MIN_DEMAND:  # this second's and the last's
            return None
        share = self.open.get(names)
        if share is not None and share.until - now > SHARE_S / 2 and share.used * 2 < share.ask.requests \
                and share.charged * 2 < share.ask.tokens:
            return None
        ask = demand.ask(scopes)
        if ask is None:  # the limits are too small for a share worth having
            self.declined_until[names] = now + SHARE_S
            return None
        self.asking.add(names)
        return ask

    def open_share(self, scopes: list[Scope]) -> Share | None:
        return self.open.get(_names(scopes))

    def granted(self, share: Share, previous: Share | None) -> None:
        """A share replaces the key's open one. ``previous``: the share that was open when the grant's call
        left (its reservation still whole in the grant's numbers, even if it closed since): it is closed, and
        the new share's view counts what it used instead."""
        names = _names(share.scopes)
        self.asking.discard(names)
        current = self.open.get(names)
        if current is not None:
            self.close(current)
        if previous is not None:
            self.close(previous)
            assert previous.closed_charge is not None
            unused_requests = previous.ask.requests - previous.used
            unused_tokens = previous.ask.tokens - previous.closed_charge
            share.states = [ScopeState(s.requests - unused_requests, s.tokens - unused_tokens, s.in_flight,
                                       s.requests_reset_s, s.tokens_reset_s) for s in share.states]
        self.open[names] = share

    def declined(self, scopes: list[Scope], now: float) -> None:
        names = _names(scopes)
        self.asking.discard(names)
        self.declined_until[names] = now + SHARE_S

    def close(self, share: Share) -> None:
        """No more admissions from it: its unused requests, tokens and concurrency slots are given back (the
        slots in use as their requests end, slot 1's final charge after the last)."""
        if share.closed_charge is not None:
            return
        names = _names(share.scopes)
        if self.open.get(names) is share:
            del self.open[names]
        self.withdrawals.append(Withdrawal(share.share_id, share.scopes, share.used, share.ask.requests,
                                           share.ask.tokens, share.charged))
        share.closed_charge = share.charged
        self._release_slots(share, range(share.in_flight + 1, share.ask.concurrency + 1))
        if share.in_flight == 0:
            self._release(share)

    def end(self, ended: Ended) -> bool:
        """Settle a request admitted from a share (False: not one of theirs)."""
        share = self.by_request.pop(ended.request_id, None)
        if share is None:
            return False
        share.in_flight -= 1
        if ended.tokens is not None:
            share.charged += ended.tokens - ended.charged
        if share.closed_charge is not None:
            if share.in_flight < share.ask.concurrency:
                self._release_slots(share, [share.in_flight + 1])
            if share.in_flight == 0:
                self._release(share)
        return True

    def _release_slots(self, share: Share, slots: Iterable[int]) -> None:
        self.releases += [Ended(f"{share.share_id}.c{j}", share.scopes, 0, None) for j in slots]

    def _release(self, share: Share) -> None:
        """Its last request ended: slot 1 charged what its requests used."""
        assert share.closed_charge is not None
        if share.used and share.charged != share.closed_charge:
            self.releases.append(Ended(f"{share.share_id}.1", share.scopes, share.closed_charge, share.charged))

    @property
    def pending(self) -> bool:
        return bool(self.withdrawals or self.releases)

    def close_all(self) -> None:
        for share in list(self.open.values()):
            self.close(share)

    def take_pending(self) -> tuple[list[Withdrawal], list[Ended]]:
        withdrawals, releases = self.withdrawals, self.releases
        self.withdrawals, self.releases = [], []
        return withdrawals, releases


def _names(scopes: list[Scope]) -> tuple[str, ...]:
    return tuple(s.name for s in scopes)
