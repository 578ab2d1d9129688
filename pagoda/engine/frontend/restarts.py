"""How often the front end may start the engine core again: at most a given number of restarts within a
sliding window, with a growing pause before each."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

RESTART_WINDOW_S = 600.0
RESTART_BACKOFF_S = (0.5, 2.0, 8.0)  # before the 1st, 2nd, 3rd+ restart within the window


@dataclass
class RestartBudget:
    limit: int  # restarts allowed within RESTART_WINDOW_S
    total: int = 0  # restarts ever made
    _times: list[float] = field(default_factory=list)

    def recent(self) -> int:
        """Restarts within the window ending now."""
        now = time.monotonic()
        self._times = [t for t in self._times if now - t < RESTART_WINDOW_S]
        return len(self._times)

    def backoff_s(self) -> float:
        return RESTART_BACKOFF_S[min(self.recent(), len(RESTART_BACKOFF_S) - 1)]

    def record(self) -> None:
        self._times.append(time.monotonic())
        self.total += 1
