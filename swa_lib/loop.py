"""The one training loop. Every method runs through it; methods differ only by strategy hooks.

The loop owns: the optimizer step, gradient synchronisation (over the group the
strategy names), the learning rate (a pure function of the fractional epoch, asked of
the strategy), evaluation, batch-norm recompute for averaged models, timing of every
phase, TensorBoard logging, checkpoints and resume, and the NaN guard.

Exact resume: data order and augmentation are functions of (seed, epoch), the LR is a
function of the fractional epoch, and the checkpoint holds model, optimizer, strategy
(averages, phase) and every RNG state. So the "scheduler state" is just (epoch, step),
and a run resumed at an epoch boundary on the CPU is bitwise identical to one that
never stopped (tests/test_loop.py checks this).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from swa_lib.averaging import bn_buffers, update_bn_
from swa_lib.checkpoint import CheckpointManager, atomic_torch_save, rng_state, set_rng_state
from swa_lib.comm import allreduce_gradients_
from swa_lib.schedules import build_lr_fn, peak_lr


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf; the last good checkpoint is left as it was."""


@dataclass
class TrainContext:
    """What strategies may use. They read it; only the loop advances epoch and step."""

    cfg: object
    comm: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    lr_fn: Callable[[float], float]
    workload: object
    logger: object
    update_bn: Callable[[nn.Module], None] = None
    run_dir: Path | None = None  # where the run's files go (methods may save per-worker results here)
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken


@dataclass
class PhaseTimer:
    """Wall seconds per named phase (train, eval, bn_update, checkpoint, and method phases)."""

    device: torch.device
    totals: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def pick_device(cfg, comm) -> torch.device:
    want = cfg.run.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda, but torch sees no GPU here; use run.device=cpu")
        return torch.device("cuda", comm.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class Trainer:
    """Runs one config with one strategy from start (or the latest checkpoint) to the end."""

    def __init__(self, cfg, comm, workload, strategy, logger, run_dir: Path):
        self.cfg, self.comm, self.workload, self.strategy, self.logger = cfg, comm, workload, strategy, logger
        self.run_dir = Path(run_dir)
        self.device = workload.device
        self.timer = PhaseTimer(self.device)
        self.rank0 = comm.rank == 0
        self.history: list[dict] = []
        self.wall_offset_s = 0.0
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every process
        model = workload.build_model()
        o = cfg.optim
        optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                                    nesterov=o.nesterov, weight_decay=o.weight_decay)
        lr_fn = build_lr_fn(cfg.schedule, peak_lr(o, o.batch_size * comm.size))
        self.ctx = TrainContext(cfg, comm, model, optimizer, self.device, lr_fn, workload, logger, run_dir=self.run_dir)
        self.ctx.update_bn = self._update_bn
        strategy.setup(self.ctx)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", comm, cfg.run.keep_checkpoints)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.run.amp and self.device.type == "cuda" else contextlib.nullcontext())

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        c = self.ctx
        return {"epoch": c.epoch, "step": c.step, "phase": self.strategy.phase,
                "model": c.model.state_dict(), "optimizer": c.optimizer.state_dict(),
                "strategy": self.strategy.state_dict(), "rng": rng_state(), "history": self.history,
                "timers": dict(self.timer.totals), "wall_s": self._wall_s()}

    def save_checkpoint(self, pin: bool = False) -> None:
        """Checkpoint every rank; `pin` keeps the generation out of pruning (phase boundaries)."""
        self._check_finite_weights()
        with self.timer("checkpoint"):
            self.checkpoints.save(self._state(), f"e{self.ctx.epoch:04d}-{self.strategy.phase}", pin=pin)

    def maybe_resume(self) -> bool:
        if not self.cfg.run.resume:
            return False
        state = self.checkpoints.load_latest(map_location=self.device)
        if state is None:
            return False
        c = self.ctx
        c.model.load_state_dict(state["model"])
        c.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        set_rng_state({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state["rng"].items()})
        c.epoch, c.step = state["epoch"], state["step"]
        self.history, self.timer.totals, self.wall_offset_s = state["history"], state["timers"], state["wall_s"]
        self.last_train = self.history[-1].get("train") if self.history else None
        return True

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        self._start = time.perf_counter()
        if self.maybe_resume() and self.rank0:
            print(f"resumed from epoch {self.ctx.epoch} (step {self.ctx.step}, phase {self.strategy.phase})")
        epochs = self.cfg.schedule.epochs
        bar = tqdm(total=epochs, initial=self.ctx.epoch, desc="epochs", unit="ep", dynamic_ncols=True,
                   disable=not (self.rank0 and self.cfg.run.progress), mininterval=1.0)
        stop_at = epochs if self.cfg.run.stop_after_epochs is None else min(
            epochs, self.ctx.epoch + self.cfg.run.stop_after_epochs)
        while self.ctx.epoch < stop_at and not self.strategy.finished():
            phase_before = self.strategy.phase
            metrics = self._train_epoch(self.ctx.epoch)
            self.last_train = metrics  # the epoch's training loss/accuracy, kept in the history
            self.ctx.epoch += 1
            self.strategy.after_epoch(self.ctx.epoch - 1, metrics)
            last = self.ctx.epoch == stop_at or self.strategy.finished()
            boundary = self.strategy.phase != phase_before  # evaluated and checkpointed (pinned)
            if last or boundary or self.ctx.epoch % self.cfg.eval.every_epochs == 0:
                results = self.evaluate()
                bar.set_postfix({k: f"{v['acc']:.4f}" for k, v in results.items()}, refresh=False)
            every = self.cfg.run.checkpoint_every_epochs
            periodic = every and self.ctx.epoch % every == 0 and not self.strategy.isolated
            if last or boundary or periodic:
                self.save_checkpoint(pin=boundary)
            bar.update(1)
        bar.close()
        if self.ctx.epoch < epochs and not self.strategy.finished():
            return {"output_name": self.strategy.output_name, "stopped_at_epoch": self.ctx.epoch,
                    "final": {}}  # paused: the checkpoint above lets the next invocation continue
        return self._finish()

    def _train_epoch(self, epoch: int) -> dict:
        c, cfg, strategy = self.ctx, self.cfg, self.strategy
        shard = strategy.data_shard(epoch)
        loader = self.workload.train_loader(shard)
        loader.set_epoch(epoch)
        group = strategy.gradient_group()
        n_batches = len(loader)
        c.model.train()
        epoch_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, correct, n
        window = torch.zeros(3, dtype=torch.float64, device=self.device)
        phase = strategy.phase
        with self.timer("train"), self.timer(f"phase/{phase}"):
            start = time.perf_counter()
            for i, (x, y) in enumerate(loader):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                lr = strategy.lr(epoch + i / n_batches)
                for g in c.optimizer.param_groups:
                    g["lr"] = lr
                with self.autocast:
                    out = c.model(x)
                    loss = self.workload.loss_fn(out, y)
                c.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if group is not None and group.size > 1:
                    allreduce_gradients_(c.comm, c.model, group)  # Distributed: mean gradient over the group
                c.optimizer.step()
                c.step += 1
                with torch.no_grad():
                    window += torch.stack([loss.detach().double() * len(y), (out.argmax(1) == y).sum().double(),
                                           torch.tensor(float(len(y)), dtype=torch.float64, device=self.device)])
                strategy.after_step(c.step)
                if c.step % cfg.run.log_every_steps == 0 or i == n_batches - 1:
                    epoch_sums += window
                    self._log_window(window, lr, epoch + (i + 1) / n_batches)
                    window.zero_()
                if cfg.eval.every_steps and c.step % cfg.eval.every_steps == 0:
                    with self.timer("eval_steps"):
                        self.evaluate(mid_epoch=True)
            elapsed = time.perf_counter() - start
        eval_group = strategy.eval_group()
        c.comm.allreduce_([epoch_sums], op="sum", group=eval_group)  # Distributed: metrics of the whole group
        loss_sum, correct, count = epoch_sums.tolist()
        metrics = {"loss": loss_sum / count, "acc": correct / count}
        images = n_batches * shard.batch_size * c.comm.size
        values = {"train/epoch_loss": metrics["loss"], "train/epoch_acc": metrics["acc"],
                  "train/images_per_s": images / elapsed, "time/wall_s": self._wall_s()}
        if eval_group.size < c.comm.size and not strategy.isolated:
            # Distributed: each group trains a model of its own (SWAP phase 2); rank 0 logs every one.
            per_group = c.comm.allgather_object((eval_group.index, eval_group.rank, metrics))
            values.update({f"train_worker{index}/epoch_{k}": v for index, rank_in_group, m in per_group
                           if rank_in_group == 0 for k, v in m.items()})
        self.logger.scalars(values, c.step, epoch=epoch + 1, phase=phase)
        return metrics

    def _log_window(self, window: torch.Tensor, lr: float, epoch: float) -> None:
        loss_sum, correct, count = window.tolist()
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"training loss is {loss_sum / count} at step {self.ctx.step} (epoch {epoch:.2f}, lr {lr:.4g}, "
                f"phase {self.strategy.phase}); stopped without saving, so the last good checkpoint in "
                f"{self.checkpoints.directory} is intact. Try a lower optim.lr or more schedule.warmup_epochs.")
        self.logger.scalars({"train/loss": loss_sum / count, "train/acc": correct / count, "train/lr": lr},
                            self.ctx.step, epoch=round(epoch, 4))

    def _check_finite_weights(self) -> None:
        for name, p in self.ctx.model.named_parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteLossError(f"parameter {name} holds NaN/inf at step {self.ctx.step}; "
                                         f"the checkpoint was not overwritten")

    # ------------------------------------------------------------------ evaluation
    def _update_bn(self, model: nn.Module) -> None:
        with self.timer("bn_update"):
            epoch = max(self.ctx.epoch - 1, 0)
            loader = self.workload.train_loader(self.strategy.data_shard(epoch))
            loader.set_epoch(epoch)  # the batches must not depend on what the cached loader did last (resume)
            update_bn_(model, loader, comm=self.comm, group=self.strategy.eval_group(),
                       max_batches=self.cfg.eval.bn_update_batches, device=self.device)

    @torch.no_grad()
    def _evaluate_one(self, model: nn.Module, group) -> dict:
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in self.workload.test_loader(group.rank, group.size):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast:
                out = model(x)
            loss = nn.functional.cross_entropy(out.float(), y, reduction="sum")
            sums += torch.stack([loss.double(), (out.argmax(1) == y).sum().double(),
                                 torch.tensor(float(len(y)), dtype=torch.float64, device=self.device)])
        self.comm.allreduce_([sums], op="sum", group=group)  # Distributed: the group covers the test set
        model.train(was_training)
        loss_sum, correct, count = sums.tolist()
        return {"loss": loss_sum / count, "acc": correct / count}

    def evaluate(self, mid_epoch: bool = False) -> dict:
        """Evaluate the training model and every averaged model; log; return {name: metrics}."""
        with self.timer("eval"):
            group = self.strategy.eval_group()
            train_group = self.strategy.gradient_group()
            if train_group is not None and train_group.size > 1:
                # Distributed: replicas share weights but each kept BN running statistics of its own
                # batches; evaluate one model, the mean of them (what DDP's buffer broadcast aims at).
                self.comm.allreduce_(bn_buffers(self.ctx.model), "mean", train_group)
            targets = {"model": self.ctx.model, **self.strategy.eval_targets()}
            self._last_targets = targets
            results = {name: self._evaluate_one(m, group) for name, m in targets.items()}
        values, groups = {}, None
        if group.size < self.comm.size and not self.strategy.isolated:
            # Distributed: each group holds its own model; rank 0 logs every worker's result.
            per_group = self.comm.allgather_object((group.index, group.rank, results))
            groups = {index: res for index, rank_in_group, res in per_group if rank_in_group == 0}
            for index, res in groups.items():
                values.update({f"eval_worker{index}/{n}/{k}": v for n, m in res.items() for k, v in m.items()})
        values.update({f"eval/{n}/{k}": v for n, m in results.items() for k, v in m.items()})
        # One tag for every method's result, so runs of different methods overlay in one chart;
        # the training model stands in while the output model does not exist yet (SWA before it starts).
        output = results.get(self.strategy.output_name, results["model"])
        values.update({"output/acc": output["acc"], "output/loss": output["loss"], "time/wall_s": self._wall_s()})
        self.logger.scalars(values, self.ctx.step, epoch=self.ctx.epoch, phase=self.strategy.phase)
        self.history.append({"epoch": self.ctx.epoch, "step": self.ctx.step, "wall_s": values["time/wall_s"],
                             "timers": dict(self.timer.totals),  # seconds per phase so far (time-to-target)
                             "phase": self.strategy.phase, "results": results,
                             "train": getattr(self, "last_train", None),  # the last epoch's, over its group
                             **({"groups": {str(k): v for k, v in sorted(groups.items())}} if groups else {})})
        return results

    # ------------------------------------------------------------------ the end
    def _wall_s(self) -> float:
        return self.wall_offset_s + time.perf_counter() - self._start

    def _finish(self) -> dict:
        if not self.history or self.history[-1]["epoch"] != self.ctx.epoch or not hasattr(self, "_last_targets"):
            self.evaluate()  # e.g. resumed from the final checkpoint: the targets are rebuilt
        last = self.history[-1]["results"]
        out = self.strategy.output_name
        final = {f"{n}/{k}": v for n, m in last.items() for k, v in m.items()}
        groups = self.history[-1].get("groups", {})  # per-worker results (SWAP, HWA)
        for index, res in groups.items():
            final.update({f"group{index}/{n}/{k}": v for n, m in res.items() for k, v in m.items()})
        per = list(groups.values())
        for n, m in (per[0].items() if per else ()):
            for k in m:
                final[f"groups_mean/{n}/{k}"] = sum(r[n][k] for r in per) / len(per)
                final[f"groups_max/{n}/{k}"] = max(r[n][k] for r in per)
        train = self.history[-1].get("train") or {}
        final.update({f"train/{k}": v for k, v in train.items()})  # the last epoch's training metrics
        final.update({"output/acc": last[out]["acc"], "output/loss": last[out]["loss"],
                      "wall_s": self._wall_s(), **{f"time/{k}": v for k, v in self.timer.totals.items()}})
        summary = {"output_name": out, "epochs": self.ctx.epoch, "steps": self.ctx.step, "final": final,
                   "eval_split": self.workload.eval_split, "eval_images": self.workload.num_eval,
                   "train_images": self.workload.num_train, "world_size": self.comm.size,
                   "history": self.history}
        if self.rank0:
            # Plain state dicts (no wrapper prefixes) that load into models.build_model(...).
            atomic_torch_save(self.ctx.model.state_dict(), self.run_dir / "final_train_model.pt")
            atomic_torch_save(self._last_targets[out].state_dict(), self.run_dir / "final_model.pt")
        self.logger.finish(summary)
        return summary

