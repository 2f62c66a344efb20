"""Requests that must fail alone (or not at all), never taking other users' rows down with them."""

from __future__ import annotations

import threading

import torch

from prefixtune.engine.sampling import RowSampler, SamplingParams
from prefixtune.engine.scheduler import Request, Scheduler
from prefixtune.engine.text import TextTracker
from prefixtune.prefix.peft_io import AdapterFormatError, load_adapter


class _Done:
    def __init__(self):
        self.outputs, self.event = [], threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finish_reason is not None:
            self.event.set()


def test_bad_sampling_settings_fail_alone(serve_lm):
    scheduler = Scheduler(serve_lm, max_batch=8, start=False)
    ids = serve_lm.tokenizer("Hello there").input_ids
    good, huge_seed, tiny_temp = _Done(), _Done(), _Done()
    scheduler.submit_many([
        Request(ids, "alpha", SamplingParams(max_new_tokens=4), good),
        Request(ids, "beta", SamplingParams(max_new_tokens=4, temperature=1.0, seed=2**70), huge_seed),
        Request(ids, None, SamplingParams(max_new_tokens=4, temperature=1e-40), tiny_temp),
    ])
    while scheduler.run_once():
        pass
    assert good.outputs[-1].finish_reason == "length"
    assert huge_seed.outputs[-1].finish_reason == "length", "any integer seed works"
    assert tiny_temp.outputs[-1].finish_reason == "length", "a tiny temperature is greedy, not NaN"
    assert scheduler.in_flight == 0


def test_huge_seeds_are_reproducible():
    logits = torch.randn(100)
    draws = [RowSampler(SamplingParams(temperature=1.0, seed=2**70 + 3), torch.device("cpu"))(logits)
             for _ in range(2)]
    assert draws[0] == draws[1]


def test_stop_string_before_a_split_character_is_held_back(serve_lm):
    tok = serve_lm.tokenizer
    text = "Done.\n🙂 bye"
    tracker = TextTracker(tok, ["\n🙂"])
    emitted, stopped = "", False
    for token in tok(text, add_special_tokens=False).input_ids:
        piece, stopped = tracker.push(token)
        emitted += piece
        if stopped:
            break
    assert stopped and emitted == "Done."


def test_corrupt_weights_are_a_format_error(tmp_path, serve_lm):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(serve_lm.store.path("alpha"), folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00\x01")
    try:
        load_adapter(folder)
    except AdapterFormatError as err:
        assert "unreadable" in str(err)
    else:
        raise AssertionError("a truncated weights file must raise AdapterFormatError")
