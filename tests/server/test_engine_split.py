"""The engine's stages on their own: policy, per-slot KV runner, vectorised sampling, output processor, guidance."""

from __future__ import annotations

import threading

import pytest
import torch

from prefixtune.engine.policy import BatchPolicy
from prefixtune.engine.runner import ModelRunner
from prefixtune.engine.sampler import new_group
from prefixtune.engine.sampling import RowSampler, SamplingParams, sample_rows
from prefixtune.engine.scheduler import Request, Scheduler
from prefixtune.prefix.inject import extend_inputs, stack_prefixes, training_cache
from prefixtune.testing import TINY_ARCHS, make_tiny_model

PROMPTS = ["Hello there", "The cat sat on the mat and", "I am feeling", "x y z"]


class Sink:
    def __init__(self):
        self.outputs, self.threads, self.done = [], set(), threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        self.threads.add(threading.current_thread().name)
        if out.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self):
        return [t for o in self.outputs for t in o.token_ids]


def _drain(s: Scheduler) -> None:
    for _ in range(500):
        if not s.run_once():
            return
    raise AssertionError("scheduler did not finish")


def _ids(lm, text):
    return lm.tokenizer(text).input_ids


def _plain(model, prompt, prefix):
    """Last-token logits (V,) of one row in a plain forward: its prefix as past keys, no engine cache."""
    batch = stack_prefixes([prefix], dtype=next(model.parameters()).dtype)
    mask, positions = extend_inputs(batch, torch.ones(1, len(prompt), dtype=torch.long))
    out = model(input_ids=torch.tensor([prompt]), attention_mask=mask, position_ids=positions,
                past_key_values=training_cache(batch))
    return out.logits[0, -1].float()


def _admit(runner, rows):
    """rows: (key, prompt ids, prefix); each a one-row greedy request."""
    groups = {}
    for key, prompt, _ in rows:
        groups[key] = new_group(Request(prompt, None, SamplingParams(), request_id=key), set(), runner.device)
    runner.admit([(groups[key], [kv]) for key, _, kv in rows])
    return groups


@torch.no_grad()
def test_runner_matches_plain_forwards_and_never_reallocates_on_join_or_leave(serve_lm):
    model = serve_lm.model
    prefixes = [serve_lm.adapter("alpha").kv, None, serve_lm.adapter("beta").kv]
    prompts = [_ids(serve_lm, p) for p in PROMPTS[:3]]
    runner = ModelRunner(model, 8)
    _admit(runner, [("a", prompts[0], prefixes[0]), ("b", prompts[1], prefixes[1])])
    runner.prefill([(("a", 0), len(prompts[0])), (("b", 0), len(prompts[1]))])
    buffers = [t.data_ptr() for t in runner.running.keys]
    seqs = [list(prompts[0]), list(prompts[1])]
    for step in range(4):
        ref = torch.stack([_plain(model, seq, kv) for seq, kv in zip(seqs, prefixes)])
        assert torch.allclose(runner.current_logits(), ref, atol=1e-4), step
        tokens = ref.argmax(-1).tolist()
        runner.decode(tokens)
        for seq, token in zip(seqs, tokens):
            seq.append(token)
    runner.remove(("a", 0))  # the last row moves into slot 0: only its own columns are copied
    assert runner.running.order == [("b", 0)]
    assert torch.allclose(runner.current_logits()[0], _plain(model, seqs[1], None), atol=1e-4)
    _admit(runner, [("c", prompts[2], prefixes[2])])  # joins a batch 4 tokens in, with a longer prefix
    runner.prefill([(("c", 0), len(prompts[2]))])
    assert [t.data_ptr() for t in runner.running.keys] == buffers  # no whole-cache copy on join or leave
    assert torch.allclose(runner.current_logits()[1], _plain(model, prompts[2], prefixes[2]), atol=1e-4)


@torch.no_grad()
def test_chunked_prefill_equals_one_piece_beside_a_decoding_row(serve_lm):
    model = serve_lm.model
    long = _ids(serve_lm, " ".join(PROMPTS * 3))
    kv = serve_lm.adapter("alpha").kv
    runner = ModelRunner(model, 4)
    _admit(runner, [("r", _ids(serve_lm, PROMPTS[0]), None)])
    runner.prefill([(("r", 0), len(_ids(serve_lm, PROMPTS[0])))])
    _admit(runner, [("long", long, kv)])
    done, token = 0, int(runner.current_logits()[0].argmax())
    for chunk in (5, 1, 7, len(long)):  # uneven chunks, interleaved with the running row's decode steps
        take = min(chunk, len(long) - done)
        runner.decode([token])
        runner.prefill([(("long", 0), take)])
        done += take
        token = int(runner.current_logits()[0].argmax())
        if done == len(long):
            break
        assert ("long", 0) in runner.prefilling and runner.remaining(("long", 0)) == len(long) - done
    assert runner.running.order == [("r", 0), ("long", 0)] and not runner.prefilling
    assert torch.allclose(runner.current_logits()[1], _plain(model, long, kv), atol=1e-4)


def test_policy_admits_groups_in_order_and_releases_cancelled():
    class R:
        def __init__(self, guided=False, adapter=None):
            self.params = SamplingParams(guidance_scale=2.0 if guided else 1.0)
            self.adapter, self.cancelled, self.stopped, self.experts = adapter, False, False, None

    policy = BatchPolicy(max_batch=3)
    running = [R()]
    waiting = [R(guided=True), R(guided=True), R()]
    plan = policy.schedule(waiting, running)
    assert plan.admit == waiting[:1] and not plan.release  # 1 + 2 rows; the next group waits (no overtaking)
    running[0].cancelled = True
    plan = policy.schedule(waiting[1:], running)
    assert plan.release == running and plan.admit == waiting[1:]


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch_mates():
    vocab = 300
    params = SamplingParams(temperature=0.9, top_p=0.8, top_k=50, seed=11)
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    alone_sampler = RowSampler(params, torch.device("cpu"))
    alone = [alone_sampler(logits[0]) for _ in range(20)]
    mixed = [RowSampler(params, torch.device("cpu"))] + [
        RowSampler(SamplingParams(temperature=t, top_p=p, top_k=k, seed=s), torch.device("cpu"))
        for t, p, k, s in [(0.0, 1.0, 0, None), (1.5, 1.0, 0, 3), (0.7, 0.5, 0, None), (1.0, 1.0, 5, 9), (0, 1, 0, 1)]
    ]
    together = [sample_rows(logits, mixed)[0] for _ in range(20)]
    assert together == alone
    greedy = sample_rows(logits, [RowSampler(SamplingParams(), torch.device("cpu"))] * 6)
    assert greedy == logits.argmax(-1).tolist()


def test_outputs_come_from_the_output_thread_also_for_a_cancelled_queued_request(serve_lm):
    s = Scheduler(serve_lm, max_batch=1)  # started: worker + output threads
    try:
        from serve_helpers import gated_model

        with gated_model(serve_lm) as gate:
            running, queued = Sink(), Sink()
            s.submit(Request(_ids(serve_lm, "Hi"), None, SamplingParams(max_new_tokens=3), running))
            r2 = Request(_ids(serve_lm, "Yo"), None, SamplingParams(max_new_tokens=3), queued)
            s.submit(r2)
            assert s.cancel(r2.request_id)
            assert queued.done.wait(10) and queued.outputs[-1].finish_reason == "cancelled"
            gate.set()
        assert running.done.wait(30)
        assert queued.threads == running.threads == {"prefixtune-output"}  # never the caller's or decode thread
        assert s.stats.finished["cancelled"] == 1 and s.stats.finished["length"] == 1
    finally:
        s.shutdown(timeout=5)


def test_guided_request_in_a_mixed_batch_matches_alone_and_offline(serve_lm):
    prompt = PROMPTS[1]
    for negative in (None, "beta"):
        offline = serve_lm.generate([prompt], "alpha", max_new_tokens=8, guidance_scale=3.0,
                                    guidance_negative=negative)[0]
        plain = serve_lm.generate([prompt], "alpha", max_new_tokens=8)[0]
        assert offline.tokens != plain.tokens, "guidance must change the output (else vacuous)"
        s = Scheduler(serve_lm, max_batch=8, start=False)
        alone = Sink()
        s.submit(Request(_ids(serve_lm, prompt), "alpha", SamplingParams(max_new_tokens=8, guidance_scale=3.0),
                         alone, negative=negative))
        _drain(s)
        s = Scheduler(serve_lm, max_batch=8, start=False)
        mixed, others = Sink(), [Sink() for _ in range(3)]
        s.submit(Request(_ids(serve_lm, PROMPTS[0]), "beta", SamplingParams(max_new_tokens=12), others[0]))
        s.run_once()
        s.run_once()
        s.submit_many([
            Request(_ids(serve_lm, prompt), "alpha", SamplingParams(max_new_tokens=8, guidance_scale=3.0), mixed,
                    negative=negative),
            Request(_ids(serve_lm, PROMPTS[2]), None, SamplingParams(max_new_tokens=3, temperature=1.0, seed=1),
                    others[1]),
        ])
        s.run_once()
        s.submit(Request(_ids(serve_lm, PROMPTS[3]), "alpha", SamplingParams(max_new_tokens=5), others[2]))
        _drain(s)
        assert alone.tokens == mixed.tokens == offline.tokens
        assert "".join(o.text for o in mixed.outputs) == offline.text
        assert s.stats.finished["length"] + s.stats.finished["stop"] == 4  # the guided pair is one request
        assert s.stats.max_batch_size == 5 and s.running == 0 and s.in_flight == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_runner_matches_plain_forwards_on_every_architecture(arch):
    model = make_tiny_model(arch, seed=3)
    if getattr(model.config, "sliding_window", None):
        model.config.sliding_window = 6  # a window shorter than the rows: the mask must carry it
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    runner = ModelRunner(model, 4)
    _admit(runner, [("a", seqs[0], None), ("b", seqs[1], None)])
    runner.prefill([(("a", 0), 3), (("b", 0), 2)])  # a's prompt in two chunks
    runner.prefill([(("a", 0), 4)])
    order = [k[0] for k in runner.running.order]
    for step in range(6):
        ref = torch.stack([_plain(model, seqs["ab".index(k)], None) for k in order])
        assert torch.allclose(runner.current_logits(), ref, atol=1e-4), (arch, step)
        tokens = ref.argmax(-1).tolist()
        runner.decode(tokens)
        for k, token in zip(order, tokens):
            seqs["ab".index(k)].append(token)
    runner.remove(("a", 0))
    runner.remove(("b", 0))
    assert runner.running.keys == [] and runner.running.logits is None  # an idle runner holds no KV memory


@torch.no_grad()
def test_grown_buffers_are_never_read_before_they_are_written_or_zeroed(serve_lm, monkeypatch):
    """Buffers grow uninitialised (engine/slots.py): fill every grown buffer with NaN, the worst garbage, and the
    logits must still equal plain forwards through growth, a long prompt's join and a row leaving."""
    real, empty = torch.Tensor.new_empty, torch.empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: real(self, *a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    model, kv = serve_lm.model, serve_lm.adapter("alpha").kv
    long = _ids(serve_lm, " ".join(PROMPTS * 10))[:180]
    runner = ModelRunner(model, 4)
    _admit(runner, [("a", _ids(serve_lm, PROMPTS[0]), None), ("b", _ids(serve_lm, PROMPTS[1]), kv)])
    runner.prefill([(("a", 0), len(_ids(serve_lm, PROMPTS[0]))), (("b", 0), len(_ids(serve_lm, PROMPTS[1])))])
    seqs = {("a", 0): list(_ids(serve_lm, PROMPTS[0])), ("b", 0): list(_ids(serve_lm, PROMPTS[1]))}
    prefixes = {("a", 0): None, ("b", 0): kv, ("long", 0): kv}
    _admit(runner, [("long", long, kv)])
    done = 0
    while done < len(long):  # the running store grows ahead of the long prompt while it is prefilled
        runner._grow_ahead()
        tokens = runner.current_logits().argmax(-1).tolist()
        order = list(runner.running.order)
        runner.decode(tokens)
        for key, token in zip(order, tokens):
            seqs[key].append(token)
        take = min(50, len(long) - done)
        runner.prefill([(("long", 0), take)])
        done += take
    seqs[("long", 0)] = list(long)
    runner.remove(("a", 0))  # the last row moves into slot 0 with its tail
    del seqs[("a", 0)]
    short = {("c", 0): _ids(serve_lm, PROMPTS[2]), ("d", 0): _ids(serve_lm, PROMPTS[3])}
    _admit(runner, [(k[0], ids, None) for k, ids in short.items()])  # into slots never written since growth
    runner.prefill([(k, len(ids)) for k, ids in short.items()])
    seqs.update({k: list(ids) for k, ids in short.items()})
    prefixes.update(dict.fromkeys(short))
    for step in range(3):
        ref = torch.stack([_plain(model, seqs[k], prefixes[k]) for k in runner.running.order])
        got = runner.current_logits()
        assert torch.isfinite(got).all() and torch.allclose(got, ref, atol=1e-4), step
        tokens = ref.argmax(-1).tolist()
        runner.decode(tokens)
        for key, token in zip(runner.running.order, tokens):
            seqs[key].append(token)


def test_a_top_p_below_float32_precision_keeps_the_top_token():
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(1))
    samplers = [RowSampler(SamplingParams(temperature=1.0, top_p=5e-324, seed=s), torch.device("cpu")) for s in (0, 1)]
    assert sample_rows(logits, samplers) == logits.argmax(-1).tolist()
