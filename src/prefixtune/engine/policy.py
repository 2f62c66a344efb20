"""The batching policy: decides which requests join, which leave and how many prompt tokens each step runs.

Each iteration the engine asks `schedule(waiting, running)` and gets a plain Schedule back, then
`chunks(pending, budget, decoding)` fills in the step's prefill work. A request is a
*group* of rows: one row, two for a guided request (its adapter row and the unconditioned companion,
engine/guidance.py), or num_beams for a beam request (engine/sampler.py), admitted together, released
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
AUTO = "auto"
# The server's per-step token budget (decode rows + prefill tokens) by device. CPU: measured with `prefixtune bench
# prefill` (docs/BENCHMARKS.md): 8 SmolLM2 streams and a 1500-token prompt joining. CUDA: vLLM's default for
# chunked prefill (not measured here: a GPU prefills thousands of tokens in the time of a decode step).
STEP_TOKENS = {"cpu": 24, "cuda": 2048}


def step_tokens(setting: int | str | None, device_type: str) -> int | None:
    """The budget a setting means on a device: "auto" = STEP_TOKENS, None or 0 = prompts join whole."""
    if setting == AUTO:
        return STEP_TOKENS.get(device_type, STEP_TOKENS["cuda"])
    if setting is not None and (not isinstance(setting, int) or isinstance(setting, bool)):
        raise ValueError(f"max_step_tokens must be an integer >= 2, 0 (prompts join whole) or {AUTO!r}; got "
                         f"{setting!r}")
    if setting is not None and (setting == 1 or setting < 0):
        raise ValueError("max_step_tokens must be >= 2 (or 0: prompts join whole)")
    return setting or None


def rows_of(request) -> int:
    """Batch rows a request occupies: 2 for a guided one (adapter + unconditioned row), num_beams for beams,
    parts + negatives for a composed product of experts (engine/compose.py)."""
    if request.experts is not None:
        return request.experts.rows
    return 2 if request.params.guided else request.params.num_beams


def prefill_rows(request) -> int:
    """Rows that run the prompt: all of a guided or composed group's, one of a beam group (the beams copy it)."""
    return rows_of(request) if request.experts is not None or request.params.guided else 1


@dataclass
class Schedule:
    """What the engine does this iteration, in this order: release, admit, one decode step of the running rows
    and the prefill chunks, then one sampling of every row whose logits are fresh."""

    release: list = field(default_factory=list)  # requests leaving (cancelled or stopped)
    admit: list = field(default_factory=list)  # waiting requests joining (their rows start prefilling)
    prefill: list = field(default_factory=list)  # (request, prompt tokens) run this step, in the runner's order

    def __bool__(self) -> bool:
        return bool(self.release or self.admit or self.prefill)


def chunks(pending: Sequence[tuple[object, int, int]], budget: int | None, decoding: int) -> list[tuple[object, int]]:
    """This step's prefill work: (request, tokens) from `pending` (request, rows, prompt tokens left), in order.

    The step's token budget counts every decoding row as one token and each prefilled token once per row; what
    is left goes to the joining prompts in order (vLLM's chunked prefill), so a long prompt joins over several
    steps while the running rows keep producing a token each step. The rows of a request advance together (a
    guided pair's rows finish their prompts in the same step). At least half the budget goes to prefill, so
    joining never starves behind a full batch. No budget (None), or no row decoding, runs every prompt whole:
    nothing is waiting on the step then.
    """
    if budget is None or decoding == 0:
        return [(request, left) for request, _, left in pending if left > 0]
    room = max(budget - decoding, budget // 2)
    plan = []
    for request, rows, left in pending:
        take = min(left, room // max(rows, 1))
        if take <= 0:
            break
        plan.append((request, take))
        room -= take * rows
    return plan


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
