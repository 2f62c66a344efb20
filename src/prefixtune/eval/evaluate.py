"""Evaluate one way of producing text (a prefix adapter or family, LoRA, or a written prompt) on a split.

Every method is described the same way, a prompt (and optionally a prefix adapter) per label, so eval loss,
sampling, judging and latency are measured by one code path for all of them.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from prefixtune.data import DataBundle, DataError, Example
from prefixtune.engine.guidance import is_guided
from prefixtune.eval.judge import Judge, check_judge_labels
from prefixtune.eval.metrics import CopyIndex, conditioning, copy_rate, distinct_n, reference_scores
from prefixtune.eval.quality import judged_stats, quality_report
from prefixtune.eval.report import fmt
from prefixtune.prefix.model import PrefixModel
from prefixtune.train.evaluation import eval_loss as token_eval_loss
from prefixtune.train.examples import tokenize

__all__ = ["EvalSettings", "Method", "evaluate_method", "measure_latency"]


@dataclass
class EvalSettings:
    """How a method is evaluated; shared by `prefixtune eval` and `prefixtune compare`."""

    split: str = "test"  # split to evaluate on
    eval_examples: int | None = 256  # rows of the split scored for eval loss (a seeded sample; None = all)
    samples_per_label: int = 8  # generated samples per label for conditioning accuracy
    seed: int = 0  # seeds row sampling and every sample's own random stream
    max_new_tokens: int = 40  # tokens per generated sample
    temperature: float = 1.0  # sampling temperature for the samples (0 = greedy); 1 = the model's own distribution
    top_p: float = 1.0  # nucleus sampling mass (guided rows have their own plausibility floor)
    min_p: float = 0.0  # drop tokens under min_p x the likeliest one's probability (0 = the model's own tail)
    eval_batch_size: int = 16  # rows per forward pass when scoring and generating
    max_length: int = 256  # tokens per scored example (longer ones are truncated)
    latency_tokens: int = 32  # tokens per row when timing generation
    latency_repeats: int = 3  # timed runs (the median is reported)
    reference_field: str | None = None  # field with reference outputs: adds BLEU, chrF and ROUGE-L
    reference_rows: int = 100  # rows scored against references (task adapters: distinct inputs)
    num_beams: int = 1  # task adapters: decode each input with beam search of this width (1 = greedy)
    progress: bool = True  # show progress bars
    guidance_scale: float | None = None  # samples' guidance (1 = off; None = what each adapter recommends)
    guidance_negative: str | None = None  # the unconditioned adapter guidance contrasts with (none = base model)
    guidance_sweep: list[float] | None = None  # also sample at each of these scales: accuracy vs diversity vs length
    real_stats: bool = True  # length/diversity/perplexity of as many real texts beside the samples' (and ceiling)


@dataclass
class Method:
    """What a method feeds the model for each label: a prompt and maybe a prefix adapter."""

    name: str  # shown in reports: "prefix", "lora", "prompt", or the adapter name
    prompts: dict[str | None, str]  # label (None = unlabelled) -> rendered prompt before the text
    adapters: dict[str | None, str | None] = field(default_factory=dict)  # label -> prefix adapter (None = none)
    prefix_length: float = 0.0  # virtual tokens (prefix) or instruction tokens (prompt) per request

    @property
    def labels(self) -> list[str | None]:
        return list(self.prompts)

    def adapter(self, label: str | None) -> str | None:
        return self.adapters.get(label)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def _sample_rows(rows: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(rows) <= limit:
        return list(rows)
    # Seeded, not the file's head: sorted files would otherwise miss whole labels.
    return random.Random(seed).sample(rows, limit)


@torch.no_grad()
def eval_loss(lm, method: Method, rows: list[Example], settings: EvalSettings) -> dict[str, Any]:
    """Mean cross-entropy per text token (prompt tokens unscored), exactly as training scores it."""
    tok = lm.tokenizer
    groups: dict[str | None, list[Example]] = {}
    skipped = 0
    for ex in rows:
        key = ex.label if None not in method.prompts else None
        if key not in method.prompts:
            skipped += 1  # e.g. a per-label family without an adapter for this label
            continue
        groups.setdefault(key, []).append(ex)
    tokenized = []
    for label, examples in groups.items():
        adapter = method.adapter(label)
        part, _ = tokenize(examples, tok, method.prompts[label], lambda ex, a=adapter: a, settings.max_length)
        tokenized.extend(part)
    if not tokenized:
        raise DataError(f"{method.name}: no rows of the '{settings.split}' split to score (labels without a "
                        f"prompt or adapter: {skipped} rows)")
    tokenized.sort(key=lambda r: len(r.input_ids))  # similar lengths together: little padding
    model = PrefixModel(lm.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bar = _bar(len(tokenized), f"{method.name}: eval loss", settings.progress)
    result = token_eval_loss(model, tokenized, pad_id, settings.eval_batch_size, lm.device,
                       prefix_of=lambda a: None if a is None else lm.adapter(a).kv, bar=bar)
    bar.close()
    loss, total_tokens = result.loss, result.tokens
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50)), "eval_rows": len(tokenized),
            "eval_tokens": total_tokens, "skipped_rows": skipped}


def generate_texts(lm, prompts: list[str], adapters: list, seeds: list[int], settings: EvalSettings,
                   desc: str, temperature: float | None = None, guidance_scale: float | None = None,
                   lora_base=None, **generate_kwargs: Any) -> list[str]:
    """Samples in batches of settings.eval_batch_size, stripped, with a progress bar. `lora_base` (a LoRA method's
    disable_adapter) guides LoRA rows against the base; `generate_kwargs` go to PrefixLM.generate as they are."""
    texts: list[str] = []
    bar = _bar(len(prompts), desc, settings.progress)
    temp = settings.temperature if temperature is None else temperature
    scale = settings.guidance_scale if guidance_scale is None else guidance_scale
    # A LoRA method's base context is its PeftModel's disable_adapter: the engine runs that model's LoRA rows and
    # their guidance companions (LoRA off) in one batch.
    lora = getattr(lora_base, "__self__", None) if lora_base is not None and is_guided(scale) else None
    for start in range(0, len(prompts), settings.eval_batch_size):
        stop = start + settings.eval_batch_size
        batch = [o.text for o in lm.generate(
            prompts[start:stop], adapters[start:stop], max_new_tokens=settings.max_new_tokens,
            temperature=temp, top_p=settings.top_p, min_p=settings.min_p, seed=seeds[start:stop],
            guidance_scale=scale, guidance_negative=None if lora is not None else settings.guidance_negative,
            lora=lora, **generate_kwargs)]
        texts.extend(t.strip() for t in batch)
        bar.update(len(batch))
    bar.close()
    return texts


def start_prompt(lm, prompt: str) -> str:
    """An empty prompt (a plain-text adapter has no template) cannot start generation: start from BOS."""
    return prompt or lm.tokenizer.bos_token or lm.tokenizer.eos_token


def sample_seeds(settings: EvalSettings) -> list[int]:
    # Sample i of every label (and of every method) draws from the same seeded stream: differences between
    # labels or methods then come from the conditioning, not from luck.
    return [settings.seed * 100_003 + i for i in range(settings.samples_per_label)]


def generate_samples(lm, method: Method, settings: EvalSettings, guidance_scale: float | None = None,
                     lora_base=None) -> list[dict[str, Any]]:
    """samples_per_label samples per label in one mixed batch (each row its own prompt/adapter/seed)."""
    prompts, adapters, labels, seeds = [], [], [], []
    for label in method.labels:
        for seed in sample_seeds(settings):
            prompts.append(start_prompt(lm, method.prompts[label]))
            adapters.append(method.adapter(label))
            labels.append(label)
            seeds.append(seed)
    texts = generate_texts(lm, prompts, adapters, seeds, settings, f"{method.name}: samples",
                      guidance_scale=guidance_scale, lora_base=lora_base)
    return [{"label": label, "seed": seed, "adapter": adapter, "text": text}
            for label, seed, adapter, text in zip(labels, seeds, adapters, texts)]


def _timed(lm, prompts: list[str], adapters: list[str | None], tokens: int) -> float:
    start = time.perf_counter()
    lm.generate(prompts, adapters, max_new_tokens=tokens, ignore_eos=True)
    return time.perf_counter() - start


def measure_latency(lm, method: Method, settings: EvalSettings, base_prompts: list[str] | None = None,
                    base_context=None) -> tuple[float, float | None]:
    """(method, base model) milliseconds per generated token of a row, all labels decoding in one batch.

    The base model runs `base_prompts` without any adapter (inside `base_context()`, e.g. LoRA disabled). Runs
    alternate method/base and the medians are compared, so a busy machine slows both alike; one untimed
    full-length run first, because the first pass over each new sequence length pays one-time setup costs.
    """
    n = settings.latency_tokens
    prompts = [start_prompt(lm, method.prompts[label]) for label in method.labels]
    adapters = [method.adapter(label) for label in method.labels]
    runs = [(prompts, adapters, None)]
    if base_prompts is not None:
        runs.append(([start_prompt(lm, p) for p in base_prompts], [None] * len(base_prompts), base_context))
    times: list[list[float]] = [[] for _ in runs]
    for repeat in range(max(1, settings.latency_repeats) + 1):
        for i, (p, a, context) in enumerate(runs):
            with context() if context is not None else nullcontext():
                elapsed = _timed(lm, p, a, n)
            if repeat > 0:  # repeat 0 is the warm-up
                times[i].append(elapsed)
    medians = [1000.0 * statistics.median(t) / n for t in times]
    return medians[0], (medians[1] if len(medians) > 1 else None)


def reference_eval(lm, method: Method, data_inputs: list[Example], references: list[str],
                   settings: EvalSettings) -> dict[str, Any]:
    """Greedy outputs for `prompt + input text` scored against the references (BLEU, chrF, ROUGE-L)."""
    index = list(range(len(data_inputs)))
    if len(index) > settings.reference_rows:
        index = sorted(random.Random(settings.seed).sample(index, settings.reference_rows))
    prompts, adapters, refs = [], [], []
    for i in index:
        ex = data_inputs[i]
        key = ex.label if None not in method.prompts else None
        if key not in method.prompts:
            continue
        prompts.append(f"{method.prompts[key]} {ex.text}" if method.prompts[key] else ex.text)
        adapters.append(method.adapter(key))
        refs.append(references[i])
    if not prompts:
        raise DataError(f"{method.name}: no rows with references to score")
    outputs = generate_texts(lm, prompts, adapters, [0] * len(prompts), settings, f"{method.name}: references",
                        temperature=0.0)
    scores = reference_scores(outputs, refs)
    scores["examples"] = [{"prompt": p, "output": o, "reference": r}
                          for p, o, r in list(zip(prompts, outputs, refs))[:5]]
    return scores


def guidance_sweep(lm, method: Method, settings: EvalSettings, judge: Judge | None, say=print, lora_base=None
                   ) -> list[dict[str, Any]]:
    """The same samples (same seeds) at each guidance scale: accuracy vs distinct-2 vs length."""
    ceiling = getattr(judge, "macro_accuracy", None)
    rows = []
    for scale in settings.guidance_sweep or []:
        samples = generate_samples(lm, method, settings, guidance_scale=scale, lora_base=lora_base)
        row = {"guidance_scale": scale, "ceiling": ceiling, **judged_stats(samples, judge, method.labels)}
        row["examples"] = {s["label"]: s["text"] for s in samples[:: max(1, settings.samples_per_label)]}
        rows.append(row)
        say(f"{method.name}: guidance {scale:g}: accuracy {fmt(row['accuracy'], '{:.3f}')}, "
            f"{row['mean_words']:.1f} words, distinct-2 {row['distinct_2']:.2f}, degenerate {row['degenerate']:.0%}")
    return rows


def _judge_samples(samples: list[dict[str, Any]], method: Method, judge: Judge | None, say) -> dict | None:
    """Conditioning figures of labelled samples (each gets its "judged" label); None without samples or a judge."""
    labelled = [label for label in method.labels if label is not None]
    if not (samples and labelled and judge is not None):
        return None
    check_judge_labels(judge, labelled)
    judged = judge.predict([s["text"] for s in samples])
    for s, j in zip(samples, judged):
        s["judged"] = j
    cond = conditioning([s["label"] for s in samples], judged, labelled)
    say(f"{method.name}: conditioning accuracy {cond.accuracy:.3f} over {cond.samples} samples")
    return cond.to_dict()


def evaluate_method(lm, method: Method, data: DataBundle, settings: EvalSettings, judge: Judge | None,
                    base_prompts: list[str] | None = None, base_context=None,
                    references: list[str] | None = None, say=print) -> dict[str, Any]:
    """All metrics for one method: loss, samples (+ judge, diversity, copying), latency, references.

    Latency overhead is measured against the bare base model on `base_prompts` (run inside `base_context()`).
    """
    rows = _sample_rows(data.split(settings.split), settings.eval_examples, settings.seed)
    result: dict[str, Any] = {"method": method.name, "prefix_length": method.prefix_length,
                              "adapters": {str(k): v for k, v in method.adapters.items() if v is not None}}
    result.update(eval_loss(lm, method, rows, settings))
    say(f"{method.name}: eval loss {result['eval_loss']:.4f} (perplexity {result['perplexity']:.2f}) on "
        f"{result['eval_rows']} {settings.split} rows")

    first = next((a for a in method.adapters.values() if a is not None), None)
    if first is not None:  # the guidance the samples get: the caller's, else what the adapter recommends
        scale, negative = lm.guidance(first, settings.guidance_scale, settings.guidance_negative)
        result["guidance"] = {"scale": scale, "negative": negative}
    # A LoRA method (no prefix adapters, a base context) is guided by the same settings as a prefix.
    lora_base = base_context if base_context is not None and not method.adapters else None
    if lora_base is not None and is_guided(settings.guidance_scale):
        result["guidance"] = {"scale": settings.guidance_scale, "negative": None}
    samples = generate_samples(lm, method, settings, lora_base=lora_base) if settings.samples_per_label > 0 else []
    texts = [s["text"] for s in samples]
    result["conditioning"] = _judge_samples(samples, method, judge, say)
    result["conditioning_accuracy"] = result["conditioning"]["accuracy"] if result["conditioning"] else None
    index = CopyIndex([ex.text for ex in data.split("train")]) if "train" in data.splits else None
    result["distinct_1"] = distinct_n(texts, 1)
    result["distinct_2"] = distinct_n(texts, 2)
    result["copy_rate"] = copy_rate(texts, index) if index is not None else None
    result["samples"] = samples
    result["quality"] = None
    if samples and settings.real_stats:
        result["quality"] = quality_report(lm, samples, data, method.labels, settings.split,
                                           settings.samples_per_label, settings.seed, judge, settings.eval_batch_size)
        q = result["quality"]
        say(f"{method.name}: samples {q['samples']['mean_words']:.1f} words, distinct-2 "
            f"{q['samples']['distinct_2']:.2f}, degenerate {q['samples']['degenerate']:.0%} "
            f"(real text: {q['real'].get('mean_words', 0):.1f} words, distinct-2 {q['real'].get('distinct_2', 0):.2f})")
    result["guidance_sweep"] = (guidance_sweep(lm, method, settings, judge, say, lora_base)
                                if settings.guidance_sweep else None)

    latency = base = None
    if settings.latency_repeats > 0:
        latency, base = measure_latency(lm, method, settings, base_prompts, base_context)
    result["latency_ms_per_token"] = latency
    result["base_latency_ms_per_token"] = base
    result["latency_overhead_pct"] = 100.0 * (latency / base - 1.0) if latency is not None and base else None

    result["references"] = None
    if references is not None:
        result["references"] = reference_eval(lm, method, data.split(settings.split), references, settings)
        r = result["references"]
        say(f"{method.name}: BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}, ROUGE-L {r['rouge_l']:.2f}")
    return result
