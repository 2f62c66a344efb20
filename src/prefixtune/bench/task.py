"""`prefixtune bench task`: a task adapter (E2E: record -> sentence) trained by prefixtune vs by PEFT + HF Trainer.

Both start from the same prefix weights (PEFT's initialisation, copied into prefixtune's encoder) and train
the same tokenized rows (template-filled input, loss on the target + EOS) for the same steps, batch and
learning rate; then both, and the untrained base model under the same template, decode the same test
inputs (greedy and beam search) and are scored against every reference of each input.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefixtune.eval.reference import DecodeSettings, score_methods, scores_table
from prefixtune.fileio import atomic_write_text

BASE = "base (no prefix)"


@dataclass
class TaskBenchConfig:
    """One task benchmark run; every field is recorded in results.json."""

    model: str = "smollm2-135m"  # base model shared by every method
    data: str = "../shared/data/e2e"  # task data with train/validation/test splits
    out: str = "runs/bench/task"  # results.json, results.md and both adapters
    template: str = "{meaning_representation}\n"  # prompt over the input fields
    target_field: str = "human_reference"  # field holding the target text
    steps: int = 120  # optimizer steps for both trainers
    batch_size: int = 8  # rows per optimizer step
    lr: float = 2e-3  # peak learning rate for both (cosine schedule, 6% warm-up)
    num_virtual_tokens: int = 20  # prefix length (through PEFT's MLP projection, folded when saved)
    max_length: int = 128  # tokens per training row (inputs are shortened first)
    items: int = 100  # distinct test inputs decoded and scored
    num_beams: int = 4  # beam width for the beam-search pass
    batch_decode: int = 16  # inputs decoded together
    seed: int = 0  # data order, sampled test inputs, initial weights
    max_examples: int | None = None  # training rows drawn from the train split (None = all)

    def train_config(self, out: str):
        from prefixtune.train.config import TrainConfig

        return TrainConfig(model=self.model, data=self.data, out=out, name="prefixtune",
                           text_field=self.target_field, label_field=None, template=self.template,
                           max_length=self.max_length, num_virtual_tokens=self.num_virtual_tokens, lr=self.lr,
                           batch_size=self.batch_size, max_steps=self.steps, seed=self.seed, eval_every=0,
                           max_examples=self.max_examples,
                           eval_examples=64, save_every=0, progress=False, loss_check_steps=10**9)


def _save(folder: Path, flat, loaded, cfg: TaskBenchConfig, name: str, metrics: dict[str, Any]) -> Path:
    from prefixtune.adapter_folder import Manifest, shape_dict, write_adapter_folder
    from prefixtune.prefix.encoder import PrefixConfig
    from prefixtune.prefix.shapes import prefix_shape
    from prefixtune.templates import input_fields

    shape = prefix_shape(loaded.model.config)
    config = PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=False)
    manifest = Manifest(name=name, base_model=cfg.model, base_fingerprint=loaded.fingerprint,
                        shape=shape_dict(shape), prefix=config.to_dict(), template=cfg.template,
                        fields=input_fields(cfg.template), dataset={"source": cfg.data},
                        hyperparams={"text_field": cfg.target_field, "label_field": None, **asdict(cfg)},
                        metrics=metrics)
    return write_adapter_folder(folder / name, flat, shape, config, manifest)


def train_both(cfg: TaskBenchConfig, loaded, say=print) -> dict[str, dict[str, Any]]:
    """Train prefixtune's and PEFT's prefix from the same start on the same rows; returns name -> record."""
    from prefixtune.bench.train_speed import adapter_eval_loss, peer_model, run_peer
    from prefixtune.prefix.model import PrefixModel
    from prefixtune.train.loop import Trainer
    from prefixtune.train.plan import plan_run

    tcfg = cfg.train_config(tempfile.mkdtemp(prefix="prefixtune-bench-task-"))
    plan = plan_run(tcfg, loaded, say=say)
    trainer = Trainer(tcfg, plan, say=lambda *_: None)
    peer = peer_model(loaded, tcfg)
    # Same starting weights for both, so the scores differ only by how each trained.
    trainer.model.encoders[tcfg.name].load_state_dict(peer.prompt_encoder["default"].state_dict())
    say(f"training prefixtune: {cfg.steps} steps x batch {cfg.batch_size}, lr {cfg.lr}")
    trainer.run()
    ours = trainer.model.encoders[tcfg.name].fold().detach()  # (P, 2L*kv_heads*head_dim)
    records = {"prefixtune": {"flat": ours, "train_seconds": trainer.progress.train_seconds,
                              "real_tokens": trainer.progress.tokens}}
    say(f"training peft + HF Trainer (pad 128): same rows, steps, batch, lr and start")
    seconds, tokens, theirs = run_peer(peer, plan.train_rows, tcfg, plan.pad_id, loaded.device.type == "cpu")
    records["peft"] = {"flat": theirs, "train_seconds": seconds, "real_tokens": tokens}
    loaded.model.eval()  # HF Trainer leaves the model in train mode (dropout on, for models that have it)
    model = PrefixModel(loaded.model)
    for name, r in records.items():
        r["eval_loss"] = adapter_eval_loss(model, r["flat"], plan.val_rows, plan.pad_id)
        r["tokens_per_s"] = r["real_tokens"] / max(r["train_seconds"], 1e-9)
        say(f"{name}: {r['train_seconds']:.0f} s, {r['tokens_per_s']:.0f} real tokens/s, validation loss "
            f"{r['eval_loss']:.3f}")
    return records


def run_task_bench(cfg: TaskBenchConfig, say=print) -> dict[str, Any]:
    """Train both, decode greedy and beam, score; writes OUT/results.json and OUT/results.md."""
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.eval.task_eval import load_task_items
    from prefixtune.models import load_base_model

    started = time.perf_counter()
    out = Path(cfg.out)
    loaded = load_base_model(cfg.model)
    items, _, n_rows, n_items = load_task_items(cfg.data, cfg.template, cfg.target_field, "test", cfg.items,
                                                cfg.seed)
    records = train_both(cfg, loaded, say)
    for name, r in records.items():
        metrics = {k: v for k, v in r.items() if k != "flat"}
        _save(out / "adapters", r.pop("flat"), loaded, cfg, name, metrics)
    lm = PrefixLM(loaded, out / "adapters")
    methods = {"prefixtune": ("prefixtune", None), "peft": ("peft", None), BASE: (None, None)}
    scores: dict[str, dict[str, Any]] = {}
    for beams in (1, cfg.num_beams):
        settings = DecodeSettings(num_beams=beams, batch_size=cfg.batch_decode, progress=False)
        for name, r in score_methods(lm, methods, cfg.template, items, settings, say).items():
            scores[f"{name} | {r['decoding']}"] = r
    report = {"config": asdict(cfg), "device": str(loaded.device), "test_rows": n_rows, "test_inputs": n_items,
              "training": records, "scores": {k: {x: y for x, y in v.items() if x != "outputs"}
                                              for k, v in scores.items()},
              "outputs": {k: v["outputs"] for k, v in scores.items()}, "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "results.md", task_bench_markdown(report))
    say(task_bench_markdown(report))
    return report


def task_bench_markdown(report: dict[str, Any]) -> str:
    cfg, train = report["config"], report["training"]
    rows = {k.split(" | ")[0] + (" (beam)" if "beam" in k else ""): v for k, v in report["scores"].items()}
    first = next(iter(report["scores"].values()))
    lines = [f"Settings: base `{cfg['model']}` on {report['device']}, data `{cfg['data']}`, template "
             f"`{json.dumps(cfg['template'])[1:-1]}` -> `{cfg['target_field']}`; {cfg['steps']} steps x batch "
             f"{cfg['batch_size']}, lr {cfg['lr']}, {cfg['num_virtual_tokens']} virtual tokens, same start weights; "
             f"{first['items']} test inputs ({first['references']} references) of {report['test_inputs']}.", "",
             scores_table(rows), "",
             "| trainer | train time (s) | real tokens/s | validation loss |", "|---|---|---|---|"]
    for name, r in train.items():
        lines.append(f"| {name} | {r['train_seconds']:.0f} | {r['tokens_per_s']:.0f} | {r['eval_loss']:.3f} |")
    return "\n".join(lines) + "\n"
