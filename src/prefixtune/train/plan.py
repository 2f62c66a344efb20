"""Everything decided before the first step: model, data, adapters, tokenized rows, step count."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefixtune.adapter_folder import StoreError, validate_name
from prefixtune.data import DataBundle, DataError, Example
from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder, flat_to_kv, text_kv
from prefixtune.prefix.peft_io import load_adapter
from prefixtune.prefix.model import PrefixModel
from prefixtune.templates import fill_template, input_fields, is_task_template
from prefixtune.train.config import ConfigError, TrainConfig
from prefixtune.train.examples import Tokenized, tokenize
from prefixtune.train.label_words import PLACEHOLDER, distinctive_words, fill_label_words, mixed_words
from prefixtune.train.word_weights import word_token_ids


FAMILY_SUFFIX = "all"  # NAME-all: the unconditional adapter of a per-label family


@dataclass
class TrainPlan:
    loaded: Any  # LoadedModel
    data: DataBundle
    model: PrefixModel  # base + one encoder per adapter
    adapter_labels: dict[str, str | None]  # adapter name -> the label it is conditioned on (per-label)
    template: str  # prompt template used for every row
    train_rows: list[Tokenized]
    val_rows: list[Tokenized]
    truncated: int  # examples cut to max_length
    pad_id: int
    total_steps: int
    accelerator: Any  # accelerate.Accelerator (one process unless launched with `accelerate launch`)
    family: str | None = None  # NAME-all, the unconditional adapter of a per-label family (--family-rate)
    method: Any = None  # train.methods.TrainMethod: what trains (prefix encoders, LoRA, ...)
    ddp: bool = False  # every rank of the launch trains these adapters on its share of each step's rows
    word_tokens: dict[str, list[int]] | None = None  # adapter -> its label's word tokens (--label-word-weight)

    @property
    def ranks(self) -> tuple[int, int]:
        """(rank, processes) of the DDP group this run trains in; (0, 1) when this process trains alone."""
        if not self.ddp:
            return 0, 1
        return self.accelerator.process_index, self.accelerator.num_processes


def select_rows(cfg: TrainConfig, data: DataBundle, split: str, say) -> list[Example]:
    rows = data.split(split)
    if cfg.labels:
        known = set(data.labels or [])
        unknown = [label for label in cfg.labels if label not in known]
        if unknown:
            raise DataError(f"--labels {','.join(unknown)} not in the data's labels ({', '.join(sorted(known))})")
        rows = [r for r in rows if r.label in set(cfg.labels)]
    if cfg.balance and data.labels and split == "train":
        by_label: dict[str, list[Example]] = defaultdict(list)
        for r in rows:
            by_label[r.label].append(r)
        least = min(len(v) for v in by_label.values())
        rng = random.Random(cfg.seed)
        rows = [r for label in sorted(by_label) for r in rng.sample(by_label[label], least)]
        rng.shuffle(rows)
        say(f"balanced: {least} rows per label x {len(by_label)} labels")
    limit = cfg.max_examples if split == "train" else cfg.eval_examples
    if limit is not None and len(rows) > limit:
        # A seeded sample, not the head of the file: the head of a sorted file can miss labels.
        rows = random.Random(cfg.seed + (split != "train")).sample(rows, limit)
    return rows


def start_from(encoder: PrefixEncoder, folder: str, say) -> None:
    """Continue a saved adapter: its embedding + MLP when saved and shaped alike, else its folded prefix."""
    saved = load_adapter(folder, encoder.shape)
    if saved.num_virtual_tokens != encoder.config.num_virtual_tokens:
        raise ConfigError(f"--init-from {folder} has {saved.num_virtual_tokens} virtual tokens; pass "
                          f"--num-virtual-tokens {saved.num_virtual_tokens}")
    state = saved.trainable
    if state is not None and set(state) == set(encoder.state_dict()) and all(
            state[k].shape == v.shape for k, v in encoder.state_dict().items()):
        encoder.load_state_dict(state)
        say(f"starting from {folder} (embedding + MLP)")
    else:
        encoder.init_from_kv(flat_to_kv(saved.flat, encoder.shape))
        say(f"starting from {folder} (its folded prefix)")


def split_rows(cfg: TrainConfig, data: DataBundle, say=print) -> tuple[str, list[Example], list[Example]]:
    """The template and the train/eval rows a run uses; every trainer (prefix, LoRA) calls this one."""
    labelled = data.labels is not None
    template = cfg.resolved_template() if (labelled or cfg.template is not None) else ""
    if "{label}" in template and not labelled:
        raise DataError(f"template {template!r} uses {{label}} but {cfg.data} has no labels")
    train_ex = select_rows(cfg, data, "train", say)
    if "validation" in data.splits:
        val_ex = select_rows(cfg, data, "validation", say)
    else:  # hold out a seeded sample of train (not its head: a file sorted by label would give one label)
        k = max(1, min(cfg.eval_examples, len(train_ex) // 20))
        held = set(random.Random(cfg.seed + 7).sample(range(len(train_ex)), k))
        val_ex = [ex for i, ex in enumerate(train_ex) if i in held]
        train_ex = [ex for i, ex in enumerate(train_ex) if i not in held]
        say(f"no validation split: holding out {k} training rows for evaluation")
    if not train_ex:
        raise DataError(f"{cfg.data}: no training rows left after filtering")
    return template, train_ex, val_ex


def tokenize_rows(cfg: TrainConfig, loaded, template: str, train_ex: list[Example], val_ex: list[Example],
                  adapter_of, say, val_adapter_of=None) -> tuple[list[Tokenized], list[Tokenized], int]:
    """Train and eval rows as token ids (+ how many training rows --max-length changed); prefix and LoRA alike.

    `val_adapter_of` picks the eval rows' adapters when it differs from training's (default: the same)."""
    val_adapter_of = val_adapter_of or adapter_of
    if is_task_template(template):  # input fields -> target: inputs are shortened first, never silently the target
        train_rows, truncated = _task_rows(train_ex, loaded, template, adapter_of, cfg, say)
        return train_rows, _task_rows(val_ex, loaded, template, val_adapter_of, cfg, say, "eval")[0], truncated
    train_rows, truncated = tokenize(train_ex, loaded.tokenizer, template, adapter_of, cfg.max_length)
    val_rows, _ = tokenize(val_ex, loaded.tokenizer, template, val_adapter_of, cfg.max_length)
    if truncated:
        say(f"truncated {truncated} of {len(train_rows)} training examples to --max-length {cfg.max_length}")
    return train_rows, val_rows, truncated


INIT_WORDS = 12  # words of `{label_words}` in an init text


def _label_words(cfg: TrainConfig, data: DataBundle, train_ex: list[Example]) -> dict[str, list[str]]:
    """Each label's distinctive words, for `{label_words}` and --label-word-weight ({} when neither is used).

    Counted over the whole training split, not only the rows this run samples (a few hundred rows rank
    "after", "to", "by" among a label's words); when eval rows come out of the training split (no validation
    split), over the run's training rows only."""
    weighted = cfg.weights_label_words
    if not weighted and not cfg.fills_label_words:
        return {}
    whole = "validation" in data.splits and "train" in data.splits
    pool = [ex for ex in (data.splits["train"] if whole else train_ex) if ex.label is not None]
    if not pool:
        raise ConfigError(f"--init-text with {PLACEHOLDER} and --label-word-weight need labelled training rows")
    return distinctive_words([ex.text for ex in pool], [ex.label for ex in pool],
                             k=max(INIT_WORDS, cfg.label_word_count if weighted else 0))


def _init_words(cfg: TrainConfig, words: dict[str, list[str]], adapter_labels: dict[str, str | None]
                ) -> dict[str, list[str]]:
    """Each adapter's `{label_words}` (its label's distinctive training words; a mix for the family)."""
    if not cfg.fills_label_words:
        return {}
    top = {label: ranked[:INIT_WORDS] for label, ranked in words.items()}
    return {name: top.get(label, []) if label is not None else mixed_words(top)
            for name, label in adapter_labels.items()}


def _word_tokens(cfg: TrainConfig, words: dict[str, list[str]], adapter_labels: dict[str, str | None],
                 tokenizer) -> dict[str, list[int]] | None:
    if not cfg.weights_label_words:
        return None
    return {name: word_token_ids(tokenizer, words.get(label, [])[:cfg.label_word_count])
            for name, label in adapter_labels.items() if label is not None}


def _task_rows(examples, loaded, template, adapter_of, cfg: TrainConfig, say, what: str = "training"):
    """Task rows and how many were changed (shortened inputs or cut targets), reported through `say`."""
    from prefixtune.models import max_positions
    from prefixtune.train.task_rows import tokenize_task

    limit = max_positions(loaded.model.config)
    context = None if limit is None else limit - cfg.num_virtual_tokens
    rows, counts = tokenize_task(examples, loaded.tokenizer, template, adapter_of, cfg.max_length, context)
    message = counts.describe(cfg.max_length, what)
    if message:
        say(message)
    return rows, counts.inputs_shortened + counts.targets_cut


def check_adapter_names(names) -> None:
    for name in names:
        try:
            validate_name(name)
        except StoreError as err:
            raise DataError(f"{err} (adapter names come from --name and, with --per-label, the labels)") from None


def row_adapters(cfg: TrainConfig, labels: list[str], template: str
                 ) -> tuple[dict[str, str | None], Callable[[Example], str], Callable[[Example], str], str | None]:
    """The run's adapters (name -> the label it is conditioned on, None for an unconditional one), the adapter
    each train row trains and each eval row is scored under, and the family's unconditional adapter (--family-rate)."""
    if not cfg.per_label:
        return {cfg.name: None}, (lambda ex: cfg.name), (lambda ex: cfg.name), None
    names = {label: f"{cfg.name}-{label}" for label in labels}
    adapter_labels: dict[str, str | None] = {name: label for label, name in names.items()}
    of_label = lambda ex: names[ex.label]  # noqa: E731
    if not cfg.family_rate:
        return adapter_labels, of_label, of_label, None
    family = f"{cfg.name}-{FAMILY_SUFFIX}"
    if family in adapter_labels or "{label}" in template:
        raise ConfigError(f"--family-rate trains {family!r}, the family's unconditional adapter: it needs a "
                          f"template without {{label}} and no label named {FAMILY_SUFFIX!r}")
    adapter_labels[family] = None
    # Label dropout, as classifier-free guidance trains its unconditional model: a seeded share of the rows
    # trains the family adapter instead of their label's (eval rows keep their label's).
    rng = random.Random(cfg.seed + 11)
    return adapter_labels, (lambda ex: family if rng.random() < cfg.family_rate else names[ex.label]), of_label, family


def add_prefixes(cfg: TrainConfig, model: PrefixModel, loaded, adapter_labels: dict[str, str | None],
                 words: dict[str, list[str]], say) -> None:
    """A prefix encoder per adapter (other methods build their own weights), started from the init text and
    --init-from."""
    prefix_cfg = PrefixConfig(cfg.num_virtual_tokens, cfg.prefix_projection, cfg.encoder_hidden_size,
                              cfg.init, cfg.init_text)
    for name in adapter_labels if cfg.method == "prefix" else ():
        encoder = model.add_adapter(name, prefix_cfg)
        if cfg.init == "text":
            # "{label}" in the init text gives each per-label adapter its own starting point.
            text = fill_label_words(fill_template(cfg.init_text, adapter_labels[name]), words.get(name, []))
            encoder.init_from_kv(text_kv(loaded.model, loaded.tokenizer, text, model.shape,
                                         cfg.num_virtual_tokens))
        if cfg.init_from:
            start_from(encoder, cfg.init_from, say)


def load_run_data(cfg: TrainConfig) -> DataBundle:
    from prefixtune.data import load_data

    return load_data(cfg.data, cfg.text_field, cfg.label_field, cfg.label_names,
                     input_fields=input_fields(cfg.template), skip_bad_rows=cfg.skip_bad_rows)


def plan_run(cfg: TrainConfig, loaded=None, data: DataBundle | None = None, say=print, accelerator=None,
             ddp: bool | None = None) -> TrainPlan:
    """`accelerator` defaults to a new one (train/distributed.make_accelerator); `ddp` (the ranks train these
    adapters together, each on its share of every step's rows) defaults to "launched on several processes"."""
    from prefixtune.models import load_base_model
    from prefixtune.train.distributed import load_device, make_accelerator

    accelerator = accelerator or make_accelerator(cfg, loaded)
    ddp = accelerator.num_processes > 1 if ddp is None else ddp
    shared = loaded is not None  # the caller's model: a method that changes its weights gives them back
    loaded = loaded or load_base_model(cfg.model, load_device(cfg, accelerator), cfg.dtype)
    data = data or load_run_data(cfg)
    if data.skipped:
        say(f"--skip-bad-rows: skipped {len(data.skipped)} bad row(s); first: {data.skipped[0]}")
    if cfg.per_label and data.labels is None:
        raise DataError(f"--per-label needs labelled data; {cfg.data} has no '{cfg.label_field}' field")
    template, train_ex, val_ex = split_rows(cfg, data, say)

    adapter_labels, adapter_of, eval_adapter_of, family = row_adapters(cfg, cfg.labels or (data.labels or []),
                                                                        template)
    check_adapter_names(adapter_labels)  # before training, not after it: a bad label must not cost a whole run
    model = PrefixModel(loaded.model)
    label_words = _label_words(cfg, data, train_ex)
    words = _init_words(cfg, label_words, adapter_labels)
    add_prefixes(cfg, model, loaded, adapter_labels, words, say)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()

    tok = loaded.tokenizer
    train_rows, val_rows, truncated = tokenize_rows(cfg, loaded, template, train_ex, val_ex, adapter_of, say,
                                                    eval_adapter_of)
    val_rows.sort(key=lambda r: len(r.input_ids))  # eval order is free; sorted batches barely pad

    processes = accelerator.num_processes if ddp else 1
    if cfg.batch_size < processes:
        raise ConfigError(f"--batch-size {cfg.batch_size} (rows per step, split over the processes) is fewer than "
                          f"the {processes} processes: use --batch-size {processes} or more")
    # A DDP step splits the same rows a one-process step takes, so the step count does not depend on it.
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size)))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if not ddp or accelerator.is_main_process:
        say(f"{len(adapter_labels)} adapter(s) on {loaded.name} ({model.shape.describe()}), "
            f"{len(train_rows)} train / {len(val_rows)} eval rows, {total} steps")
    from prefixtune.train.methods import build_method

    return TrainPlan(loaded, data, model, adapter_labels, template, train_rows, val_rows, truncated, pad_id,
                     total, accelerator, family, build_method(cfg, model, shared), ddp,
                     _word_tokens(cfg, label_words, adapter_labels, tok))
