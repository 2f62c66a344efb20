"""End-to-end training: the whole `prefixtune train` command vs the peer recipe's whole script, one run.

Both are separate processes timed from the outside (Python start, imports, model load, data, training 1 epoch
of the same rows at batch 8, final eval on the same validation rows, saving), so every overhead counts. The
peer is PEFT prefix tuning + HF Trainer padding every row to 128 tokens (`python -m prefixtune.bench.train_e2e
peer ...`). Afterwards (untimed) both saved adapters are scored by one eval function on the same rows, so
"faster at the same or lower loss" is read off one table.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPE = dict(batch_size=8, epochs=1.0, lr=3e-4, num_virtual_tokens=20, seed=0)  # the shared recipe


def _ours_cmd(model: str, data: str, rows: int, eval_rows: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "prefixtune", "train", "--model", model, "--data", data, "--out", str(out / "ours"),
            "--store", str(out / "ours-store"), "--max-examples", str(rows), "--eval-examples", str(eval_rows),
            "--eval-every", "0", "--save-every", "0", "--batch-size", str(RECIPE["batch_size"]),
            "--epochs", str(RECIPE["epochs"]), "--lr", str(RECIPE["lr"]), "--seed", str(RECIPE["seed"]),
            "--num-virtual-tokens", str(RECIPE["num_virtual_tokens"]), "--name", "e2e", "--no-progress",
            "--device", "cpu", "--overwrite"]


def _peer_cmd(model: str, data: str, rows: int, eval_rows: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "prefixtune.bench.train_e2e", "peer", model, data, str(rows), str(eval_rows),
            str(out / "peer")]


def _timed(cmd: list[str], say) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of the child and its children) of one command.

    CPU seconds are the work done: on a shared machine they move far less than wall time when other
    jobs come and go between the two commands.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    say(f"{cmd[2] if cmd[2] != '-m' else cmd[3]}: {seconds:.1f} s wall, {cpu:.1f} CPU s")
    return seconds, cpu


def _plan(model: str, data: str, rows: int, eval_rows: int, loaded=None):
    """The rows both runs train on and are scored on (TrainConfig's selection, label in the prompt)."""
    from prefixtune.data import load_data
    from prefixtune.models import load_base_model
    from prefixtune.train.config import TrainConfig
    from prefixtune.train.examples import tokenize
    from prefixtune.train.plan import split_rows

    cfg = TrainConfig(model=model, data=data, max_examples=rows, eval_examples=eval_rows, device="cpu", **RECIPE)
    loaded = loaded or load_base_model(model, "cpu")
    template, train_ex, val_ex = split_rows(cfg, load_data(data), say=lambda *_: None)
    tok = loaded.tokenizer
    train_rows, _ = tokenize(train_ex, tok, template, lambda ex: "e2e", cfg.max_length)
    val_rows, _ = tokenize(val_ex, tok, template, lambda ex: "e2e", cfg.max_length)
    val_rows.sort(key=lambda r: len(r.input_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return loaded, train_rows, val_rows, pad


def run(model: str, data: str, out: Path, rows: int = 256, eval_rows: int = 256, say=print) -> dict[str, Any]:
    """Time both whole commands, then score both adapters the same way; returns seconds, losses and the ratio."""
    from prefixtune.bench.train_speed import adapter_eval_loss
    from prefixtune.prefix.model import PrefixModel
    from prefixtune.prefix.peft_io import load_adapter

    out = Path(out)
    ours_s, ours_cpu = _timed(_ours_cmd(model, data, rows, eval_rows, out), say)
    peer_s, peer_cpu = _timed(_peer_cmd(model, data, rows, eval_rows, out), say)
    loaded, _, val_rows, pad = _plan(model, data, rows, eval_rows)
    scorer = PrefixModel(loaded.model)
    ours_loss = adapter_eval_loss(scorer, load_adapter(out / "ours-store" / "e2e").flat, val_rows, pad)
    peer_loss = adapter_eval_loss(scorer, load_adapter(out / "peer" / "adapter").flat, val_rows, pad)
    peer_info = json.loads((out / "peer" / "timings.json").read_text())
    return {"rows": rows, "eval_rows": eval_rows, "ours_seconds": ours_s, "peer_seconds": peer_s,
            "ratio": peer_s / max(ours_s, 1e-9), "ours_cpu_seconds": ours_cpu, "peer_cpu_seconds": peer_cpu,
            "cpu_ratio": peer_cpu / max(ours_cpu, 1e-9), "ours_eval_loss": ours_loss, "peer_eval_loss": peer_loss,
            "peer_phases": peer_info}


def peer_main(model: str, data: str, rows: int, eval_rows: int, out: str) -> None:
    """The peer recipe as one script: load, PEFT prefix tuning, HF Trainer (pad 128), evaluate, save."""
    import tempfile

    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from prefixtune.bench.train_speed import Padded

    phases, started = {}, time.perf_counter()
    loaded, train_rows, val_rows, pad = _plan(model, data, rows, eval_rows)
    phases["load"] = time.perf_counter() - started
    torch.manual_seed(RECIPE["seed"])
    peft_model = get_peft_model(loaded.model, PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=RECIPE["num_virtual_tokens"], prefix_projection=True,
        encoder_hidden_size=loaded.model.config.hidden_size))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=RECIPE["batch_size"],
            per_device_eval_batch_size=RECIPE["batch_size"], num_train_epochs=RECIPE["epochs"],
            learning_rate=RECIPE["lr"], warmup_steps=int(0.06 * math.ceil(len(train_rows) / RECIPE["batch_size"])), lr_scheduler_type="cosine", max_grad_norm=1.0,
            report_to=[], save_strategy="no", logging_steps=10**6, use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True, seed=RECIPE["seed"])
        trainer = Trainer(model=peft_model, args=args, train_dataset=Padded(train_rows, pad),
                          eval_dataset=Padded(val_rows, pad))
        mark = time.perf_counter()
        trainer.train()
        phases["train"] = time.perf_counter() - mark
        mark = time.perf_counter()
        phases["eval_loss"] = trainer.evaluate()["eval_loss"]
        phases["eval"] = time.perf_counter() - mark
    mark = time.perf_counter()
    peft_model.save_pretrained(str(Path(out) / "adapter"))
    phases["save"] = time.perf_counter() - mark
    (Path(out) / "timings.json").write_text(json.dumps(phases))


if __name__ == "__main__":  # python -m prefixtune.bench.train_e2e peer MODEL DATA ROWS EVAL_ROWS OUT
    if len(sys.argv) != 7 or sys.argv[1] != "peer":
        sys.exit("usage: python -m prefixtune.bench.train_e2e peer MODEL DATA ROWS EVAL_ROWS OUT")
    peer_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
