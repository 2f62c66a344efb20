"""LoRA guidance: the adapted and the bare model in two forwards per step, combined as for a prefix."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from prefixtune.engine.guidance import guided_logits
from prefixtune.engine.lm import PrefixLM
from prefixtune.eval.lora_guided import generate_lora_guided
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
                                                         init_lora_weights=False))
    lm = PrefixLM(loaded, tmp_path / "store")
    got = generate_lora_guided(lm, PROMPTS, [0, 1], 6, 0.0, 1.0, 3.0, peft_model.disable_adapter)
    assert got == [_reference(lm, peft_model, p, 3.0, 6) for p in PROMPTS]
    plain = [g.text for g in lm.generate(PROMPTS, [None, None], max_new_tokens=6)]
    assert generate_lora_guided(lm, PROMPTS, [0, 1], 6, 0.0, 1.0, 1.0, peft_model.disable_adapter) == plain
    assert got != plain  # the guidance changed something
