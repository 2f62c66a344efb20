"""lm-evaluation-harness's `local-completions` model against `prefixtune serve` gives the answers of its `hf`
model with `peft=` the exported adapter, on a multiple-choice task over a local data file (issue #22)."""

from __future__ import annotations

from prefixtune.eval.harness import (choice_rows, hf_args, largest_gap, run_harness, served_args, serving,
                                     write_choice_task)
from prefixtune.store import AdapterStore

LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def test_local_completions_equals_hf_with_peft(tiny_model_dir, serve_store, emotion_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    task = write_choice_task(tmp_path / "task", choice_rows(emotion_dir / "test.jsonl", LABELS, 2), LABELS)
    exported = AdapterStore(serve_store).export("alpha", tmp_path / "alpha-peft", peft_only=True)
    with serving(tiny_model_dir, serve_store, "--max-batch", "4", "--served-model-name", "tiny") as url:
        served = {m: run_harness("local-completions", served_args(url, m, tiny_model_dir), task)
                  for m in ("tiny", "alpha")}
    local = {"tiny": run_harness("hf", hf_args(tiny_model_dir), task),
             "alpha": run_harness("hf", hf_args(tiny_model_dir, exported), task)}
    for model in ("tiny", "alpha"):
        assert served[model].answers == local[model].answers, model
        assert served[model].accuracy == local[model].accuracy, model
        assert largest_gap(served[model], local[model]) < 1e-3, model
    # The adapter changes the choices' scores (else base and adapter agreeing would prove nothing of the prefix).
    assert largest_gap(served["tiny"], served["alpha"]) > 1e-2
    assert len(served["alpha"].answers) == len(LABELS) * 2
