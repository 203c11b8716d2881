"""Where does the time go? `profile()` times every op's forward and backward, by op.

    with tensorlite.profiler.profile() as prof:
        loss = model(x, y)[1]; loss.backward()
    print(prof.table())

Only the ops' own work is timed (not the Python between them); outside the block the
hooks cost one `is None` check per op.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from . import autograd


class Profile:
    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], list] = {}
        self.wall = 0.0

    def table(self, steps: int = 1) -> str:
        """A text table: op, phase, calls, ms (per step), share of the timed wall clock."""
        rows = sorted(self.stats.items(), key=lambda kv: -kv[1][1])
        lines = [f"{'op':28s} {'phase':8s} {'calls':>6s} {'ms/step':>8s} {'share':>6s}"]
        for (op, phase), (calls, seconds) in rows:
            share = seconds / self.wall if self.wall else 0.0
            lines.append(
                f"{op:28s} {phase:8s} {calls // steps:6d} {1e3 * seconds / steps:8.2f} {share:6.1%}"
            )
        timed = sum(s for _, s in self.stats.values())
        lines.append(
            f"{'ops total':28s} {'':8s} {'':6s} {1e3 * timed / steps:8.2f} "
            f"{timed / self.wall if self.wall else 0:6.1%}"
        )
        lines.append(f"{'wall clock':28s} {'':8s} {'':6s} {1e3 * self.wall / steps:8.2f} {1:6.1%}")
        return "\n".join(lines)


@contextlib.contextmanager
def profile() -> Iterator[Profile]:
    """Collect per-op timings for everything run inside the block."""
    prof = Profile()
    previous = autograd._profile
    autograd._profile = prof.stats
    t0 = time.perf_counter()
    try:
        yield prof
    finally:
        prof.wall = time.perf_counter() - t0
        autograd._profile = previous
