"""What a comparison is (CompareConfig) and how one method of it trains and is tabulated.

Below compare (the label comparison), task_compare (the task comparison) and readme (the README section),
which all build on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from prefixtune.engine.guidance import validate_scale
from prefixtune.errors import UserError
from prefixtune.eval.evaluate import EvalSettings
from prefixtune.fileio import atomic_write_text
from prefixtune.train.config import TrainConfig

METHODS = ("prefix", "lora", "full", "prompt")
DEFAULT_METHODS = ("prefix", "lora", "prompt")  # full fine-tuning trains every weight: asked for by name
DEFAULT_INSTRUCTION = "Write a short tweet that expresses {label}."


class CompareConfigError(UserError, ValueError):
    """A bad compare setting or config file; the message names the setting and the fix."""


class TrainingFailed(RuntimeError):
    """A method's training process failed; the message has its last error line and where the traceback is."""


@dataclass
class CompareConfig(EvalSettings):
    """Everything a comparison needs; saved as OUT/config.json so `--config` repeats the run."""

    model: str = "smollm2-135m"  # base model shared by every method
    data: str = "dair-ai/emotion"  # labelled data: hub id or local folder/file
    out: str = "runs/compare"  # results, plots and each method's run folder
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # any of prefix, lora, full, prompt
    steps: int = 50  # optimizer steps for every trained method
    batch_size: int = 8  # rows per optimizer step
    lr: float = 3e-4  # peak learning rate (AdamW) for every trained method
    prefix_lr: float | None = None  # override lr for prefix tuning only
    lora_lr: float | None = None  # override lr for LoRA only
    full_lr: float = 5e-5  # lr for full fine-tuning (HF Trainer's default; an adapter's lr would wreck the model)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.06  # share of steps spent warming up
    schedule: str = "cosine"  # cosine | linear | constant
    grad_clip: float = 1.0  # gradient norm clip
    balance: bool = False  # equal training rows per label
    max_examples: int | None = None  # cap on training rows
    labels: list[str] | None = None  # only these labels (default: all)
    text_field: str = "text"  # field holding the text
    label_field: str = "label"  # field holding the label
    label_names: list[str] | None = None  # names for integer labels
    template: str | None = None  # training prompt with {label} (default: TrainConfig's)
    num_virtual_tokens: int = 20  # prefix length
    prefix_projection: bool = True  # train the prefix through the MLP
    encoder_hidden_size: int | None = None  # prefix MLP width (default: the model's hidden size)
    init: str = "random"  # prefix init: random | zero | text
    init_text: str | None = None  # text whose keys/values start the prefix (init=text; {label} filled in)
    per_label: bool = False  # prefix: one adapter per label instead of the label in the prompt
    label_word_weight: float = 1.0  # per-label prefix: loss weight on each label's distinctive words (train's)
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA alpha
    lora_dropout: float = 0.0  # LoRA dropout
    lora_targets: list[str] | None = None  # LoRA target modules (default: attention projections)
    instruction: str = DEFAULT_INSTRUCTION  # the prompting baseline's request, {label} filled in
    chat: bool = True  # wrap the instruction in the model's chat template (when it has one)
    judge: str | None = None  # module:factory of a custom judge
    device: str | None = None  # cpu | cuda | auto
    dtype: str | None = None  # float32 | bfloat16 | float16 | auto
    isolate: bool = True  # train each method in its own process (honest peak memory)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise CompareConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise CompareConfigError(f"--methods lists a method twice: {', '.join(self.methods)}")
        if self.steps < 1 or self.batch_size < 1:
            raise CompareConfigError("--steps and --batch-size must be >= 1")
        if self.guidance_scale is not None:
            try:
                validate_scale(self.guidance_scale)
            except ValueError as err:
                raise CompareConfigError(f"--guidance-scale: {err}") from None
        if "{label}" not in self.instruction:
            raise CompareConfigError(f"--instruction {self.instruction!r} must contain {{label}}")
        try:  # fail here, not minutes later inside a training process
            for method in self.methods:
                if method != "prompt":
                    self.train_config(method).validate()
        except ValueError as err:
            raise CompareConfigError(str(err)) from None

    def train_config(self, method: str) -> TrainConfig:
        """The TrainConfig `prefixtune train` would use: every same-named setting is carried over, so the
        prefix in a comparison gets the recipe `train` gives it (init, init_text, projection, widths ...)."""
        shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(self)}
        values = {name: getattr(self, name) for name in shared}
        family = self.per_label and method == "prefix"  # only the prefix trains a per-label family
        values.update(
            method=method, name=method, out=str(Path(self.out) / method), store=None, overwrite=True,
            lr={"prefix": self.prefix_lr, "lora": self.lora_lr, "full": self.full_lr}.get(method) or self.lr,
            per_label=family, max_steps=self.steps, label_word_weight=self.label_word_weight if family else 1.0,
            eval_every=0, eval_examples=self.eval_examples or 10**9, save_every=0)
        return TrainConfig(**values)


def with_prefix_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """`values` plus `train --per-label`'s recipe for the prefix settings not given, when per_label is on.

    So a per-label prefix in a comparison trains as `prefixtune train --per-label` trains it (the family
    adapter and guidance are left out: the other methods have no counterpart, and the table compares
    what training buys).
    """
    from prefixtune.train.config import FAMILY_RECIPE

    if not values.get("per_label"):
        return dict(values)
    recipe = {key: FAMILY_RECIPE[key] for key in ("balance", "prefix_projection", "init", "init_text",
                                                  "label_word_weight")}
    recipe["prefix_lr"] = FAMILY_RECIPE["lr"]
    return {**recipe, **values}


def load_compare_config(path: str | Path) -> dict[str, Any]:
    """CompareConfig fields from a JSON/YAML/TOML file (e.g. a previous run's config.json)."""
    from prefixtune.train.config import tomllib

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise CompareConfigError(f"--config {path}: cannot read it ({err.strerror})") from None
    if path.suffix not in (".json", ".yaml", ".yml", ".toml"):
        raise CompareConfigError(f"--config {path}: use a .json, .yaml or .toml file")
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        elif path.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as err:  # json, toml and yaml each raise their own error type
        raise CompareConfigError(f"--config {path}: not valid {path.suffix[1:].upper()} ({err})") from None
    if not isinstance(values, dict):
        raise CompareConfigError(f"--config {path}: expected a mapping of settings")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in fields(CompareConfig)}
    if unknown := sorted(set(values) - known):
        raise CompareConfigError(f"--config {path}: unknown settings {', '.join(unknown)}")
    return values


# ---- training -------------------------------------------------------------------------------------------

def train_method(method: str, cfg: CompareConfig, say=print, loaded=None, data=None,
                 threads: int | None = None) -> dict[str, Any]:
    """Train one method, in a child process when cfg.isolate; returns its summary, adapters and history."""
    run = Path(cfg.out) / method
    spec = {"method": method, "train": asdict(cfg.train_config(method)), "result": str(run / "result.json")}
    if not cfg.isolate:
        from prefixtune.eval.worker import run_training

        return run_training(spec, loaded=loaded, data=data, say=say)
    run.mkdir(parents=True, exist_ok=True)
    spec_path = run / "spec.json"
    atomic_write_text(spec_path, json.dumps(spec, indent=2))
    (run / "result.json").unlink(missing_ok=True)
    say(f"training {method} in a fresh process ({cfg.steps} steps x batch {cfg.batch_size})")
    env = dict(os.environ)
    if threads is not None:  # each child would otherwise pick its own count from the load at its start
        from prefixtune.runtime import THREADS_ENV

        env[THREADS_ENV] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "prefixtune.eval.worker", str(spec_path)], env=env)
    if proc.returncode != 0 or not (run / "result.json").is_file():
        error = run / "error.txt"
        detail = error.read_text().strip().splitlines()[-1] if error.is_file() else f"exit code {proc.returncode}"
        raise TrainingFailed(f"training {method} failed: {detail} (traceback: {error})")
    return json.loads((run / "result.json").read_text())


def result_row(method: str, trained: dict[str, Any] | None, evaluation: dict[str, Any], base_params: int) -> dict:
    s = (trained or {}).get("summary", {})
    row = {
        "method": method,
        "trained": trained is not None,
        "trainable_params": int(s.get("trainable params", 0)),
        "trainable_pct": float(s.get("trainable %", 0.0)),
        "adapter_bytes": int(s.get("all adapters bytes", 0)),  # the whole model's file for full fine-tuning
        "peak_train_memory_mb": float(s.get("peak memory MB", 0.0)),
        "train_memory_added_mb": float(s.get("memory added MB", 0.0)),  # the peak over the loaded model and data
        "train_seconds": float(s.get("train seconds", 0.0)),
        "train_tokens_per_s": float(s.get("real tokens/s", 0.0)),
        "steps": int(s.get("steps", 0)),
        "train_load_average": s.get("load average"),  # 1-minute load average of the machine while training
        "base_params": base_params,
    }
    row.update({k: v for k, v in evaluation.items() if k not in ("method", "samples")})
    return row
