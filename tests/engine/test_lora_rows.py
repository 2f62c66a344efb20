"""LoRA rows in the engine: a LoRA model is a runner mode, and a guided LoRA row's companion runs with LoRA off in the
same forward (PEFT's adapter_names); the result equals two full forwards per step combined as for a prefix."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from prefixtune.engine.guidance import guided_logits
from prefixtune.engine.lm import PrefixLM
from prefixtune.models import load_base_model

PROMPTS = ["Text: i feel", "Emotion: joy\nText:"]


def _reference(lm, peft_model, prompt, scale, steps):
    """Greedy guided tokens from full forwards (no cache), LoRA on for one, off for the other."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    out = []
    for _ in range(steps):
        cond = lm.model(input_ids=ids).logits[:, -1]
        with peft_model.disable_adapter():
            uncond = lm.model(input_ids=ids).logits[:, -1]
        token = int(guided_logits(cond, uncond, scale, eos_ids=sorted(lm.eos_ids()), layout=lm.layout_mask())
                    .argmax(-1))
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return lm.tokenizer.decode(out, skip_special_tokens=True)


@torch.no_grad()
def test_lora_guided_greedy_equals_two_full_forwards_and_scale_one_is_plain_lora(tiny_model_dir, tmp_path):
    loaded = load_base_model(str(tiny_model_dir), device="cpu", dtype="float32")  # its own copy: LoRA edits it
    torch.manual_seed(0)
    peft_model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False)).eval()
    lm = PrefixLM(loaded, tmp_path / "store")
    got = [g.text for g in lm.generate(PROMPTS, None, max_new_tokens=6, guidance_scale=3.0, lora=peft_model)]
    assert got == [_reference(lm, peft_model, p, 3.0, 6) for p in PROMPTS]
    plain = [g.text for g in lm.generate(PROMPTS, [None, None], max_new_tokens=6)]
    assert [g.text for g in lm.generate(PROMPTS, None, max_new_tokens=6, guidance_scale=1.0, lora=peft_model)] == plain
    assert got != plain  # the guidance changed something
    with peft_model.disable_adapter():
        bare = [g.text for g in lm.generate(PROMPTS, None, max_new_tokens=6)]
    assert bare != plain  # LoRA changes the model (else the companion's mode would go untested)
