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

Preemption (SIGTERM, SIGINT): the ranks agree at the next step boundary, checkpoint that step and
`fit` raises `Preempted`; the same command resumes bitwise (swa_lib.preemption has the details).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from swa_lib.averaging import bn_buffers, evaluate, recompute_bn_
from swa_lib.averaging.workers import mean_over_workers_
from swa_lib.checkpoint import CheckpointManager, atomic_torch_save, rng_state, set_rng_state
from swa_lib.comm import allreduce_gradients_
from swa_lib.config import precision_record, run_identity, validate_world
from swa_lib.errors import ConfigError
from swa_lib.inprocess import StackedLoader, gather_per_worker, independent_workers, mirror_, train_step_
from swa_lib.launch import pick_device
from swa_lib.methods.base import EvalTarget
from swa_lib.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignals
from swa_lib.schedules import base_lr_fn, check_eval_cadence, lr_position
from swa_lib.timing import PhaseTimer

__all__ = ["Trainer", "TrainContext", "PhaseTimer", "pick_device", "NonFiniteLossError", "Preempted",
           "PREEMPTED_EXIT_CODE"]  # PhaseTimer lives in swa_lib.timing, the last two in swa_lib.preemption


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf; the last good checkpoint is left as it was."""


@dataclass
class TrainContext:
    """What strategies may read (swa_lib.methods.base lists what each hook may change).

    No strategy assigns to a field: the loop builds it once, and only the loop advances epoch and step."""

    cfg: object
    comm: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    lr_fn: Callable[[float], float]
    workload: object
    logger: object
    run_dir: Path | None = None  # where the run's files go (methods may save per-worker results here)
    timer: object = None  # the loop's PhaseTimer: methods time work they do outside train steps (SWAP phase 3)
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken


def _loss_acc(sums: torch.Tensor) -> dict:
    """{"loss", "acc"} from float64 sums (loss * n, correct, n)."""
    loss_sum, correct, count = sums.tolist()
    return {"loss": loss_sum / count, "acc": correct / count}


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
        problems = validate_world(cfg, comm.size)  # the entry point checked already; direct users too
        if problems:
            raise ConfigError(problems)
        model = workload.build_model()
        strategy.prepare_model(model, self.device)
        optimizer = strategy.build_optimizer(model, self.device)
        lr_fn = base_lr_fn(cfg, comm.size)
        self.ctx = TrainContext(cfg, comm, model, optimizer, self.device, lr_fn, workload, logger,
                                run_dir=self.run_dir, timer=self.timer)
        strategy.setup(self.ctx)
        if cfg.eval.every_steps:
            check_eval_cadence(cfg, len(workload.train_loader(strategy.data_shards(0)[0])))
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", comm, cfg.run.keep_checkpoints,
                                             config=run_identity(cfg))
        self.signals = StopSignals(comm.rank)
        self._in_epoch: dict | None = None  # where a preempted epoch stopped (set by a resume)
        # run.precision applies to the training model; averaged models are evaluated in fp32.
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if cfg.run.precision == "bf16" else contextlib.nullcontext())

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        c = self.ctx
        return {"epoch": c.epoch, "step": c.step, "phase": self.strategy.phase,
                "model": c.model.state_dict(), "optimizer": c.optimizer.state_dict(),
                "strategy": self.strategy.state_dict(), "rng": rng_state(), "history": self.history,
                "timers": dict(self.timer.totals), "wall_s": self._wall_s()}

    def save_checkpoint(self, pin: bool = False, in_epoch: dict | None = None) -> None:
        """Checkpoint every rank; `pin` keeps the generation out of pruning (phase boundaries).

        `in_epoch` (a preemption): the position inside the unfinished epoch ctx.epoch and its sums."""
        if self.strategy.local_workers is not None:
            mirror_(self.strategy.local_workers, self.ctx.model)  # the workers are in the strategy's state
        self._check_finite_weights()
        tag = f"e{self.ctx.epoch:04d}-{self.strategy.phase}"
        if in_epoch is not None:
            tag += f"-b{in_epoch['batches_done']:05d}"  # sorts after the epoch's start, before its end
        with self.timer("checkpoint"):
            self.checkpoints.save({**self._state(), "in_epoch": in_epoch}, tag, pin=pin)

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
        self._in_epoch = state.get("in_epoch")
        return True

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        """Train to the end (or run.stop_after_epochs); raises Preempted after a SIGTERM/SIGINT."""
        with self.signals:
            return self._fit()

    def _fit(self) -> dict:
        self._start = time.perf_counter()
        if self.maybe_resume() and self.rank0:
            inside = f", batch {self._in_epoch['batches_done']} of the epoch" if self._in_epoch else ""
            print(f"resumed from epoch {self.ctx.epoch} (step {self.ctx.step}{inside}, phase {self.strategy.phase})")
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
            partial = self.strategy.partial_result()
            if partial is not None:  # e.g. SWAP's survivors: nothing world-wide may follow
                bar.close()
                return {"output_name": self.strategy.output_name, "partial_world": partial, "final": {}}
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
        shards = strategy.data_shards(epoch)  # one per model this process trains
        workers = strategy.local_workers  # K models in this process (swa_lib.inprocess), or None
        loaders = [self.workload.train_loader(shard) for shard in shards]
        loader = loaders[0] if workers is None else StackedLoader(loaders)
        loader.set_epoch(epoch)
        group = strategy.gradient_group()
        n_batches = len(loader)
        (c.model if workers is None else workers).train()
        # Per model: loss*n, correct, n.
        epoch_sums = torch.zeros(len(shards), 3, dtype=torch.float64, device=self.device)
        window = torch.zeros_like(epoch_sums)
        skip = 0
        if self._in_epoch is not None:  # resumed after a preemption inside this epoch
            skip = self._in_epoch["batches_done"]
            epoch_sums.copy_(self._in_epoch["epoch_sums"])
            window.copy_(self._in_epoch["window"])
            self._in_epoch = None
        phase = strategy.phase
        with self.timer("train"), self.timer(f"phase/{phase}"):
            start = time.perf_counter()
            # The batches trained before the preemption are made and dropped: the data order and
            # augmentation of an epoch come from (seed, epoch) alone, so the rest are the same ones.
            for i, (x, y) in enumerate(itertools.islice(loader, skip, None), start=skip):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                lr = strategy.lr(lr_position(cfg.schedule, epoch, i, n_batches))
                if workers is None:
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
                    loss, out, y = loss[None], out[None], y[None]  # one model
                else:  # the gradient mean covers the local replicas too (none when they are independent)
                    workers.set_lr(lr)
                    loss, out = train_step_(workers, x, y, self.workload.loss_fn, comm=c.comm, group=group,
                                            autocast=self.autocast)
                c.step += 1
                with torch.no_grad():
                    window += torch.stack([loss.detach().double() * y.shape[1], (out.argmax(-1) == y).sum(1).double(),
                                           torch.full_like(loss, y.shape[1], dtype=torch.float64)], dim=1)
                strategy.after_step(c.step)
                if c.step % cfg.run.log_every_steps == 0 or i == n_batches - 1:
                    epoch_sums += window
                    self._log_window(window, lr, epoch + (i + 1) / n_batches)
                    window.zero_()
                if cfg.eval.every_steps and c.step % cfg.eval.every_steps == 0:
                    with self.timer("eval_steps"):
                        self.evaluate(mid_epoch=True)
                if self._stop_agreed():
                    self._preempt(epoch, i + 1, epoch_sums, window)
            elapsed = time.perf_counter() - start
        eval_group = strategy.eval_group()
        c.comm.allreduce_([epoch_sums], op="sum", group=eval_group)  # Distributed: metrics of the whole group
        metrics = _loss_acc(epoch_sums.sum(0))
        images = (n_batches - skip) * sum(shard.batch_size for shard in shards) * c.comm.size
        values = {"train/epoch_loss": metrics["loss"], "train/epoch_acc": metrics["acc"],
                  "train/images_per_s": images / max(elapsed, 1e-9), "time/wall_s": self._wall_s()}
        per_model = [_loss_acc(row) for row in epoch_sums] if self._independent() else [metrics]
        for index, m in self._gather_groups(per_model).items():
            # Each group trains a model of its own (SWAP phase 2, HWA); rank 0 logs every one.
            values.update({f"train_worker{index}/epoch_{k}": v for k, v in m.items()})
        self.logger.scalars(values, c.step, epoch=epoch + 1, phase=phase)
        return metrics

    def _stop_agreed(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT: one tiny allreduce per step, same answer everywhere.

        While the strategy is isolated (SWAP phase 2 that survives dead workers) nothing may span
        the world, so each process answers for itself."""
        flag = torch.tensor([float(self.signals.received is not None)], device=self.device)
        if self.ctx.comm.size > 1 and not self.strategy.isolated:
            self.ctx.comm.allreduce_([flag], "max")  # Distributed: did any rank get a signal?
        return bool(flag.item())

    def _preempt(self, epoch: int, batches_done: int, epoch_sums: torch.Tensor, window: torch.Tensor):
        """Checkpoint the step every rank just finished, then raise Preempted."""
        c = self.ctx
        where = (f"epoch {epoch} batch {batches_done} (step {c.step}, phase {self.strategy.phase})")
        if self.strategy.isolated:
            raise Preempted(f"stopped by a signal at {where}; SWAP phase 2 with average_survivors writes no "
                            f"world-wide checkpoint, so the same command resumes from the start of phase 2")
        self.save_checkpoint(in_epoch={"batches_done": batches_done, "epoch_sums": epoch_sums.cpu(),
                                       "window": window.cpu()})
        raise Preempted(f"stopped by a signal at {where}; checkpoint written to {self.checkpoints.directory}; "
                        f"run the same command again to resume")

    def _log_window(self, window: torch.Tensor, lr: float, epoch: float) -> None:
        loss_sum, correct, count = window.sum(0).tolist()
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
    def _recompute_bn(self, target: EvalTarget) -> None:
        """What a target's recompute_bn asks for: BN statistics from the last epoch's training data."""
        with self.timer("bn_update"):
            epoch = max(self.ctx.epoch - 1, 0)
            group = self.strategy.eval_group()
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices, enabled=target.isolate_rng):
                recompute_bn_(target.model, self.workload, self.strategy.data_shards(epoch), epoch, comm=self.comm,
                              group=group, max_batches=self.cfg.eval.bn_update_batches, device=self.device)
            also = target.bn_also_over
            if also is not None and also.size > group.size:
                self.comm.allreduce_(bn_buffers(target.model), "mean", also)  # Distributed

    def evaluate(self, mid_epoch: bool = False) -> dict:
        """Evaluate the training model and every averaged model; log; return {name: metrics}."""
        with self.timer("eval"):
            group = self.strategy.eval_group()
            train_group = self.strategy.gradient_group()
            workers = self.strategy.local_workers
            if train_group is not None and workers is not None:  # in-process replicas, as below
                mean_over_workers_(workers, "bn", self.comm if train_group.size > 1 else None, train_group)
            elif train_group is not None and train_group.size > 1:
                # Distributed: replicas share weights but each kept BN running statistics of its own
                # batches; evaluate one model, the mean of them (what DDP's buffer broadcast aims at).
                self.comm.allreduce_(bn_buffers(self.ctx.model), "mean", train_group)
            if workers is not None:
                mirror_(workers, self.ctx.model)  # "model" is local model 0
            extra = {name: t if isinstance(t, EvalTarget) else EvalTarget(t)
                     for name, t in self.strategy.eval_targets().items()}
            for target in extra.values():  # in the strategy's order: the order of RNG use
                if target.recompute_bn:
                    self._recompute_bn(target)
            targets = {"model": self.ctx.model, **{name: t.model for name, t in extra.items()}}
            self._last_targets = targets
            test = self.workload.test_loader(group.rank, group.size)
            # The training model in the run's precision; every average in fp32.
            results = {name: evaluate(m, test, self.device, comm=self.comm, group=group,
                                      autocast=self.autocast if name == "model" else None)
                       for name, m in targets.items()}
            per_model = [results]
            if self._independent():  # the other local models, each a worker of its own
                per_model += [{**results, "model": evaluate(workers.module(j), test, self.device, comm=self.comm,
                                                            group=group, autocast=self.autocast)}
                              for j in range(1, len(workers))]
        values = {}
        groups = self._gather_groups(per_model)  # rank 0 logs every worker's result
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

    def _independent(self) -> bool:
        return independent_workers(self.strategy)

    def _gather_groups(self, per_model: list) -> dict:
        return gather_per_worker(self.comm, self.strategy, per_model)

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
        train = self.history[-1].get("train") or {}  # the last epoch's training metrics, and the method's own
        final.update({**{f"train/{k}": v for k, v in train.items()}, **self.strategy.final_metrics()})
        final.update({"output/acc": last[out]["acc"], "output/loss": last[out]["loss"],
                      "wall_s": self._wall_s(), **{f"time/{k}": v for k, v in self.timer.totals.items()}})
        summary = {"output_name": out, "epochs": self.ctx.epoch, "steps": self.ctx.step, "final": final,
                   "eval_split": self.workload.eval_split, "eval_images": self.workload.num_eval,
                   "train_images": self.workload.num_train, "world_size": self.comm.size,
                   "precision": precision_record(self.cfg),
                   "history": self.history}
        if self.rank0:
            # Plain state dicts (no wrapper prefixes) that load into models.build_model(...).
            atomic_torch_save(self.ctx.model.state_dict(), self.run_dir / "final_train_model.pt")
            atomic_torch_save(self._last_targets[out].state_dict(), self.run_dir / "final_model.pt")
        self.logger.finish(summary)
        return summary

