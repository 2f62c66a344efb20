"""A family trained apart (train/sharded.py) in this one process: the same code every rank of `accelerate launch`
runs (tests/train/test_distributed.py launches it on 2), with the interrupt, resume and publish rules."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from prefixtune.prefix.peft_io import load_adapter
from prefixtune.train.config import ConfigError, TrainConfig
from prefixtune.train.distributed import DDP, SHARD, SINGLE, deal, rank_share, split_mode
from prefixtune.train.loop import Trainer
from prefixtune.train.run import train


def _cfg(tmp_path, model_dir, data, **kw):
    base = dict(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_examples=16,
                eval_examples=8, max_steps=3, eval_every=2, save_every=1, batch_size=4, num_virtual_tokens=4,
                lr=1e-2, progress=False, device="cpu", dtype="float32", per_label=True, labels=["joy", "anger"],
                distributed="shard")
    base.update(kw)
    return TrainConfig(**base)


def test_which_runs_shard(tmp_path):
    said = []
    family = TrainConfig(per_label=True)
    assert split_mode(family, 2) == SHARD and split_mode(family, 1) == SINGLE
    assert split_mode(TrainConfig(), 2) == DDP and split_mode(TrainConfig(), 1) == SINGLE
    assert split_mode(TrainConfig(per_label=True, distributed="ddp"), 2) == DDP
    assert split_mode(TrainConfig(per_label=True, distributed="shard"), 1) == SHARD  # each alone, in turn
    assert split_mode(TrainConfig(per_label=True, family_rate=0.15), 2, said.append) == DDP
    assert "with DDP over 2 processes" in said[0] and "--family-rate 0" in said[0]
    with pytest.raises(ConfigError, match="--label-word-weight 1 lifts"):
        split_mode(TrainConfig(per_label=True, label_word_weight=10.0, distributed="shard"), 2)
    with pytest.raises(ConfigError, match="--contrastive-weight 0"):
        split_mode(TrainConfig(per_label=True, contrastive_weight=1.0, distributed="shard"), 2)
    with pytest.raises(ConfigError, match="other labels' texts"):
        split_mode(TrainConfig(per_label=True, init="text", init_text="{label_words}", distributed="shard"), 2)
    with pytest.raises(ConfigError, match="one adapter"):
        split_mode(TrainConfig(distributed="shard"), 2)
    with pytest.raises(ConfigError, match="--distributed 'rings'"):
        TrainConfig(distributed="rings").validate()


def test_deal_and_shares():
    # Heaviest first onto the least-loaded rank: 5 | 3, then 2 joins the 3, then 1 the tie's lower rank.
    assert deal({"a": 5, "b": 3, "c": 2, "d": 1}, 2) == [["a", "d"], ["b", "c"]]
    assert deal({"a": 1}, 3) == [["a"], [], []]
    assert [rank_share(7, 2, r) for r in (0, 1)] == [(0, 3), (3, 7)]
    assert [rank_share(1, 2, r) for r in (0, 1)] == [(0, 0), (0, 1)]  # rank 0 gets a ghost row


def test_interrupted_sharded_run_publishes_nothing_then_resumes(tmp_path, tiny_model_dir, tiny_lm, emotion_dir,
                                                                 monkeypatch):
    store = tmp_path / "store"
    cfg = _cfg(tmp_path, tiny_model_dir, emotion_dir, store=str(store))
    original = Trainer.step

    def step_then_sigint(self, batch):  # stop the second adapter (joy: the deal goes by name) after step 2
        out = original(self, batch)
        if self.cfg.labels == ["joy"] and self.progress.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "step", step_then_sigint)
    said: list[str] = []
    stopped = train(cfg, loaded=tiny_lm, say=said.append)
    assert stopped.interrupted and stopped.adapters == {}
    assert not store.exists() and not (stopped.out / "last").exists(), "nothing is published before all complete"
    shards = stopped.out / "shards"
    assert (shards / "emotion-anger" / "result.json").is_file() and not (shards / "emotion-joy" / "result.json").exists()
    assert json.loads((shards / "emotion-joy" / "checkpoint" / "progress.json").read_text())["step"] == 2
    assert any("1 of 2 adapters complete" in s and "--resume" in s and "is untouched" in s for s in said)

    monkeypatch.setattr(Trainer, "step", original)
    cfg.resume = True
    said.clear()
    done = train(cfg, loaded=tiny_lm, say=said.append)
    assert any(s.startswith("emotion-anger: complete") for s in said), "a complete adapter is not trained again"
    assert sorted(done.adapters) == ["emotion-anger", "emotion-joy"]
    for label in ("joy", "anger"):
        name = f"emotion-{label}"
        assert done.adapters[name] == store / name
        alone = train(_cfg(tmp_path / label, tiny_model_dir, emotion_dir, labels=[label], distributed="auto"),
                      loaded=tiny_lm)
        torch.testing.assert_close(load_adapter(store / name).flat, load_adapter(alone.adapters[name]).flat)
        torch.testing.assert_close(load_adapter(done.out / "last" / name).flat,
                                   load_adapter(alone.out / "last" / name).flat)
    assert done.summary["adapters"] == 2 and done.summary["steps (all adapters)"] == 6


def test_resume_continues_a_run_the_way_it_ran(tmp_path, monkeypatch):
    import prefixtune.models

    def no_load(*_a, **_k):
        raise AssertionError("the model must not load when a check fails")

    monkeypatch.setattr(prefixtune.models, "load_base_model", no_load)
    sharded, together = tmp_path / "sharded", tmp_path / "together"
    for run in (sharded, together):
        run.mkdir()
        (run / "run.json").write_text("{}")
    (sharded / "shards").mkdir()
    (together / "checkpoint").mkdir()
    (together / "checkpoint" / "state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="trained apart .* --distributed shard"):
        train(TrainConfig(out=str(sharded), per_label=True, resume=True))
    with pytest.raises(ConfigError, match="trained its adapters together .* --distributed ddp"):
        train(TrainConfig(out=str(together), per_label=True, resume=True, distributed="shard"))
