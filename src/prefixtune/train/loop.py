"""The Trainer: one pass trains one adapter, or one adapter per label on mixed batches (train/run.py starts it)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefixtune.adapter_folder import StoreError
from prefixtune.train.checkpoint import (
    Progress,
    checkpoint_step,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from prefixtune.train.config import TrainConfig
from prefixtune.train.evaluation import eval_loss
from prefixtune.train.examples import collate, epoch_batches
from prefixtune.train.gradients import StepGradients
from prefixtune.train.interrupt import Interrupted
from prefixtune.train.plan import TrainPlan, plan_run
from prefixtune.train.preflight import check_out, claim_out, resume_command
from prefixtune.train.report import (
    format_summary,
    peak_memory_mb,
    plot_losses,
    preload_plotting,
    start_memory_window,
    LogWriteError,
    write_log,
)
from prefixtune.train.saving import publish


@dataclass
class TrainResult:
    out: Path  # run folder
    adapters: dict[str, Path]  # adapter name -> folder of the kept (best, else last) adapter; {} if interrupted
    summary: dict[str, Any]  # numbers printed at the end
    interrupted: bool = False  # stopped by SIGINT/SIGTERM after checkpointing
    warnings: list[str] = field(default_factory=list)  # e.g. a loss that did not fall


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


class Trainer:
    """The one training loop: every method (prefix, LoRA, ...) runs through it with the same features."""

    def __init__(self, cfg: TrainConfig, plan: TrainPlan, say=print, resume: bool | None = None,
                 resume_hint: str | None = None):
        self.cfg, self.plan, self.say = cfg, plan, say
        self.resume_hint = resume_hint or resume_command(cfg)  # what continues the run when it is interrupted
        self.resume = cfg.resume if resume is None else resume
        self.run_dir = Path(cfg.out)
        self.model = plan.model
        self.method = plan.method
        self.accelerator = plan.accelerator
        self.rank, self.processes = plan.ranks
        self.ddp_model = self.accelerator.prepare(self.model) if plan.ddp else self.model
        self.device = next(self.model.base.parameters()).device  # read after prepare() placed the model
        params = self.method.parameters()
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from transformers import get_scheduler

        self.total_steps = plan.total_steps
        self.scheduler = get_scheduler(
            {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule],
            self.optimizer,
            num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.progress = Progress(micro_batch_size=cfg.micro_batch_size or cfg.batch_size)
        self.warnings: list[str] = []
        self.is_main = self.rank == 0
        self.gradients = StepGradients(cfg, plan, self.ddp_model, self.device)

    # ---- one optimizer step -------------------------------------------------------------------
    def step(self, batch) -> tuple[float, int]:
        """One optimizer step; on OOM, halve the micro-batch (more accumulation) and retry."""
        while True:
            try:
                loss, _ = self.gradients.accumulate(batch, self.progress.step, self.progress.micro_batch_size)
                break
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                if not _is_oom(err):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                micro = self.progress.micro_batch_size
                if micro <= 1:
                    raise RuntimeError(
                        "out of memory even with micro-batch 1: use --gradient-checkpointing, a shorter "
                        "--max-length, fewer --num-virtual-tokens or --dtype bfloat16"
                    ) from err
                self.progress.micro_batch_size = micro // 2
                accum = math.ceil(self.cfg.batch_size / self.progress.micro_batch_size)
                self.say(
                    f"out of memory at micro-batch {micro}: continuing with micro-batch "
                    f"{self.progress.micro_batch_size} x {accum} accumulation steps (same effective batch)"
                )
        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, batch.real_tokens

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        rows = self.plan.val_rows
        if not rows:
            return {}
        # Twice the training micro-batch: inference keeps no activations for a backward pass, and on a CPU
        # the larger matmuls cut the final eval by ~10%. Halves on OOM like training does.
        size = 2 * self.progress.micro_batch_size
        while True:
            try:
                result = eval_loss(self.model, rows, self.plan.pad_id, size, self.device,
                                   prefix_of=self.method.prefix_of)
                break
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                if not _is_oom(err) or size <= 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                size //= 2
        return {"eval_loss": result.loss, "perplexity": math.exp(min(result.loss, 50)),
                "per_adapter": result.per_adapter}

    def _check_loss_falls(self) -> None:
        losses = [r["loss"] for r in self.progress.history if r.get("kind") == "train"]
        if len(losses) < 2 or self.progress.step != self.cfg.loss_check_steps:
            return
        window = min(10, len(losses) // 2)
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        if last > first * 0.98:
            msg = (
                f"the loss has not fallen after {self.progress.step} steps ({first:.3f} -> {last:.3f}). "
                f"Likely causes: learning rate too low (--lr {self.cfg.lr:g}; prefixes often want 1e-3 to 1e-2), "
                "prefix projection off (--no-prefix-projection trains slower; drop it), too few virtual tokens, "
                "or a template/data mismatch (check a tokenized row)."
            )
            self.warnings.append(msg)
            self.say(f"warning: {msg}")

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, plan, progress = self.cfg, self.plan, self.progress
        if self.resume:
            self.progress = progress = load_checkpoint(self.run_dir, self.method.load_state_dict, self.optimizer,
                                                       self.scheduler)
            self.say(f"resumed from {self.run_dir / 'checkpoint'} at step {progress.step}")
        memory_start = start_memory_window(self.device)
        if self.is_main:
            preload_plotting()  # the loss curve at the end then costs no import time
        bar = _progress_bar(self.total_steps, progress.step, cfg.progress and self.is_main)
        interrupted = Interrupted()
        with interrupted.installed():
            while progress.step < self.total_steps and interrupted.signal is None:
                batches = epoch_batches(plan.train_rows, cfg.batch_size, cfg.seed, progress.epoch)
                if not batches:  # plan_run refuses this; never spin through empty epochs
                    raise RuntimeError("no training batches")
                if progress.batch_in_epoch >= len(batches):
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
                    continue
                batch = collate([plan.train_rows[i] for i in batches[progress.batch_in_epoch]], plan.pad_id)
                started = time.perf_counter()
                loss, tokens = self.step(batch)
                progress.train_seconds += time.perf_counter() - started
                progress.tokens += tokens
                progress.batch_in_epoch += 1
                progress.step += 1
                tps = progress.tokens / max(progress.train_seconds, 1e-9)
                progress.history.append({"kind": "train", "step": progress.step, "loss": loss,
                                         "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps})
                grads = self.gradients
                if grads.contrast_rows:
                    progress.history[-1]["contrastive_loss"] = grads.contrast_seen / grads.contrast_rows
                self._check_loss_falls()
                postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tps:.0f}"}
                if (cfg.eval_every and progress.step % cfg.eval_every == 0) or progress.step == self.total_steps:
                    if self._eval_and_keep():
                        break
                if progress.best_eval is not None:
                    postfix["eval"] = f"{progress.best_eval:.3f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if cfg.save_every and progress.step % cfg.save_every == 0 and self.is_main:
                    self._checkpoint()
        bar.close()
        stopped = interrupted.signal is not None
        if self.is_main and (stopped or not cfg.save_every or progress.step % cfg.save_every):
            # A finished run writes its adapters next; the checkpoint is what a kill during that finish
            # resumes from (skipped when the periodic one of this very step already exists).
            self._checkpoint()
        if stopped:
            store = f"; {self.cfg.store} is untouched" if self.cfg.store else ""
            self.say(f"interrupted at step {progress.step}: checkpoint saved{store}. Continue with: "
                     f"{self.resume_hint}")
        return self._finish(stopped, memory_start)

    def _checkpoint(self) -> None:
        save_checkpoint(self.run_dir, self.method.state_dict(), self.optimizer, self.scheduler, self.progress)

    def _eval_and_keep(self) -> bool:
        """Evaluate, save the best adapters; True when early stopping says stop."""
        metrics = self.evaluate()
        if not metrics:
            return False
        progress = self.progress
        progress.history.append({"kind": "eval", "step": progress.step, **metrics})
        improved = progress.best_eval is None or metrics["eval_loss"] < progress.best_eval
        if improved:
            progress.best_eval = metrics["eval_loss"]
            progress.evals_without_gain = 0
            if self.is_main:
                with self._resumable():
                    self.method.save(self, self.run_dir / "best", metrics)
        else:
            progress.evals_without_gain += 1
        if self.is_main:
            self._write_log()
        if self.cfg.early_stopping and progress.evals_without_gain >= self.cfg.early_stopping:
            self.say(f"early stopping at step {progress.step}: no eval gain in {self.cfg.early_stopping} evals")
            return True
        return False

    def _write_log(self) -> None:
        with self._resumable():
            write_log(self.run_dir, self.progress.history)

    @contextmanager
    def _resumable(self) -> Iterator[None]:
        """An adapter, log or store write that fails (a full disk) loses no training: say how to go on."""
        try:
            yield
        except (StoreError, LogWriteError) as err:
            step = checkpoint_step(self.run_dir)
            kept = (f"the checkpoint in {self.run_dir / 'checkpoint'} (step {step}) is kept" if step is not None
                    else "no checkpoint was written yet")
            raise type(err)(f"{err}. {kept}; once that is fixed, continue with: {self.resume_hint}") from err

    def _check_ranks_agree(self) -> None:
        """DDP keeps replicas identical; prove it before rank 0 saves what it alone holds."""
        if self.processes < 2:
            return
        checksum = torch.stack([p.detach().double().sum() for p in self.method.parameters()]).sum()
        gathered = self.accelerator.gather(checksum.view(1).to(self.accelerator.device)).cpu()
        if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-9, atol=1e-9):
            raise RuntimeError(f"DDP ranks disagree on the trained prefixes: checksums {gathered.tolist()}")
        if self.is_main:
            self.say(f"ranks agree: {len(gathered)} processes, prefix checksum {float(gathered[0]):.6f}")

    def _finish(self, stopped: bool, memory_start: float | None = None) -> TrainResult:
        """Reports and adapters of a finished run; the store sees them only when the run completed."""
        progress, plan = self.progress, self.plan
        self._check_ranks_agree()
        if stopped or not self.is_main:
            if self.is_main:
                self._write_log()
            return TrainResult(self.run_dir, {}, {}, stopped, self.warnings)
        last_metrics = next((r for r in reversed(progress.history) if r.get("kind") == "eval"), {})
        self._write_log()
        plot_losses(progress.history, self.run_dir / "loss_curve.png")
        with self._resumable():
            last = self.method.save(self, self.run_dir / "last", last_metrics)
        # best/ is this run's own (a fresh run starts in an empty OUT); without an eval there is no best.
        best_root = self.run_dir / "best"
        use_best = progress.best_eval is not None
        result_dirs = {n: (best_root / n if use_best and (best_root / n).is_dir() else p) for n, p in last.items()}
        trainable = sum(p.numel() for p in self.method.parameters())
        base_params = sum(p.numel() for p in self.model.base.parameters()
                          if self.method.trains_base or not p.requires_grad)
        sizes = [(p / self.method.weights_file).stat().st_size for p in result_dirs.values()]
        summary = {
            "adapters": len(result_dirs),
            "steps": progress.step,
            "train rows": len(plan.train_rows),
            "trainable params": trainable,
            "trainable %": 100.0 * trainable / base_params,
            "adapter file bytes": sizes[0],  # one adapter (per-label adapters share the shape)
            "all adapters bytes": sum(sizes),
            "train seconds": progress.train_seconds,
            "real tokens/s": progress.tokens / max(progress.train_seconds, 1e-9),
            "best eval loss": progress.best_eval if progress.best_eval is not None else float("nan"),
            # CUDA: the allocator's peak; CPU: the process's peak resident memory; both reset when training started.
            "peak memory MB": peak_memory_mb(self.device),
            # What training itself added (gradients, optimizer state, activations) over the model and data.
            "memory added MB": peak_memory_mb(self.device) - memory_start if memory_start is not None else math.nan,
            "truncated examples": plan.truncated,
        }
        if self.cfg.store:
            with self._resumable():
                result_dirs = publish(self.cfg.store, result_dirs, self.say)
        self.say(format_summary(summary))
        return TrainResult(self.run_dir, result_dirs, summary, stopped, self.warnings)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def train_one(cfg: TrainConfig, accelerator, loaded, data, say, ddp: bool, resume_hint: str | None = None
              ) -> TrainResult:
    """One pass that trains all of cfg's adapters together: in this process alone, or as a rank of DDP."""
    main = not ddp or accelerator.is_main_process  # rank 0 of DDP owns OUT
    resume = check_out(cfg) if main else cfg.resume
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    plan = plan_run(cfg, loaded, data, say, accelerator, ddp)
    try:
        if main:
            claim_out(cfg, resume, say)
        if ddp:
            accelerator.wait_for_everyone()
        if not main:  # resume whatever checkpoint rank 0 kept (it clears OUT when there was none)
            resume = cfg.resume and has_checkpoint(Path(cfg.out))
        return Trainer(cfg, plan, say, resume=resume, resume_hint=resume_hint).run()
    finally:
        plan.method.close()
