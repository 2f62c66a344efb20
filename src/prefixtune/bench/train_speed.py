"""Training speed: prefixtune vs the peer recipe (PEFT prefix tuning + HF Trainer, padding to 128).

Both train the same rows (label in the prompt), batch, steps, learning rate and init; both are then
scored by the same eval function on the same validation rows, so "faster at the same or lower eval
loss" is read off one table.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass

import torch

from prefixtune.prefix.encoder import flat_to_kv
from prefixtune.prefix.model import PrefixModel
from prefixtune.train.config import TrainConfig
from prefixtune.train.evaluation import eval_loss
from prefixtune.train.examples import Tokenized


@dataclass
class SpeedResult:
    method: str  # "prefixtune" or "peft+trainer (pad 128)"
    seconds: float  # wall time of the training steps
    real_tokens: int  # non-pad tokens trained on
    eval_loss: float  # on the shared validation rows

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / max(self.seconds, 1e-9)


def adapter_eval_loss(model: PrefixModel, flat: torch.Tensor, rows: list[Tokenized], pad_id: int) -> float:
    """Eval loss of one folded prefix on every row, whichever method trained it."""
    kv = flat_to_kv(flat.to(next(model.base.parameters())), model.shape)  # (2L, kv_heads, P, head_dim)
    device = next(model.base.parameters()).device
    return eval_loss(model, rows, pad_id, 8, device, prefix_of=lambda _: kv).loss


def peer_model(loaded, cfg: TrainConfig):
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(loaded.model, PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=True,
        encoder_hidden_size=loaded.model.config.hidden_size))


class Padded(torch.utils.data.Dataset):
    """The peer recipe's dataset: every row padded (or cut) to 128 tokens, prompt tokens masked."""

    def __init__(self, rows: list[Tokenized], pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        ids = r.input_ids[:128]
        pad = 128 - len(ids)
        labels = [-100] * r.prompt_len + ids[r.prompt_len:]
        return {
            "input_ids": torch.tensor(ids + [self.pad_id] * pad),
            "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
            "labels": torch.tensor(labels[:128] + [-100] * pad),
        }


def run_peer(model, rows: list[Tokenized], cfg: TrainConfig, pad_id: int, on_cpu: bool):
    """PEFT + HF Trainer with every row padded to 128 tokens, as the measured peer recipe."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps,
            learning_rate=cfg.lr, warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), lr_scheduler_type="cosine", max_grad_norm=1.0,
            report_to=[], save_strategy="no", logging_steps=10**6, use_cpu=on_cpu,
            dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Padded(rows, pad_id))
        real = 0
        original = trainer.training_step

        def counting_step(model_, inputs, *a, **k):
            nonlocal real
            real += int(inputs["attention_mask"].sum())
            return original(model_, inputs, *a, **k)

        trainer.training_step = counting_step
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    flat = model.get_prompt_embedding_to_save("default").detach().float()  # (P, 2L*kv_heads*head_dim)
    return seconds, real, flat


def run(loaded, data, steps: int = 10, rows: int = 256, say=print) -> list[SpeedResult]:
    from prefixtune.train.loop import Trainer as OurTrainer
    from prefixtune.train.plan import plan_run

    cfg = TrainConfig(model=loaded.name, data=data.source, out=tempfile.mkdtemp(prefix="prefixtune-bench-"),
                      max_examples=rows, max_steps=steps, eval_every=0, eval_examples=64, save_every=0,
                      progress=False, loss_check_steps=10**9)
    plan = plan_run(cfg, loaded, data, say=lambda *_: None)
    trainer = OurTrainer(cfg, plan, say=lambda *_: None)
    peer = peer_model(loaded, cfg)
    # Same starting weights for both, so the eval losses differ only by how each trained.
    trainer.model.encoders[cfg.name].load_state_dict(peer.prompt_encoder["default"].state_dict())
    start = time.perf_counter()
    trainer.run()
    ours_s = time.perf_counter() - start
    flat = trainer.model.encoders[cfg.name].fold()
    results = [SpeedResult("prefixtune", trainer.progress.train_seconds, trainer.progress.tokens,
                           adapter_eval_loss(plan.model, flat, plan.val_rows, plan.pad_id))]
    say(f"prefixtune: {steps} steps in {ours_s:.1f} s (training steps {trainer.progress.train_seconds:.1f} s)")
    peer_s, peer_tokens, peer_flat = run_peer(peer, plan.train_rows, cfg, plan.pad_id, loaded.device.type == "cpu")
    eval_model = PrefixModel(loaded.model)
    results.append(SpeedResult("peft+trainer (pad 128)", peer_s, peer_tokens,
                               adapter_eval_loss(eval_model, peer_flat, plan.val_rows, plan.pad_id)))
    for r in results:
        if math.isnan(r.eval_loss):
            say(f"warning: {r.method} eval loss is NaN")
    return results
