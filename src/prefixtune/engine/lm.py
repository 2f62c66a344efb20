"""PrefixLM: one frozen base model, many adapters, swapped or mixed per row without reloading.

An adapter is read from disk once, folded to its keys/values (2L, kv_heads, P, head_dim) on the model's
device, and kept in an LRU bounded by count and bytes; a swap is a dictionary lookup, a miss one small
safetensors read. The base model is never touched.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prefixtune.adapter_folder import Manifest, StoreError, check_compatible, read_manifest
from prefixtune.engine.adapter_cache import AdapterCache, CachedAdapter
from prefixtune.engine.beam import check_beam_request
from prefixtune.engine import compose
from prefixtune.engine.generation import Generation, keep_best, sample_rows, to_generations
from prefixtune.engine.guidance import is_guided, layout_mask, validate_scale
from prefixtune.engine.offline import run_requests
from prefixtune.engine.rows import build_requests
from prefixtune.engine.runner import logits_width
from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.structured import StructuredOutput
from prefixtune.engine.scoring import Score, score_texts, with_adapters
from prefixtune.prefix.encoder import flat_to_kv
from prefixtune.prefix.peft_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from prefixtune.prefix.shapes import prefix_shape
from prefixtune.store import AdapterStore, default_store
from prefixtune.templates import fill_template, input_fields, is_task_template


class PrefixLM:
    """Generate with any adapter of a store; a batch may mix adapters and base-model rows (None)."""

    def __init__(self, loaded, store: AdapterStore | str | Path | None = None, cache_size: int = 64,
                 cache_bytes: int | None = None, force: bool = False):
        self.loaded = loaded  # LoadedModel (models.load_base_model)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.shape = prefix_shape(self.model.config)
        if store is None or isinstance(store, (str, Path)):
            store = AdapterStore(store if store is not None else default_store())
        self.store = store
        self.cache = AdapterCache(cache_size, cache_bytes)
        self.force = force  # load adapters from another base model when the shapes match
        self.paths: dict[str, Path] = {}  # adapters registered from outside the store
        self.warnings: list[str] = []  # warnings issued so far (--force loads, missing guidance negatives)
        self._layout: torch.Tensor | None = None  # layout_mask(), built on first use
        self.compiled_decode = None  # engine/compiled.CompiledDecode: every Scheduler over this model uses it
        self.max_compose = compose.MAX_COMPOSE  # parts a composed adapter ("a+b") may have

    @classmethod
    def load(cls, model: str = "smollm2-135m", store: str | Path | None = None, device: str | None = None,
             dtype: str | None = None, compile: bool = False, quantize: str | None = None, max_batch: int = 16,
             **kwargs: Any) -> PrefixLM:
        """Load the base model once; kwargs: cache_size, cache_bytes, force. `quantize="int8"|"fp16"`: quantized
        frozen base (prefixtune.quantize); `compile`: a compiled decode step warmed up for `max_batch` rows."""
        from prefixtune.models import load_base_model
        from prefixtune.quantize import check_quantize, quantize_model

        quantize = check_quantize(quantize)  # a bad value fails before the model loads
        loaded = load_base_model(model, device=device, dtype=dtype)
        quantize_model(loaded.model, quantize)
        lm = cls(loaded, store, **kwargs)
        if compile:
            from prefixtune.engine.compiled import compile_decode

            compile_decode(lm, max_batch)
        return lm

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- adapters -------------------------------------------------------------------------------
    def register(self, name: str, folder: str | Path) -> str:
        """Serve an adapter from a folder outside the store under `name` (it shadows a store adapter)."""
        folder = Path(folder).expanduser()
        if not (folder / CONFIG_FILE).is_file():
            raise StoreError(f"{folder} is not an adapter folder (no {CONFIG_FILE})")
        self.paths[name] = folder
        self.cache.drop(name)
        return name

    def unload(self, name: str) -> bool:
        self.paths.pop(name, None)
        return self.cache.drop(name)

    def available(self) -> list[str]:
        return sorted(set(self.store.names()) | set(self.paths))

    def _exists(self, name: str) -> bool:
        """One stat, no store listing (the server asks per request)."""
        if compose.is_composed(name):
            return all(self._exists(part) for part in compose.parts_of(name, limit=None))
        return name in self.paths or self.store.exists(name)

    def _folder(self, name: str) -> Path:
        return self.paths[name] if name in self.paths else self.store.folder(name)

    def adapter(self, name: str) -> CachedAdapter:
        """Folded prefix of `name`, from the LRU or from disk (checked against the base model).

        A cached entry is reused only while its weights file is the same one (an atomic rewrite makes a
        new file), so retraining into the store is picked up without a restart. A composed name ("a+b") is
        the parts' prefixes side by side (engine/compose.py, concat mode).
        """
        if compose.is_composed(name):
            return compose.concat_adapter(self, name)
        folder = self._folder(name)
        stamp = _stamp(folder)
        item = self.cache.get(name)
        if item is not None and item.stamp == stamp and item.folder == folder:
            return item
        start = time.perf_counter()
        manifest = read_manifest(folder)
        if manifest is not None and name not in self.paths:
            manifest.name = name  # the folder name is the truth
        # The manifest check comes first: it names both models, where a raw shape error could not.
        warning = check_compatible(manifest, self.shape, self.loaded.fingerprint, self.loaded.name, self.force)
        if warning:
            self._warn_once(warning)
        loaded = load_adapter(folder, self.shape)
        # Move the contiguous flat tensor, then view it: no extra copy here, since stack_prefixes pads
        # (copies) each prefix per batch anyway; a .contiguous() would only double the load cost.
        flat = loaded.flat.to(self.device, self.dtype)  # (P, 2L*kv_heads*head_dim)
        kv = flat_to_kv(flat, self.shape)  # (2L, kv_heads, P, head_dim), a view of flat
        item = CachedAdapter(kv, manifest, (time.perf_counter() - start) * 1000, stamp, folder)
        self.cache.put(name, item)
        return item

    def guidance(self, adapter: str | None, scale: float | None = None, negative: str | None = None
                 ) -> tuple[float, str | None]:
        """(scale, negative adapter or None = base model) for rows of `adapter`.

        What the caller gives wins, field by field; else the adapter manifest's recommendation (written by
        training or eval when they measured one); else no guidance. `negative="none"` is the base model.
        """
        if adapter is None:
            if scale is not None and is_guided(scale):
                raise ValueError("guidance needs an adapter row: the base model has nothing to sharpen")
            return 1.0, None
        if compose.is_composed(adapter):
            return compose.concat_guidance(self, adapter, scale, negative)
        recommended = (self.manifest(adapter) or Manifest.empty()).guidance or {}
        given_scale = scale is not None
        scale = float(recommended.get("scale", 1.0)) if scale is None else scale
        validate_scale(scale)
        if not is_guided(scale):
            return float(scale), None
        if negative is None:
            negative = recommended.get("negative")
            if negative is not None and not self._exists(negative):
                # The manifest names its family's adapter; copied alone into another store, the adapter
                # still generates rather than failing every request.
                fallback = "against the base model" if given_scale else "without guidance"
                self._warn_once(f"adapter {adapter!r} recommends guidance against {negative!r}, which is not in "
                                f"the store: generating {fallback}. Fix: add {negative!r} to the store or pass "
                                f"a guidance negative")
                if not given_scale:
                    return 1.0, None
                negative = None
        if negative is not None and negative.lower() == "none":
            negative = None
        if negative is not None:
            if negative == adapter:
                raise ValueError(f"guidance_negative {negative!r} is the adapter itself; name another adapter")
            self.adapter(negative)  # unknown or incompatible: fail now, naming it
        return float(scale), negative

    def _warn_once(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            print(message, file=sys.stderr)

    def manifest(self, name: str) -> Manifest | None:
        return self.adapter(name).manifest

    def template(self, name: str | None) -> str | None:
        if name is None:
            return None
        manifest = self.manifest(name)
        return manifest.template if manifest else None

    def render(self, prompt: str, adapter: str | None, label: str | None = None, chat: bool = False,
               inputs: dict[str, str] | None = None) -> str:
        """The prompt as the adapter was trained: its template filled with `label`, then `prompt` after it.

        Training saw "<template> <text>", so generation continues "<template>" (or "<template> <prompt>").
        A task adapter's template names row fields: `inputs` gives them ({"meaning_representation": ...}).
        """
        if inputs is not None:
            from prefixtune.engine.task import render_task

            prompt = render_task(self.manifest(adapter) if adapter is not None else None, adapter, inputs, label,
                                 prompt)
        elif label is not None:
            if adapter is None:
                raise ValueError("--label fills an adapter's training template; the base model has none")
            manifest = self.manifest(adapter)
            template = manifest.template if manifest else None
            if not template:
                raise ValueError(
                    f"adapter {adapter!r} has no training template (an imported PEFT adapter, or trained on "
                    "plain text); pass the whole prompt instead of --label"
                )
            if is_task_template(template):
                raise ValueError(f"adapter {adapter!r} fills the fields {', '.join(input_fields(template))} of a row; "
                                 f"pass them as inputs (generate --input '{{...}}') rather than only --label")
            if "{label}" in template:
                if manifest.labels and label not in manifest.labels:
                    raise ValueError(f"adapter {adapter!r} knows labels {', '.join(manifest.labels)}, not {label!r}")
                template = fill_template(template, label)
            elif manifest.label is not None and label != manifest.label:
                raise ValueError(
                    f"adapter {adapter!r} is conditioned on label {manifest.label!r}, not {label!r}; "
                    f"use the adapter for {label!r} or drop --label"
                )
            prompt = template + (" " + prompt if prompt else "")
        return self.chat_prompt(prompt) if chat else prompt

    def chat_prompt(self, text: str) -> str:
        """`text` as one user turn of the model's chat template, ready for the assistant's answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.loaded.name} has no chat template; drop --chat (base models have none)")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )

    # ---- generation -----------------------------------------------------------------------------
    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        extra = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
        return {i for i in ids if i is not None}

    def layout_mask(self, tokenizer: Any = None) -> torch.Tensor:
        """(V,) bool of the layout tokens guidance leaves to the adapter; computed once (~1 s), on first use.

        A thread other than the one that encodes prompts passes its own copy of the tokenizer: a fast
        tokenizer used from two threads at once fails ("Already borrowed").
        """
        if self._layout is None:
            vocab = logits_width(self.model)
            self._layout = layout_mask(tokenizer or self.tokenizer, vocab).to(self.device)
        return self._layout

    def encode(self, prompts: Sequence[str], add_special_tokens: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Left-padded ids and mask (B, T) and each prompt's length."""
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left",
                             add_special_tokens=add_special_tokens)
        lengths = enc.attention_mask.sum(-1).tolist()
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"prompt(s) {empty} tokenize to nothing; give each row some text")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device), lengths

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], adapters: Sequence[str | None] | str | None = None,
                 max_new_tokens: int = 40, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | Sequence[int | None] | None = None, stop: Sequence[str] | None = None,
                 ignore_eos: bool = False, chat: bool = False, guidance_scale: float | None = None,
                 guidance_negative: str | None = None, num_samples: int = 1, num_beams: int = 1,
                 length_penalty: float = 1.0, no_repeat_ngram_size: int = 0, early_stopping: bool = False,
                 min_p: float = 0.0, lora: Any = None, num_return_sequences: int = 1, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                 logit_bias: dict[int, float] | None = None, structured: StructuredOutput | None = None,
                 logprobs: int | None = None, compose_mode: str | None = None,
                 compose_weights: Sequence[float] | None = None, best_of: int | None = None) -> list[Generation]:
        """One result per prompt and sample; rows may use different adapters (None = the base model).

        temperature 0 is greedy; a seed fixes a row's sampling stream independently of its batch mates; min_p > 0
        drops tokens under min_p x the likeliest token's probability. chat=True wraps each prompt in the model's
        chat template. guidance_scale > 1 sharpens each adapter row against an unconditioned row run beside it:
        the base model, or the adapter named by guidance_negative ("none" = the base model). None uses what the
        adapter's manifest recommends (else 1 = off). num_samples=N gives N results per prompt, prompt by
        prompt, sample i seeded with seed + i.
        num_beams > 1 runs beam search (engine/beam.py, with length_penalty, no_repeat_ngram_size,
        early_stopping; no guidance); num_return_sequences gives each prompt's n best hypotheses, best first, as
        n results. Each row's beams keep its adapter, so a mixed batch still works.
        lora: a PeftModel whose LoRA weights are injected into this model: its rows (adapter None) run with
        LoRA, and guidance_scale guides them against the same model with LoRA off (one forward, PEFT's
        adapter_names), as compare does. logprobs=N records each token's log-probability and its N likeliest
        alternatives (engine/logprobs.py says of which distribution).
        presence_penalty, frequency_penalty (OpenAI's), repetition_penalty (vLLM's) and logit_bias apply to
        every row (engine/penalties.py); structured=StructuredOutput(json=schema | regex= | grammar= | choice=)
        makes every row's text match it (engine/structured.py).
        A row's adapter may be composed: a tuple of adapter names or "a+b" (engine/compose.py). compose_mode
        "guidance" (default) runs a product of experts, each part guided against its own negative at its
        compose_weights entry (else guidance_scale, else compose.part_scales); "concat" runs one row with the
        parts' prefixes side by side. best_of=N (composed guidance rows only) draws N samples per prompt and keeps
        the num_samples whose evidence (Generation.score) is highest, best first. All of it runs on the serving
        engine (engine/offline.py), stepped in this thread.
        """
        prompts, adapters = with_adapters(prompts, adapters)
        beam = num_beams != 1 or bool(no_repeat_ngram_size)
        adapters = compose.composed_names(adapters, compose_mode, self.max_compose, beam=beam, weights=compose_weights)
        prompts, adapters, seeds = sample_rows(prompts, adapters, seed, num_samples, best_of)
        per = max(num_samples, best_of or 1)
        if per > num_samples:
            compose.check_best_of(adapters, compose_mode, beam)
        if beam:  # guidance a manifest recommends applies to sampling, not to beam search
            check_beam_request(num_beams, max_new_tokens, length_penalty, no_repeat_ngram_size, early_stopping,
                               temperature, ignore_eos, guidance_scale, num_samples, num_return_sequences, min_p)
        elif num_return_sequences != 1:
            raise ValueError("num_return_sequences gives a beam search's n best: pass num_beams >= it (or use "
                             "num_samples for sampled variants)")
        if not prompts:
            return []
        if chat:
            prompts = [self.chat_prompt(p) for p in prompts]
        guide = (1.0, None) if beam else (guidance_scale, guidance_negative)
        base = SamplingParams(max_new_tokens, temperature, top_p, top_k, None, list(stop or []), ignore_eos, 1.0,
                              num_beams, length_penalty, no_repeat_ngram_size, early_stopping, num_return_sequences,
                              min_p, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              repetition_penalty=repetition_penalty, logit_bias=dict(logit_bias or {}),
                              structured=structured, logprobs=logprobs)
        experts = {a: compose.build_experts(self, a, compose_weights, *guide) for a in dict.fromkeys(adapters)
                   if compose.check_mode(compose_mode) == "guidance" and compose.is_composed(a)}
        requests = build_requests(self, prompts, adapters, seeds, base, guide, lora, add_special_tokens=not chat,
                                  experts=experts)
        results = to_generations(run_requests(self, requests, lora), requests, num_return_sequences, logprobs)
        return results if per == num_samples else keep_best(results, per, num_samples)

    def score(self, texts: Sequence[str], adapters: Sequence[str | None] | str | None = None,
              top_logprobs: int = 0, guidance_scale: float | None = None, guidance_negative: str | None = None,
              add_special_tokens: bool = True) -> list[Score]:
        """Each text's tokens and log-probabilities under its adapter (None = the base model), as the server's
        `echo` gives them: of the distribution a row samples from (guided by the manifest's recommendation unless
        guidance_scale says otherwise; 1 = the adapter alone). Runs on the serving engine (engine/scoring.py)."""
        return score_texts(self, texts, adapters, top_logprobs, guidance_scale, guidance_negative, add_special_tokens)


def _stamp(folder: Path) -> tuple[int, ...]:
    path = folder / WEIGHTS_FILE
    try:
        st = os.stat(path if path.is_file() else folder / CONFIG_FILE)
    except FileNotFoundError:
        raise StoreError(f"adapter folder {folder} disappeared while loading; retry") from None
    return st.st_ino, st.st_mtime_ns, st.st_size


__all__ = ["AdapterCache", "CachedAdapter", "Generation", "PrefixLM", "Score"]
