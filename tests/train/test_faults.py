"""Fault injection: a tiny per-label run SIGKILLed at random moments, again and again, then `--resume`d.

Each attempt runs in a forked child (the tiny model is already loaded, so a start costs milliseconds) and is
killed after a seeded random delay: during planning, a step, an eval, a checkpoint swap, a save or the store
publish. After every kill the store may only show complete adapters equal to the uninterrupted run's, and the
final adapters must equal the uninterrupted run's. docs/RELIABILITY.md records how many kills this covers.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import torch

from prefixtune.prefix.peft_io import load_adapter
from prefixtune.store import AdapterStore
from prefixtune.train.config import TrainConfig
from prefixtune.train.run import train

# Independent runs, each killed up to KILLS times at random moments before it may finish. The default keeps
# the suite quick; PREFIXTUNE_FAULT_TRIALS=20 is what docs/RELIABILITY.md reports.
TRIALS = int(os.environ.get("PREFIXTUNE_FAULT_TRIALS", "2"))
KILLS = 3


def _settings(tmp_path, model_dir, data, tag):
    return dict(model=str(model_dir), data=str(data), out=str(tmp_path / f"run-{tag}"),
                store=str(tmp_path / f"store-{tag}"), per_label=True, labels=["joy", "anger"], max_examples=48,
                eval_examples=8, max_steps=8, eval_every=3, save_every=2, batch_size=4, num_virtual_tokens=2,
                lr=1e-2, progress=False, device="cpu", dtype="float32")


def _published(store_dir) -> dict[str, torch.Tensor]:
    store = AdapterStore(store_dir)
    out = {}
    for name in store.names():
        loaded, manifest = store.load(name)  # a half-written folder would fail here
        assert manifest is not None and manifest.hyperparams["max_steps"] == 8
        out[name] = loaded.flat
    return out


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_model_dir, tiny_lm,
                                                                             emotion_dir):
    from prefixtune.data import load_data

    data = load_data(str(emotion_dir))  # loaded once: every attempt then starts in milliseconds
    train(TrainConfig(**_settings(tmp_path, tiny_model_dir, emotion_dir, "warm")), loaded=tiny_lm, data=data,
          say=lambda *_: None)
    started = time.perf_counter()
    reference = train(TrainConfig(**_settings(tmp_path, tiny_model_dir, emotion_dir, "ref")), loaded=tiny_lm,
                      data=data, say=lambda *_: None)
    budget = time.perf_counter() - started  # kill anywhere within one whole run
    expected = _published(tmp_path / "store-ref")
    assert sorted(expected) == sorted(reference.adapters) == ["emotion-anger", "emotion-joy"]

    def attempt(settings, resume):
        def run():
            train(TrainConfig(**settings, resume=resume), loaded=tiny_lm, data=data, say=lambda *_: None)

        return run

    ctx = multiprocessing.get_context("fork")
    rng = random.Random(int(os.environ.get("PREFIXTUNE_FAULT_SEED", "13")))
    kills_done = 0
    for trial in range(TRIALS):
        settings = _settings(tmp_path, tiny_model_dir, emotion_dir, trial)
        for attempt_no in range(KILLS + 1):
            child = ctx.Process(target=attempt(settings, resume=attempt_no > 0))
            child.start()
            child.join(rng.uniform(0.0, 0.8 * budget) if attempt_no < KILLS else 300)
            if child.exitcode is None:
                os.kill(child.pid, signal.SIGKILL)
                child.join()
                kills_done += 1
            for name, flat in _published(settings["store"]).items():  # never half an adapter, never a wrong one
                torch.testing.assert_close(flat, expected[name])
            if child.exitcode == 0:
                break
            assert child.exitcode == -signal.SIGKILL, f"attempt failed on its own (exit {child.exitcode})"
        final = _published(settings["store"])
        assert sorted(final) == sorted(expected), f"trial {trial} did not finish"
        for name, flat in final.items():
            torch.testing.assert_close(flat, expected[name])
            torch.testing.assert_close(load_adapter(tmp_path / f"run-{trial}" / "last" / name).flat, expected[name])
    print(f"fault test: {kills_done} SIGKILLs over {TRIALS} trials, every resume matched")  # shown with -s
    assert kills_done >= TRIALS, "the random delays should kill most attempts"
