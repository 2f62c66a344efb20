"""Tiny random models for tests: real architectures, tiny dimensions, the real SmolLM2 tokenizer.

Prefix shapes depend on layers / KV heads / head_dim, so each arch sets them to exercise a distinct case:
GQA (2 KV heads of 4) everywhere except gpt2 (MHA); qwen3 has head_dim != hidden/heads.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prefixtune.models import ensure_smollm2_cached

if TYPE_CHECKING:
    from prefixtune.store import AdapterStore

TINY_ARCHS = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma")

_HIDDEN, _LAYERS, _HEADS, _KV_HEADS, _FFN, _POSITIONS = 64, 2, 4, 2, 128, 256


@functools.lru_cache(maxsize=1)
def _cached_tokenizer() -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2_cached()))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # same convention as load_base_model
    return tokenizer


def make_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The bundled SmolLM2 tokenizer (49k vocab, chat template), loaded offline from the prefixtune cache.

    Returns a fresh copy each call, so a test that changes padding_side or adds tokens cannot leak
    into another test. The first call on a machine converts the GGUF (~40 s, once).
    """
    return copy.deepcopy(_cached_tokenizer())


def _config_kwargs(arch: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = len(tokenizer)
    if arch == "gpt2":  # GPT-2 names its dims differently and has no GQA
        return dict(n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, n_inner=_FFN, n_positions=_POSITIONS,
                    vocab_size=vocab, **special)
    kwargs: dict[str, Any] = dict(
        hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS, intermediate_size=_FFN, max_position_embeddings=_POSITIONS,
        vocab_size=vocab, **special,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = 32  # != hidden/heads (16): catches code that derives head_dim from hidden size
    if arch == "gemma":
        kwargs["head_dim"] = 16  # Gemma's default is 256, which would not match the tiny hidden size
    return kwargs


def make_tiny_model(arch: str = "llama", seed: int = 0, sharp: bool = False) -> PreTrainedModel:
    """A 2-layer random ``arch`` causal LM (fp32, eval mode) whose vocab matches make_tiny_tokenizer().

    A random tiny model attends almost uniformly (weights 0.02), so its output barely depends on which earlier
    tokens it saw; `sharp` scales q/k (x10) and v/o (x4) so that it does (llama-style attention only).
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")
    from transformers import AutoConfig

    config = AutoConfig.for_model(arch, **_config_kwargs(arch, _cached_tokenizer()))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if sharp:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj, scale in (("q_proj", 10), ("k_proj", 10), ("v_proj", 4), ("o_proj", 4)):
                    getattr(layer.self_attn, proj).weight.mul_(scale)
    return model.eval()


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, sharp: bool = False) -> Path:
    """Save a tiny model + tokenizer with save_pretrained, so ``path`` works as ``--model path``."""
    path = Path(path)
    make_tiny_model(arch, seed, sharp).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def write_random_adapter(root: str | Path, name: str, loaded: Any, tokens: int = 4,
                         seed: int = 0, scale: float = 3.0, fingerprint: str | None = None,
                         base: str | None = None, shape: Any = None, **manifest_fields: Any) -> Path:
    """A random prefix adapter in exactly the folder format training writes, as root/name.

    `scale` > 1 makes the prefix strong enough to change greedy output; `fingerprint`/`base`/`shape`
    let a test fake an adapter trained on another model.
    """
    from prefixtune.adapter_folder import Manifest, shape_dict, write_adapter_folder
    from prefixtune.prefix.encoder import PrefixConfig, PrefixEncoder
    from prefixtune.prefix.shapes import prefix_shape

    shape = shape or prefix_shape(loaded.model.config)
    torch.manual_seed(seed)
    config = PrefixConfig(num_virtual_tokens=tokens, prefix_projection=False)
    encoder = PrefixEncoder(shape, config)
    with torch.no_grad():
        encoder.embedding.weight.mul_(scale)
    manifest = Manifest(name=name, base_model=base or loaded.name,
                        base_fingerprint=fingerprint or loaded.fingerprint, shape=shape_dict(shape),
                        prefix=config.to_dict(), **manifest_fields)
    return write_adapter_folder(Path(root) / name, encoder.fold(), shape, config, manifest, encoder)


# Two adapters of different lengths, so the rows of a mixed batch differ in width: the engine tests' store.
ADAPTER_PAIR: dict[str, dict[str, Any]] = {"a": {"tokens": 4, "seed": 1}, "b": {"tokens": 7, "seed": 2}}


def write_random_store(root: str | Path, loaded: Any, adapters: dict[str, dict[str, Any]] | None = None
                       ) -> AdapterStore:
    """An AdapterStore at root holding a random adapter per name (its value: write_random_adapter's keywords);
    ADAPTER_PAIR when `adapters` is None."""
    from prefixtune.store import AdapterStore

    for name, kwargs in (ADAPTER_PAIR if adapters is None else adapters).items():
        write_random_adapter(root, name, loaded, **kwargs)
    return AdapterStore(root)


def engine_greedy(model: PreTrainedModel, prompts: list[list[int]], prefixes: list[torch.Tensor | None],
                  max_new_tokens: int, eos_ids: set[int] = frozenset(), tokenizer: Any = None) -> list[list[int]]:
    """Greedy tokens of raw prompts with folded prefixes (2L, kv_heads, P, head_dim) or None, from the engine
    every decode path runs (engine/offline.py), without a store or a PrefixLM."""
    from types import SimpleNamespace

    from prefixtune.engine.offline import run_requests
    from prefixtune.engine.requests import Request
    from prefixtune.engine.sampling import SamplingParams

    tokenizer = tokenizer or make_tiny_tokenizer()
    shell = SimpleNamespace(model=model, tokenizer=tokenizer, eos_ids=lambda: set(eos_ids),
                            layout_mask=lambda *_: None)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    requests = [Request(list(p), None, params, prefix=kv) for p, kv in zip(prompts, prefixes)]
    return [f.tokens for f in run_requests(shell, requests)]


def forward_logprobs(model_dir: str | Path, ids: list[int], adapter_folder: str | Path | None = None
                     ) -> list[float]:
    """log P(token i | tokens before it) for i >= 1 from one plain transformers forward of a fresh copy of the
    model (PEFT's prefix when `adapter_folder` is given): a reference independent of the engine."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_folder is not None:
        model = PeftModel.from_pretrained(model, str(adapter_folder))
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].float(), -1)
    return logp.gather(-1, x[0, 1:].view(-1, 1)).view(-1).tolist()
