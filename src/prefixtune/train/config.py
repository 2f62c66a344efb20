"""Training settings: one dataclass that the CLI flags and a YAML/TOML file both map onto."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from prefixtune.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad training setting (flag or config file); the message names it."""


DEFAULT_TEMPLATE = "Emotion: {label}\nText:"
PER_LABEL_TEMPLATE = "Text:"

# What `train --per-label` uses for every setting the user leaves out (and what `make demo` trains): chosen by
# the CPU-budget sweeps in docs/BENCHMARKS.md "Control quality". A direct prefix started from the keys/values of
# "i feel" and the label's most distinctive training words (train/label_words.py), lr 1e-2, balanced rows, the loss on
# each row's first label word weighted x10 (train/word_weights.py), a family adapter NAME-all learned by label
# dropout, and guidance x1.5 against that family adapter recommended in the manifests (it sharpens the label,
# not the data's style; x2 when there is no family adapter and the base model is the negative). Before the word
# weight the recommended scale was x3; the weighted adapters need less (x2 already cut distinct-2 to 0.69).
# The contrastive loss is off: at weight 1 it raised unguided accuracy (0.49 -> 0.60) but cost 0.55 nats of
# eval loss and broke words; at 0.1 it bought nothing, and either way a step costs 2x.
FAMILY_RECIPE: dict[str, Any] = dict(
    balance=True,
    prefix_projection=False,
    lr=1e-2,
    init="text",
    init_text="i feel {label_words}",
    family_rate=0.15,
    label_word_weight=10.0,
    guidance_scale=1.5,
)
BASE_GUIDANCE_SCALE = 2.0  # the recipe's scale when the negative is the base model (no family adapter)


@dataclass
class TrainConfig:
    """Everything a training run needs; saved into every adapter's manifest."""

    model: str = "smollm2-135m"  # base model: bundled name, hub id, local folder or .gguf path
    data: str = "dair-ai/emotion"  # hub dataset id, or a local folder/file
    out: str = "runs/train"  # run folder: checkpoints, logs, plots, adapters
    store: str | None = None  # also save the final adapters into this adapter store
    name: str = "emotion"  # adapter name (per-label: NAME-LABEL)
    text_field: str = "text"  # field holding the text (the target of a task template)
    label_field: str | None = "label"  # field holding the label (missing = plain text data)
    label_names: list[str] | None = None  # names for integer labels
    template: str | None = None  # prompt before the text; {label} and {row fields} are filled in (default per mode)
    per_label: bool = False  # one adapter per label, trained together in one pass
    labels: list[str] | None = None  # only these labels (default: all)
    balance: bool = False  # equal rows per label (downsample to the rarest)
    max_examples: int | None = None  # cap on training rows (quick runs)
    max_length: int = 256  # tokens per example; longer ones are truncated, task rows input first (counted)
    num_virtual_tokens: int = 20  # virtual tokens per adapter
    prefix_projection: bool = True  # train through the 2-layer MLP
    encoder_hidden_size: int | None = None  # MLP width (default: the model's hidden size)
    init: str = "random"  # random | zero | text
    init_text: str | None = None  # text whose keys/values start the prefix (init=text; {label_words} filled in)
    init_from: str | None = None  # start from this adapter folder (through its saved MLP when it has one)
    lr: float = 3e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.06  # share of steps spent warming up
    schedule: str = "cosine"  # cosine | linear | constant decay after warmup
    grad_clip: float = 1.0  # gradient norm clip
    batch_size: int = 8  # rows per optimizer step
    micro_batch_size: int | None = None  # rows per forward (default batch_size; halves on OOM)
    epochs: float = 1.0  # passes over the training rows (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps (overrides epochs)
    seed: int = 0  # seeds data order, init and sampling
    eval_every: int = 50  # steps between validation evals (0 = only at the end)
    eval_examples: int = 256  # validation rows per eval
    early_stopping: int = 0  # stop after this many evals without improvement (0 = off)
    save_every: int = 100  # steps between checkpoints
    loss_check_steps: int = 40  # warn if the loss has not fallen after this many steps
    gradient_checkpointing: bool = False  # trade compute for memory (works with prefixes here)
    device: str | None = None  # cpu | cuda | auto
    dtype: str | None = None  # float32 | bfloat16 | float16 | auto
    storage_dtype: str = "float32"  # dtype of the saved prompt embeddings (bfloat16 halves the file)
    autocast: str = "off"  # bf16: the frozen model's matmuls under CPU bf16 autocast; prefix weights stay float32
    resume: bool = False  # continue from out/checkpoint
    family_rate: float = 0.0  # per-label: share of rows that train NAME-all instead, the family's unconditional adapter
    label_word_weight: float = 1.0  # per-label: loss weight on the label's distinctive words (1 = plain LM loss)
    label_word_count: int = 64  # per-label: distinctive words per label that label_word_weight applies to
    contrastive_weight: float = 0.0  # per-label: weight of the loss that makes each prefix explain its own label best
    contrastive_negatives: int = 0  # per-label: other labels' prefixes scored per row for that loss (0 = all)
    guidance_scale: float | None = None  # per-label: guidance recommended in the manifests (None = none)
    progress: bool = True  # show a progress bar
    overwrite: bool = False  # replace a previous run in a non-empty out (default: refuse it)
    skip_bad_rows: bool = False  # skip (and count) malformed data rows instead of stopping at the first
    method: str = "prefix"  # what trains: prefix | lora | full (every method runs in the same loop)
    lora_r: int = 8  # LoRA rank (method=lora)
    lora_alpha: int = 16  # LoRA scaling numerator, update scaled by alpha / r (method=lora)
    lora_dropout: float = 0.0  # dropout on the LoRA input (method=lora)
    lora_targets: list[str] | None = None  # modules LoRA adapts; None = every attention projection (method=lora)
    distributed: str = "auto"  # accelerate launch: shard (rank r trains its own adapters) | ddp | auto (shard if exact)

    def resolved_template(self) -> str:
        if self.template is not None:
            return self.template
        return PER_LABEL_TEMPLATE if self.per_label else DEFAULT_TEMPLATE

    @property
    def weights_label_words(self) -> bool:
        """--label-word-weight is on (it weighs the label adapters of a per-label family)."""
        return self.per_label and self.label_word_weight != 1

    @property
    def fills_label_words(self) -> bool:
        """The init text asks for {label_words}: each label's distinctive training words."""
        from prefixtune.train.label_words import PLACEHOLDER

        return self.init == "text" and PLACEHOLDER in (self.init_text or "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Every setting checked before anything loads; bad values raise ConfigError naming the fix."""
        check_settings(self)
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise ConfigError("batch sizes must be >= 1")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be >= 1")
        if self.lr < 0:
            raise ConfigError("lr must be >= 0")
        if not 0 <= self.family_rate < 1:
            raise ConfigError(f"family_rate must be in [0, 1), got {self.family_rate}")
        if self.contrastive_weight < 0 or self.contrastive_negatives < 0:
            raise ConfigError("contrastive_weight and contrastive_negatives must be >= 0")
        if (self.family_rate or self.contrastive_weight or self.label_word_weight != 1) and not self.per_label:
            raise ConfigError("--family-rate, --contrastive-weight and --label-word-weight train a per-label family: "
                              "add --per-label")
        if not 0 < self.label_word_weight <= 1000 or self.label_word_count < 1:
            raise ConfigError(f"label_word_weight must be in (0, 1000] and label_word_count >= 1, got "
                              f"{self.label_word_weight} and {self.label_word_count}")
        if self.guidance_scale is not None and not (self.guidance_scale >= 0 and self.guidance_scale < 1e6):
            raise ConfigError(f"guidance_scale must be a number >= 0 (1 = off), got {self.guidance_scale}")


def with_family_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (settings given by the user) plus FAMILY_RECIPE for the ones not given, when per_label is on."""
    if not values.get("per_label"):
        return dict(values)
    recipe = dict(FAMILY_RECIPE)
    if "{label}" in (values.get("template") or ""):
        recipe.pop("family_rate")  # the family adapter needs one prompt for every label
        recipe["guidance_scale"] = BASE_GUIDANCE_SCALE
    return {**recipe, **values}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON file into TrainConfig keys; unknown keys are an error."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"{path}: config files are .yaml, .toml or .json")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return data


STORAGE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                   "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
METHODS = ("prefix", "lora", "full")
DISTRIBUTED = ("auto", "shard", "ddp")
SCHEDULES = ("cosine", "linear", "constant")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(value, name: str) -> None:
    _need(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, got {value!r}")


def check_settings(cfg: TrainConfig) -> None:
    """Value checks for every field (no I/O). Normalises storage_dtype aliases (fp16 -> float16)."""
    from prefixtune.adapter_folder import StoreError, validate_name
    from prefixtune.prefix.encoder import INIT_CHOICES

    key = str(cfg.storage_dtype).strip().lower().removeprefix("torch.")
    _need(key in STORAGE_ALIASES, f"--storage-dtype {cfg.storage_dtype!r}: use float32, bfloat16 or float16 "
                                  "(fp32/bf16/fp16 are accepted too)")
    cfg.storage_dtype = STORAGE_ALIASES[key]
    _need(cfg.method in METHODS, f"--method {cfg.method!r}: use one of {', '.join(METHODS)}")
    _need(cfg.autocast in ("off", "bf16"), f"--autocast {cfg.autocast!r}: use off or bf16")
    _need(cfg.distributed in DISTRIBUTED,
          f"--distributed {cfg.distributed!r}: use one of {', '.join(DISTRIBUTED)} (docs/DISTRIBUTED.md)")
    _need(cfg.schedule in SCHEDULES, f"schedule must be cosine, linear or constant, got {cfg.schedule!r}")
    for name in ("lr", "weight_decay", "warmup_ratio", "grad_clip", "epochs", "lora_dropout"):
        _finite(getattr(cfg, name), f"--{name.replace('_', '-')}")
    _need(0 <= cfg.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    _need(cfg.grad_clip > 0, f"--grad-clip must be > 0, got {cfg.grad_clip}")
    _need(cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}")
    _need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    for name in ("num_virtual_tokens", "max_length"):
        _need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1,
              f"--{name.replace('_', '-')} must be a whole number >= 1, got {getattr(cfg, name)!r}")
    _need(cfg.max_length >= 2, f"--max-length must be >= 2 (a prompt token and a scored one), got {cfg.max_length}")
    _need(cfg.num_virtual_tokens <= 4096, f"--num-virtual-tokens {cfg.num_virtual_tokens} is absurd; use <= 4096")
    for name in ("eval_every", "eval_examples", "early_stopping", "save_every", "loss_check_steps"):
        _need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 0,
              f"--{name.replace('_', '-')} must be a whole number >= 0, got {getattr(cfg, name)!r}")
    if cfg.max_examples is not None:
        _need(cfg.max_examples >= 1, f"--max-examples must be >= 1, got {cfg.max_examples}")
    if cfg.encoder_hidden_size is not None:
        _need(cfg.encoder_hidden_size >= 1, f"--encoder-hidden-size must be >= 1, got {cfg.encoder_hidden_size}")
    _need(cfg.init in INIT_CHOICES, f"--init {cfg.init!r}: use one of {', '.join(INIT_CHOICES)}")
    _need(cfg.init != "text" or bool(cfg.init_text),
          "--init text needs --init-text (the text whose keys/values start the prefix)")
    _need(cfg.lora_r >= 1, f"--lora-r must be >= 1, got {cfg.lora_r}")
    _need(0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.method in ("lora", "full"):
        what = {"lora": "LoRA trains one adapter", "full": "full fine-tuning trains one model"}[cfg.method]
        _need(not cfg.per_label, f"--per-label is prefix-only: {what} with the label in the prompt")
        _need(cfg.init_from is None, f"--init-from continues a prefix adapter; it does not apply to --method "
                                     f"{cfg.method}")
        _need(not cfg.store, f"--store holds prefix adapters; a --method {cfg.method} run keeps its weights in OUT "
                             f"(drop --store)")
    _need(not (cfg.resume and cfg.overwrite), "--resume continues OUT and --overwrite replaces it: pick one")
    try:
        validate_name(cfg.name)
    except StoreError as err:
        raise ConfigError(f"--name: {err}") from None
    if cfg.device is not None or cfg.dtype is not None:
        from prefixtune.models import resolve_device_dtype

        try:
            resolve_device_dtype(cfg.device, cfg.dtype)
        except ValueError as err:
            raise ConfigError(str(err)) from None
