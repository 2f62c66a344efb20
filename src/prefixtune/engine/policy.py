"""The batching policy: decides which requests join and which leave; runs nothing.

Each iteration the engine asks `schedule(waiting, running)` and gets a plain Schedule back. A request is a
*group* of rows: one row, two for a guided request (its adapter row and the unconditioned companion,
engine/guidance.py), or num_beams for a beam request (engine/beam_group.py), admitted together, released
together, counted as one request.

`continuous`: between two decode steps, finished or cancelled requests leave and waiting ones fill the free
rows in arrival order (a group that does not fit waits: no overtaking, so no starvation).
`grouped`: one adapter's requests batched and run to completion before the next (kept as the benchmark's
baseline for what continuous batching buys).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MODES = ("continuous", "grouped")


def rows_of(request) -> int:
    """Batch rows a request occupies: 2 for a guided one (adapter + unconditioned row), num_beams for beams."""
    return 2 if request.params.guided else request.params.num_beams


@dataclass
class Schedule:
    """What the engine does this iteration, in this order: release, admit, then one decode step."""

    release: list = field(default_factory=list)  # running requests leaving (their finish is already known)
    admit: list = field(default_factory=list)  # waiting requests joining (prefilled together)

    def __bool__(self) -> bool:
        return bool(self.release or self.admit)


class BatchPolicy:
    def __init__(self, max_batch: int, mode: str = "continuous"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.max_batch, self.mode = max_batch, mode

    def schedule(self, waiting: Sequence, running: Sequence) -> Schedule:
        """`running` requests carry `cancelled` / `stopped` flags set by other threads; read once here."""
        release = [r for r in running if r.cancelled or r.stopped]
        staying = [r for r in running if not (r.cancelled or r.stopped)]
        room = self.max_batch - sum(rows_of(r) for r in staying)
        admit = []
        if self.mode == "grouped":
            if not staying and waiting:
                adapter = waiting[0].adapter
                for r in waiting:
                    if r.adapter == adapter and rows_of(r) <= room:
                        admit.append(r)
                        room -= rows_of(r)
        else:
            for r in waiting:
                if rows_of(r) > room:
                    break
                admit.append(r)
                room -= rows_of(r)
        return Schedule(release, admit)
