"""The decode forward compiled with torch.compile (inductor: C++ on a CPU, CUDA graphs on a GPU).

The runner's decode step is one forward of every running row over the static per-slot KV (engine/slots.py), so
its shapes are (rows, 1) tokens and a (rows, 1, 1, width) mask. The runner asks `shape(rows, width)` for the
shape to run: on a GPU (`mode="reduce-overhead"`, one CUDA graph per shape) the rows are padded up to a bucket
(1, 2, 4, ..., max_rows) and the width to a power of two (at least 64), so a few graphs serve every step; the
padded rows sit in spare slots, write their key at column 0 and attend only to it, and their logits are dropped.
On a CPU inductor compiles one graph with symbolic sizes (`dynamic=True`), so nothing is padded: a padded row
costs a whole row of compute there and buys nothing.

Compiling takes seconds to minutes (measured in docs/BENCHMARKS.md), so `warm_up` compiles before the first
request and reports the time. A compile that fails, at warm-up or on a later shape, turns the compiled step off
for good with one message, and that step reruns eagerly: the cache writes are the same either way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import torch._dynamo

from prefixtune.engine.runner import ModelRunner, logits_width

MIN_WIDTH = 64  # smallest width bucket (columns)


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, ... below max_rows, then max_rows itself."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return out + [max_rows]


def width_bucket(width: int) -> int:
    """The smallest power of two >= width, at least MIN_WIDTH."""
    w = MIN_WIDTH
    while w < width:
        w *= 2
    return w


class CompiledDecode:
    """One per model: every runner of the model (a Scheduler per offline call) shares its compiled graphs."""

    def __init__(self, model, max_rows: int, buckets: bool | None = None, say: Callable[[str], None] | None = None):
        self.model, self.max_rows = model, max_rows
        device = next(model.parameters()).device
        self.buckets = device.type == "cuda" if buckets is None else buckets  # static shapes (CUDA graphs)
        self._batch = batch_buckets(max_rows)
        mode = "reduce-overhead" if device.type == "cuda" else None
        # Static shapes on a GPU (a CUDA graph per shape); each bucket and width compiles once, so the recompile
        # limit must cover them all, or dynamo would silently fall back to eager past the 8th.
        if self.buckets:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(self._batch))
        # The base model is frozen, so inductor may fold its weights into the graph (freezing): on a CPU it then
        # prepacks them for oneDNN (measured: 1.43x eager per decode step, vs 1.03x without, tiny model, batch 16).
        # Dynamo's guards on the model stay: they are what tells two models' graphs apart in one process (the
        # compiled code is cached on `_forward`'s code object, shared by every CompiledDecode).
        options = {"freezing": True} if device.type == "cpu" else None
        self._fn = torch.compile(self._forward, mode=mode, dynamic=not self.buckets, options=options)
        self.reuses_outputs = mode == "reduce-overhead"  # a CUDA graph's replay overwrites its last output
        self.failed: str | None = None  # why the compiled step was turned off
        self.compile_s = 0.0  # seconds spent in warm_up
        self._say = say or (lambda message: print(message, file=sys.stderr))

    def _forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs).logits[:, -1]  # (B, V)

    def shape(self, rows: int, width: int) -> tuple[int, int]:
        """(rows, width) the compiled step runs for `rows` running rows attending `width` columns."""
        if not self.buckets or self.failed:
            return rows, width
        # More rows than max_rows (an offline call's whole batch): their own shape, one more graph.
        return next((b for b in self._batch if b >= rows), rows), width_bucket(width)

    def __call__(self, **inputs) -> torch.Tensor:
        """Last-token logits (B, V) of the decode forward; eager once compiling has failed."""
        if self.failed is None:
            try:
                return self._fn(**inputs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: serve eagerly instead of failing rows
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self._say(f"prefixtune: the compiled decode step failed ({self.failed}); decoding eagerly from now "
                          "on. Fix: upgrade torch or drop --compile")
        return self._forward(**inputs)

    def warm_up(self, runner_factory: Callable[[], object], rows: list[int] | None = None) -> float:
        """Compile before the first request: decode a few steps on a throwaway runner at each warm-up batch size
        (every bucket with static shapes; 1 and 2 rows at two widths otherwise, where a symbolic graph gets its
        sizes). Returns the seconds it took."""
        start = time.perf_counter()
        # A symbolic graph still specialises a size of 1: one row (a lone request) needs its own graph.
        sizes = rows or (self._batch if self.buckets else sorted({1, min(2, self.max_rows)}))
        for b in sizes:
            runner = runner_factory()
            runner.compiled = self
            for i in range(b):
                runner.running.append(("warm-up", i), None, 2 * MIN_WIDTH + 2)
            vocab = logits_width(self.model)
            runner.running.set_logits(0, torch.zeros(vocab, device=runner.device))
            for length in (1, MIN_WIDTH + 1):  # two widths: the second is another bucket (or a new size)
                runner.running.lengths = [length] * b
                runner.running.ensure(length + 1)
                runner.decode([0] * b)
                if self.failed:
                    break
            runner.clear()
        self.compile_s = time.perf_counter() - start
        return self.compile_s


def compile_decode(lm, max_rows: int, say: Callable[[str], None] | None = None) -> CompiledDecode:
    """Give `lm` (a PrefixLM) a compiled decode step, warmed up; every Scheduler over it then uses the step."""
    say = say or (lambda message: print(message, file=sys.stderr))
    compiled = CompiledDecode(lm.model, max_rows, say=say)
    seconds = compiled.warm_up(lambda: ModelRunner(lm.model, max_rows))
    lm.compiled_decode = None if compiled.failed else compiled
    if not compiled.failed:
        say(f"prefixtune: compiled the decode step in {seconds:.1f} s "
            f"({'CUDA graphs, ' + str(len(compiled._batch)) + ' batch buckets' if compiled.buckets else 'inductor'})")
    return compiled
