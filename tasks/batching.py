"""How many calls go into one message: guided self-scheduling with a cost floor.

Each batch takes ``remaining / (2 * processes)`` of the calls not yet sent, so
batches start large (little per-message overhead) and shrink towards the end
(every process finishes at about the same time: no straggling batch). Once the
cost per call has been measured on the workers, batches are never made so
small that messaging would dominate, nor so long that progress stalls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class BatchSizer:
    min_seconds: float = 0.02
    """A batch should run at least this long once the cost per call is known."""
    max_seconds: float = 2.0
    """...and at most this long, so results and progress keep flowing."""
    smoothing: float = 0.3
    """Weight of the newest measurement in the running cost estimate."""
    _cost: dict[object, float] = field(default_factory=dict)

    def size(self, remaining: int, processes: int, key: object = None) -> int:
        """Calls to put in the next batch, out of ``remaining`` unsent ones."""
        if remaining <= 0:
            return 0
        guided = math.ceil(remaining / (2 * max(1, processes)))
        cost = self._cost.get(key)
        if cost is not None:
            per_second = 1.0 / max(cost, 1e-9)
            floor = math.ceil(self.min_seconds * per_second)
            ceiling = max(1, math.floor(self.max_seconds * per_second))
            guided = min(max(guided, floor), ceiling)
        return max(1, min(guided, remaining))

    def observe(self, key: object, calls: int, seconds: float) -> None:
        """Fold a batch's measured run time into the cost estimate for ``key``."""
        if calls <= 0:
            return
        cost = seconds / calls
        old = self._cost.get(key)
        self._cost[key] = cost if old is None else old + self.smoothing * (cost - old)

    def cost(self, key: object = None) -> float | None:
        """Estimated seconds per call for ``key``, once measured."""
        return self._cost.get(key)
