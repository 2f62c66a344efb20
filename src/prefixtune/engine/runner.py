"""Model runner: owns the rows' KV, runs each step's forward passes and samples (vLLM v1's GPUModelRunner).

Two slot stores (engine/slots.py): `running` holds the rows that decode, `staging` the rows whose prompts are
still being prefilled. A row joins staging with its prefix copied into its first columns (the prefix is keys
and values already: no forward pass), its prompt runs in chunks of the scheduler's choosing (chunked prefill),
and when the last chunk has run, the row's columns and logits move to a running slot. Rows with the same prompt,
prefix and LoRA mode admitted together (a request's n choices, a beam group's beams) prefill once: the others
follow the leader and get a copy of its columns (`share_prefill`).

One step (`execute`): the decode forward of every running row (each is fed the token sampled for it last
step), the prefill forward of this step's chunks, then the sampler (engine/sampler.py) over every running row.
A forward that raises fails only the requests whose rows it ran; the runner drops their rows and goes on.

A forward writes each new key/value at its row's own columns (column = position) and attends over a view of
the store's first rows with a 4-D additive mask built here, so rows of any lengths and prefixes share it.
A LoRA model (`lora`, a PeftModel injected into the base) is a runner mode: its rows run with LoRA, and rows
marked `base` (a guided LoRA row's companion) run without it in the same forward (PEFT's adapter_names).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from prefixtune.engine.logprobs import capture_hidden, record_prompt
from prefixtune.engine.sampler import Group, Sampled, Sampler
from prefixtune.engine.slots import SlotKV
from prefixtune.prefix.shapes import prefix_shape

BASE_ROW = "__base__"  # PEFT's adapter name for rows that run without any LoRA adapter
GROW_SLAB = 64  # columns of the running store zeroed per step ahead of a joining long prompt


@dataclass
class _Forward:
    """One forward pass over rows of one store (read by _SlotLayer.update)."""

    store: SlotKV
    rows: torch.Tensor  # (B,) slots of the rows
    columns: torch.Tensor  # (B, T) column each token's key/value is written to (= its position)
    width: int  # columns attended (the longest row after this pass)
    contiguous: bool  # rows are slots 0..B-1: attend over a view, no gather


class _SlotLayer(DynamicLayer):
    def __init__(self, cache: _SlotCache, index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        f = self.cache.current
        keys, values = f.store.keys[self.index], f.store.values[self.index]  # (S, kv_heads, C, head_dim)
        rows = f.rows.view(-1, 1).expand_as(f.columns)  # (B, T)
        keys[rows, :, f.columns] = key_states.transpose(1, 2).to(keys.dtype)  # (B, T, kv_heads, head_dim)
        values[rows, :, f.columns] = value_states.transpose(1, 2).to(values.dtype)  # (B, T, kv_heads, head_dim)
        if f.contiguous:
            b = f.rows.shape[0]
            return keys[:b, :, :f.width], values[:b, :, :f.width]  # (B, kv_heads, W, head_dim) views
        return (keys.index_select(0, f.rows)[:, :, :f.width],  # (B, kv_heads, W, head_dim)
                values.index_select(0, f.rows)[:, :, :f.width])

    def get_seq_length(self) -> int:
        f = self.cache.current
        return f.width - f.columns.shape[1]

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.cache.current.width, 0


class _SlotCache(Cache):
    """The cache one store's forward passes see; `current` is the pass in flight (one per store at a time)."""

    def __init__(self, layers: int):
        super().__init__(layers=[_SlotLayer(self, i) for i in range(layers)])
        self.current: _Forward | None = None


@dataclass(eq=False)
class _Prefill:
    """A staging row: its prompt and how much of it has run."""

    prompt: list[int]
    done: int = 0  # prompt tokens prefilled
    followers: list[Hashable] = field(default_factory=list)  # rows that copy this one when it is done


@dataclass
class StepOutput:
    sampled: Sampled | None = None  # None when no row was sampled this step
    failed: dict[str, str] = field(default_factory=dict)  # request id -> error (its rows are gone)
    decoded: int = 0  # rows in the decode forward
    prefilled: int = 0  # prompt tokens run (counted once per prefilled row)


class ModelRunner:
    """Rows are identified by hashable keys (engine/sampler.row_keys); `running.order[s]` is the key in slot s."""

    def __init__(self, model, max_rows: int, sampler: Sampler | None = None, lora=None, share_prefill: bool = True,
                 compiled=None):
        self.model, self.max_rows, self.lora = model, max_rows, lora
        # The decode forward compiled (engine/compiled.CompiledDecode); PEFT's per-forward LoRA hooks are not.
        self.compiled = compiled if lora is None else None
        self.sampler = sampler or Sampler(set(), lambda: None)
        self.share_prefill = share_prefill  # prefill identical new rows once (off: the benchmark's baseline)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = prefix_shape(model.config)
        self.running = SlotKV(shape, max_rows, self.device, self.dtype)
        self.staging = SlotKV(shape, max_rows, self.device, self.dtype)
        self.prefilling: dict[Hashable, _Prefill] = {}  # staging rows, by key
        self.following: dict[Hashable, Hashable] = {}  # follower -> its leader (both staging)
        self.base: set[Hashable] = set()  # rows run without LoRA
        self.next_tokens: dict[Hashable, int] = {}  # what each running row is fed at the next decode
        self._caches = {id(store): _SlotCache(shape.num_layers) for store in (self.running, self.staging)}
        # On a CPU with a core to spare, the prefill chunk runs on a second thread while the decode step runs:
        # a chunk then costs the running streams max(decode, chunk) per step instead of their sum.
        # Not with LoRA: PEFT routes a mixed batch through hooks it installs on the shared modules per forward.
        self.overlap = self.device.type == "cpu" and (os.cpu_count() or 1) > 1 and lora is None
        self._pool: ThreadPoolExecutor | None = None
        # Sliding-window attention (Mistral, Qwen2 with use_sliding_window, Gemma2/3 layers): the 4-D mask we pass
        # is used as is, so it must carry the window itself; mixed models take one mask per layer type.
        config = model.config
        window = getattr(config, "sliding_window", None)
        self.window = window if isinstance(window, int) and window > 0 else None
        types = set(getattr(config, "layer_types", None) or [])
        self.mixed_layers = self.window is not None and "full_attention" in types and len(types) > 1

    def __len__(self) -> int:
        return len(self.running) + len(self.prefilling) + len(self.following)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.running.order or key in self.prefilling or key in self.following

    # ---- rows join and leave ---------------------------------------------------------------------------
    def admit(self, joining: Sequence[tuple[Group, Sequence[torch.Tensor | None]]]) -> None:
        """Requests admitted together start prefilling; each with one prefix per row (2L, kv_heads, P, head_dim)
        or None. A request identical to an earlier one of the same call (prompt, prefix tensors, kind) follows
        it row by row, and a beam group's beams follow beam 0, so shared rows finish their prompts together."""
        first: dict[tuple, Group] = {}
        for group, prefixes in joining:
            request, keys = group.request, group.keys
            guided = request.params.guided
            for i, key in enumerate(keys):
                if self.lora is not None and guided and i == 1:
                    self.base.add(key)  # a guided LoRA row's companion is the base model
            runs = group.prefill_keys
            sig = (tuple(request.prompt_ids), tuple(id(p) for p in prefixes[:len(runs)]), guided,
                   request.params.num_beams, request.params.prompt_logprobs)  # a scoring leader records for all
            leader = first.get(sig) if self.share_prefill else None
            for i, key in enumerate(runs):
                if leader is not None:
                    self._follow(key, leader.keys[i])
                else:
                    kv = prefixes[i]
                    self.staging.append(key, kv, (0 if kv is None else int(kv.shape[2])) + len(request.prompt_ids))
                    self.prefilling[key] = _Prefill(list(request.prompt_ids))
            for key in keys[len(runs):]:  # beams 1.. copy beam 0
                self._follow(key, keys[0] if leader is None else leader.keys[0])
            if leader is None:
                first[sig] = group

    def _follow(self, key: Hashable, leader: Hashable) -> None:
        leader = self.following.get(leader, leader)
        self.following[key] = leader
        self.prefilling[leader].followers.append(key)

    def remaining(self, key: Hashable) -> int:
        """Prompt tokens of a staging row still to run."""
        row = self.prefilling[key]
        return len(row.prompt) - row.done

    def remove(self, key: Hashable) -> None:
        """Drop a row wherever it is (a leader leaving hands its prompt to its first follower)."""
        self.base.discard(key)
        self.next_tokens.pop(key, None)
        if key in self.following:
            self.prefilling[self.following.pop(key)].followers.remove(key)
        elif key in self.prefilling:
            row = self.prefilling.pop(key)
            if row.followers:  # a follower takes over the leader's slot and progress
                heir, *rest = row.followers
                del self.following[heir]
                for f in rest:
                    self.following[f] = heir
                self.staging.order[self.staging.slot(key)] = heir
                self.prefilling[heir] = _Prefill(row.prompt, row.done, rest)
            else:
                self.staging.remove(key)
        elif key in self.running.order:
            self.running.remove(key)

    def clear(self) -> None:
        self.running.clear()
        self.staging.clear()
        self.prefilling.clear()
        self.following.clear()
        self.base.clear()
        self.next_tokens.clear()

    def current_logits(self) -> torch.Tensor:
        return self.running.logits[:len(self.running)]  # (B, V)

    # ---- one step --------------------------------------------------------------------------------------
    def execute(self, prefill: Sequence[tuple[Group, int]], groups: dict[str, Group]) -> StepOutput:
        """Decode the running rows, run this step's prefill chunks, sample every running row.

        `prefill` is the schedule's (request group, tokens) chunks; `groups` every admitted request by id. A
        phase that raises fails the requests it ran (their rows are dropped here); the others go on.
        """
        out = StepOutput()
        self._grow_ahead()
        plan = [(key, n) for group, n in prefill for key in group.prefill_keys if key in self.prefilling]
        order = list(self.running.order)
        chunk = None
        # Scoring rows hook the LM head (engine/logprobs.py): their chunk runs after the decode, not beside it.
        scoring = any(group.request.params.prompt_logprobs is not None for group, _ in prefill)
        if plan and order and self.overlap and not scoring:  # disjoint stores: both passes at once
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="prefixtune-prefill")
            chunk = self._pool.submit(self._prefill_forward, plan)
        if order:
            try:
                self.decode([self.next_tokens[key] for key in order])
                out.decoded = len(order)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory growing the buffers
                self._fail({key[0] for key in order}, exc, out)
        if plan:
            try:
                done = chunk.result() if chunk is not None else self._prefill_forward(plan, groups if scoring else None)
                for key, row_logits in done:  # after the decode: promoting writes the running store
                    self._promote(key, row_logits)
                out.prefilled = sum(n for _, n in plan)
            except Exception as exc:  # noqa: BLE001
                self._fail({key[0] for key, _ in plan}, exc, out)
        if len(self.running):
            live = {key[0]: groups[key[0]] for key in self.running.order}
            try:
                sampled = self.sampler(self.current_logits(), self.running.order, live)
                self.running.move(sampled.moves)
                self.next_tokens = sampled.row_tokens
                out.sampled = sampled
            except Exception as exc:  # noqa: BLE001
                self._fail(set(live), exc, out)
        return out

    def _grow_ahead(self) -> None:
        """Make room in `running` for the prompts being prefilled before they finish, zeroing a slab of columns
        per step: growing and zeroing at once for a long prompt stalled every running stream (engine/slots.py)."""
        if not len(self.running) or not self.prefilling:
            return
        target = max(self.staging.lengths[self.staging.slot(k)] + self.remaining(k) for k in self.prefilling) + 2
        rows = len(self.running) + len(self.prefilling) + len(self.following)
        try:
            self.running.reserve(rows, target)
            self.running.ensure(target, limit=GROW_SLAB)
        except Exception:  # noqa: BLE001 - only a head start: the forward that needs the room reserves it itself
            return

    def _fail(self, request_ids: set[str], exc: Exception, out: StepOutput) -> None:
        message = f"{type(exc).__name__}: {exc}"
        for key in [k for k in (*self.running.order, *self.prefilling, *self.following) if k[0] in request_ids]:
            if key in self:
                self.remove(key)
        for request_id in request_ids:
            out.failed[request_id] = message

    # ---- forward passes --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: Sequence[int]) -> None:
        """Feed one token per running row (slot order); refreshes current_logits()."""
        store = self.running
        b, width = len(store), max(store.lengths) + 1
        # A compiled step may run padded rows (spare slots writing and attending column 0 only; engine/compiled.py)
        rows, width = self.compiled.shape(b, width) if self.compiled is not None else (b, width)
        pad = [0] * (rows - b)
        columns = torch.tensor(store.lengths + pad, dtype=torch.long, device=self.device).view(-1, 1)  # (R, 1)
        ids = torch.tensor(list(tokens) + pad, dtype=torch.long, device=self.device).view(-1, 1)  # (R, 1)
        logits = self._forward(store, list(range(rows)), ids, columns, None, width, store.order, compiled=self.compiled)
        if rows == b and not (self.compiled is not None and self.compiled.reuses_outputs):
            # The forward's fresh (B, V) output becomes the store's logits: copying it (3 MB at batch 16 with a
            # 49k vocabulary) cost ~8% of a tiny model's step. A promotion grows it again (SlotKV.set_logits).
            store.logits = logits
        else:  # padded rows, or a CUDA graph whose next replay overwrites its output
            store.logits[:b] = logits[:b]
        store.lengths = [n + 1 for n in store.lengths]

    def prefill(self, plan: Sequence[tuple[Hashable, int]]) -> None:
        """Run the next `n` prompt tokens of each staging row in `plan`; a row whose prompt is done moves to
        running with its followers."""
        for key, row_logits in self._prefill_forward(plan):
            self._promote(key, row_logits)

    @torch.no_grad()
    def _prefill_forward(self, plan: Sequence[tuple[Hashable, int]], groups: dict[str, Group] | None = None
                         ) -> list[tuple[Hashable, torch.Tensor]]:
        """One forward of the chunks (left-padded so every row's last token is the last column), touching only
        the staging store; returns the rows whose prompts are done, with their last logits. With `groups` (every
        admitted request), the rows of requests that score their prompts record its log-probabilities."""
        store, t = self.staging, max(n for _, n in plan)
        slots = [store.slot(key) for key, _ in plan]
        ids = torch.zeros((len(plan), t), dtype=torch.long)  # (B, T) left-padded chunks
        columns = torch.zeros((len(plan), t), dtype=torch.long)  # (B, T)
        real = torch.zeros((len(plan), t), dtype=torch.bool)  # (B, T)
        for i, ((key, n), slot) in enumerate(zip(plan, slots)):
            row = self.prefilling[key]
            ids[i, t - n:] = torch.tensor(row.prompt[row.done:row.done + n], dtype=torch.long)
            columns[i, t - n:] = torch.arange(store.lengths[slot], store.lengths[slot] + n)
            real[i, t - n:] = True
        width = max(store.lengths[slot] + n for (_, n), slot in zip(plan, slots))
        scored = [i for i, (key, _) in enumerate(plan)
                  if groups is not None and groups[key[0]].request.params.prompt_logprobs is not None]
        capture = capture_hidden(self.model, torch.tensor(scored, device=self.device)) if scored else None
        logits = self._forward(store, slots, ids.to(self.device), columns.to(self.device), real.to(self.device),
                               width, [key for key, _ in plan], capture)
        if capture is not None:
            record_prompt(self.model, self.sampler, capture.hidden, [(*plan[i], self.prefilling[plan[i][0]])
                                                                     for i in scored], groups)
        done = []
        for i, ((key, n), slot) in enumerate(zip(plan, slots)):
            row = self.prefilling[key]
            row.done += n
            store.lengths[slot] += n
            if row.done == len(row.prompt):
                done.append((key, logits[i]))
        return done

    def _promote(self, key: Hashable, logits: torch.Tensor) -> None:
        row = self.prefilling.pop(key)
        src = self.staging.slot(key)
        for k in (key, *row.followers):
            self.following.pop(k, None)
            self.running.set_logits(self.running.copy_from(self.staging, src, k), logits)
        self.staging.remove(key)

    def _forward(self, store: SlotKV, slots: list[int], ids: torch.Tensor, columns: torch.Tensor,
                 real: torch.Tensor | None, width: int, keys: Sequence[Hashable], capture=None,
                 compiled=None) -> torch.Tensor:
        """Last-token logits (B, V) of rows `slots` of `store` fed ids (B, T) at `columns` (where `real`; None:
        every token is real), attending over `width` columns; through `compiled` when given (decode). `capture`
        (engine/logprobs.capture_hidden) also keeps some rows' every position."""
        store.reserve(max(len(store), len(slots)), width + 1)  # the last column takes the pads' writes, never attended
        store.ensure(width)
        positions = columns
        if real is not None:
            columns = columns.masked_fill(~real, store.capacity - 1)
            positions = positions.masked_fill(~real, 0)
        rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        cache = self._caches[id(store)]
        cache.current = _Forward(store, rows, columns, width, slots == list(range(len(slots))))
        inputs = dict(input_ids=ids, attention_mask=self._mask(positions, real, width), position_ids=positions,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        try:
            if compiled is not None and capture is None:
                logits = compiled(**inputs)
            else:
                inputs["logits_to_keep"] = 1 if capture is None else 0
                with capture if capture is not None else contextlib.nullcontext():
                    logits = self._call(keys, **inputs).logits[:, -1]
        finally:
            cache.current = None
        return logits.float()

    def _call(self, keys: Sequence[Hashable], **inputs):
        if self.lora is not None and any(key in self.base for key in keys):
            names = [BASE_ROW if key in self.base else self.lora.active_adapter for key in keys]
            return self.lora(adapter_names=names, **inputs)  # LoRA rows and base rows in one forward
        return self.model(**inputs)

    def _mask(self, positions: torch.Tensor, real: torch.Tensor | None, width: int):
        """Query (b, t) sees column c iff c <= its own position: its row's prefix, earlier tokens and this chunk
        up to itself (and, with a window, c > its position - window). Pads see nothing."""
        c = torch.arange(width, device=self.device).view(1, 1, -1)  # (1, 1, W)
        q = (positions if real is None else positions.masked_fill(~real, -1)).unsqueeze(-1)  # (B, T, 1)
        visible = c <= q  # (B, T, W)
        mask = self._additive(visible)
        if self.window is not None:
            # As transformers' sliding overlay: key position > query position - window.
            sliding = self._additive(visible & (c > q - self.window))
            mask = {"full_attention": mask, "sliding_attention": sliding} if self.mixed_layers else sliding
        return mask

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, T, W) bool -> (B, 1, T, W) additive mask; a finite floor keeps fully masked math NaN-free."""
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)  # (B, T, W)
        return mask.masked_fill_(~visible, torch.finfo(self.dtype).min).unsqueeze(1)  # (B, 1, T, W)


def logits_width(model) -> int:
    """Token ids the model scores (its output layer's rows; may exceed the tokenizer's vocabulary: padding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = getattr(head, "out_features", None)  # also a quantized head's (its `weight` is a method there)
    return int(rows) if rows is not None else int(model.config.vocab_size)
