"""How many of each request's draft tokens a step verifies (speculative decoding, adaptive to load).

A verified draft costs one more row in the target step and pays only when it is accepted. With a step that
costs ``a + b * rows`` seconds (fitted to the measured times of decode steps) and a request whose drafts are
each accepted with probability ``alpha`` (measured per request, starting from the engine-wide rate), the
j-th draft adds ``alpha ** j`` expected tokens for ``b`` seconds. Drafts are taken, best first, while they
raise the step's expected tokens per second: at batch 1, where a step is mostly reading weights, most are;
in a large batch, where each row costs nearly its share, only requests that are very often right keep any,
and none when verification would cost more than it saves.

A draft model also costs its own forwards, one per draft depth over every request still drafting, timed apart
by the worker and fitted the same way (``fixed + per_token * tokens``). That cost is spent when drafts are
proposed, so it decides how deep the next proposal goes (``draft_limit``: the depth whose expected tokens per
second, target and draft steps together, are highest, 0 when no depth beats decoding alone), while ``trim``
weighs only the verification rows. When every step verifies as many rows (drafts always kept), the fit cannot
tell a row's cost from the step's: one step in ``EXPLORE_EVERY`` then verifies no drafts, which measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.config import MAX_SPECULATIVE_TOKENS
from pagoda.engine.core.request import Request

PRIOR_ACCEPTANCE = 0.7  # before any draft was verified
PRIOR_WEIGHT = 2.0  # drafts' worth of evidence the engine-wide rate counts for in a request's own rate
# Before decode steps of different sizes were timed: one more row costs this fraction of a step's fixed cost.
PRIOR_ROW_COST = 0.1
DECAY = 0.98  # weight of the older step timings at each new one (about the last 50 steps count)
MIN_STEPS = 8  # timed decode steps before the fitted costs are trusted
EXPLORE_EVERY = 16  # while the row cost is a guess, one step in this many verifies no drafts


@dataclass
class StepCost:
    """Seconds per decode step as ``fixed + per_row * rows``, by exponentially weighted least squares."""

    fixed: float = 0.0
    per_row: float = 0.0
    steps: int = 0
    slope_measured: bool = False  # steps of different sizes were seen (else per_row is the prior's)
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # weight, x, y, xx, xy

    def observe(self, rows: int, seconds: float) -> None:
        s = self._sums
        for i, value in enumerate((1.0, rows, seconds, rows * rows, rows * seconds)):
            s[i] = s[i] * DECAY + value
        self.steps += 1
        w, x, y, xx, xy = s
        mean_x, mean_y = x / w, y / w
        spread = xx / w - mean_x * mean_x
        self.slope_measured = spread > 0.05
        if self.slope_measured:
            self.per_row = max(0.0, (xy / w - mean_x * mean_y) / spread)
        elif self.per_row == 0.0:
            self.per_row = PRIOR_ROW_COST * mean_y / (1 + PRIOR_ROW_COST * mean_x)
        self.fixed = max(0.0, mean_y - self.per_row * mean_x)


@dataclass
class DraftPolicy:
    adaptive: bool
    max_drafts: int = MAX_SPECULATIVE_TOKENS  # num_speculative_tokens
    cost: StepCost = field(default_factory=StepCost)  # the target's decode steps, draft forwards left out
    draft_cost: StepCost = field(default_factory=StepCost)  # the draft model's forwards (none by prompt lookup)
    steps_since_exploring: int = 0
    num_drafts: int = 0  # requests' steps that verified drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_rejections: int = 0  # steps whose drafts were not all kept (each ends at one rejected draft)
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, req: Request, proposed: int, accepted: int) -> None:
        """A step verified ``proposed`` drafts of ``req`` and kept the first ``accepted``."""
        rejected = int(accepted < proposed)
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        self.num_rejections += rejected
        req.num_accepted_drafts += accepted
        req.num_rejected_drafts += rejected
        while len(self.accepted_per_position) < proposed:
            self.accepted_per_position.append(0)
        for j in range(accepted):
            self.accepted_per_position[j] += 1

    def observe_step(self, rows: int, seconds: float, draft_forwards: list[tuple[int, float]] = ()) -> None:
        """A timed decode step (no prompt tokens) of ``rows`` rows, which ran ``draft_forwards`` (tokens,
        seconds) of a draft model within its ``seconds``."""
        for tokens, spent in draft_forwards:
            self.draft_cost.observe(tokens, spent)
            seconds -= spent
        self.cost.observe(rows, seconds)

    def acceptance(self, req: Request) -> float:
        """The chance each next draft of ``req`` is kept (the geometric rate: kept / (kept + rejections))."""
        seen = self.num_accepted_tokens + self.num_rejections
        prior = self.num_accepted_tokens / seen if seen else PRIOR_ACCEPTANCE
        return ((req.num_accepted_drafts + PRIOR_WEIGHT * prior)
                / (req.num_accepted_drafts + req.num_rejected_drafts + PRIOR_WEIGHT))

    def draft_limit(self, running: list[Request]) -> int | None:
        """The most drafts worth proposing for the next step (None: no limit): those that would pay at this
        batch size for the request whose drafts are kept most often. At a large batch on a CPU: none, and the
        proposers are not even run."""
        if not self.adaptive or self.cost.steps < MIN_STEPS or not running:
            return None
        if self.draft_cost.steps:
            return self._best_depth(running)
        alpha = max(self.acceptance(r) for r in running)
        seconds = self.cost.fixed + self.cost.per_row * len(running)
        limit, gain = 0, alpha
        while limit < MAX_SPECULATIVE_TOKENS and gain * seconds > self.cost.per_row * len(running):
            limit += 1
            gain *= alpha
        return limit

    def _best_depth(self, running: list[Request]) -> int:
        """With a draft model: the proposal depth with the most expected tokens per second of target and
        draft steps, every speculating request drafting that deep."""
        batch = len(running)
        rates = [self.acceptance(r) for r in running if r.sampling_params.speculative_decoding]
        target, draft = self.cost, self.draft_cost
        gains = [1.0] * len(rates)
        best, best_rate, tokens = 0, batch / (target.fixed + target.per_row * batch), float(batch)
        for depth in range(1, self.max_drafts + 1):
            gains = [g * a for g, a in zip(gains, rates)]
            tokens += sum(gains)
            seconds = (target.fixed + target.per_row * (batch + depth * len(rates))
                       + depth * (draft.fixed + draft.per_row * len(rates)))
            if tokens / seconds > best_rate:
                best, best_rate = depth, tokens / seconds
        return best

    def trim(self, running: list[Request]) -> None:
        """Cut each running request's drafts to those worth verifying in the next step."""
        if not self.adaptive or self.cost.steps < MIN_STEPS:
            return
        drafted = [r for r in running if r.spec_token_ids]
        if not drafted:
            return
        self.steps_since_exploring += 1
        if not self.cost.slope_measured and self.steps_since_exploring >= EXPLORE_EVERY:
            self.steps_since_exploring = 0
            for req in drafted:
                req.spec_token_ids = []
            return
        fixed, per_row = self.cost.fixed, self.cost.per_row
        tokens = float(len(running))  # expected tokens of the step: one per request before any draft
        seconds = fixed + per_row * len(running)
        gains: list[tuple[float, int, int]] = []  # (expected tokens, request index, drafts kept with it)
        for index, req in enumerate(drafted):
            alpha, gain = self.acceptance(req), 1.0
            for j in range(1, len(req.spec_token_ids) + 1):
                gain *= alpha
                gains.append((gain, index, j))
        gains.sort(key=lambda g: -g[0])  # a request's gains fall with j: its drafts are taken in order
        keep = [0] * len(drafted)
        for gain, index, j in gains:
            if gain * seconds <= per_row * tokens:  # the rate would fall: so would every smaller gain's
                break
            keep[index] = j
            tokens += gain
            seconds += per_row
        for req, kept in zip(drafted, keep):
            if kept < len(req.spec_token_ids):
                del req.spec_token_ids[kept:]
