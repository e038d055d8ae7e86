"""SWAP: stochastic weight averaging in parallel (Gupta, Akle Serrano, DeCoste, ICLR 2020, arXiv 2001.02312).

Three phases, all inside the one training loop:

  phase1  All W processes train one model data-parallel with the large global batch
          W x optim.batch_size (gradients averaged over the world every step). The LR is
          `schedule` (warmup included; peak scaled with the batch if optim.lr_reference_batch
          is set) laid out over the phase-1 cap, schedule.epochs - phase2_epochs. The phase
          ends at the first epoch boundary where the epoch's training accuracy, summed over
          all ranks, reaches `stop_accuracy` %, or at the cap.
  phase2  The world splits into K = `workers` contiguous groups of G = W / K processes (an
          MPI communicator split, made into Horovod process sets / torch groups by
          swa_lib.comm). Each worker starts from the phase-1 weights and momentum, trains on
          the whole training set in its own order (seed `worker_seed(k)`), with its own
          batch (G x phase2_batch_size) and LR schedule, for `phase2_epochs` epochs.
          Gradients are averaged inside the worker's group only; nothing crosses workers.
  phase3  One allreduce over the world averages the workers' parameters (members of a
          worker hold identical replicas, so the world mean is the mean over workers). The
          BN statistics of the average are recomputed on training data sharded over all W
          processes and combined exactly (swa_lib.averaging.update_bn_). The average is the
          method's result ("swap"); each worker's own model stays the training model and is
          evaluated too, so the table can show the workers before averaging.

The phase-1 stopping rule is checked at epoch boundaries (the loop's unit of data order
and checkpoints), not every step as a hand-written loop might; on a reduced budget this
can overshoot by up to one epoch. Every phase boundary writes a pinned checkpoint, and a
killed run resumes from its latest checkpoint.

A worker that dies in phase 2:
  on_worker_failure: stop (default). mpirun (Open MPI's default) stops the whole job and
      names the dead rank; the last checkpoint stays intact, and running the same command
      again resumes from it.
  on_worker_failure: average_survivors. Workers must be single processes (a group with a
      dead member could not finish its own steps). Phase 2 then makes no world-wide call:
      no per-epoch checkpoints and no gathering of other workers' results (the phase
      boundaries still checkpoint). Each worker writes its final weights to
      run_dir/phase2/worker{k}.pt and waits up to `survivor_wait_s` for the others' files.
      With all K there, phase 3 runs as usual. With some missing, the lowest surviving
      worker averages the files that exist, recomputes BN on its own over the same number
      of training images, evaluates, writes final_model.pt and survivors.json, and every
      survivor exits 0. Open MPI kills the survivors when a peer dies unless launched with
      `--mca orte_abort_on_non_zero_status 0`; mpirun still exits non-zero, naming the dead rank.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from swa_lib.averaging.bn import recompute_bn_
from swa_lib.averaging.workers import mean_of_workers
from swa_lib.comm import average_model_
from swa_lib.inprocess import InProcessConfig, build_local_workers, virtual_ranks
from swa_lib.methods.base import DataShard, EvalTarget, Strategy
from swa_lib.methods.swap_survivors import average_survivors, wait_for_workers, write_worker_result
from swa_lib.schedules import build_lr_fn, peak_lr
from swa_lib.sections import SCHEDULES, ScheduleConfig

PHASES = ("phase1", "phase2", "phase3")


@dataclass
class SWAPConfig(InProcessConfig):
    """Settings of SWAP. `schedule.epochs` is the whole budget: phase-1 cap + phase2_epochs.

    With fewer processes than `workers` (or `workers_in_process` set), each process holds several
    workers as in-process models, virtual ranks of their own (swa_lib.inprocess)."""

    name: ClassVar[str] = "swap"
    workers: int = 8  # K phase-2 workers; must divide the number of processes
    stop_accuracy: float | None = None  # phase 1 ends once training accuracy (%) reaches this; null: at the cap
    phase2_epochs: int = 2  # length of phase 2 (epochs of the whole training set, per worker)
    phase2_batch_size: int = 128  # per process in phase 2 (a worker's batch is G x this)
    phase2_lr: float = 0.05  # peak LR of each worker's phase-2 schedule
    phase2_schedule: str = "linear"  # shape of the phase-2 LR, over phase2_epochs
    phase2_warmup_epochs: float = 0.0
    phase2_final_lr_fraction: float = 0.0
    worker_seed_stride: int = 1000  # worker k's data seed is run.seed + stride * (k + 1)
    on_worker_failure: str = "stop"  # stop | average_survivors (see the module docstring)
    survivor_wait_s: float = 300.0  # average_survivors: how long a finished worker waits for the others

    def validate(self, cfg) -> list[str]:
        p = []
        if self.stop_accuracy is not None and not 0 < self.stop_accuracy <= 100:
            p.append(f"method.stop_accuracy: {self.stop_accuracy} must be a training accuracy in percent, "
                     f"in (0, 100], or null to stop phase 1 at its epoch cap")
        if self.workers < 1:
            p.append(f"method.workers: {self.workers} must be >= 1")
        if not 1 <= self.phase2_epochs < cfg.schedule.epochs:
            p.append(f"method.phase2_epochs: {self.phase2_epochs} must be >= 1 and leave at least one phase-1 "
                     f"epoch inside schedule.epochs={cfg.schedule.epochs}")
        if self.phase2_batch_size < 1:
            p.append(f"method.phase2_batch_size: {self.phase2_batch_size} must be >= 1")
        if self.phase2_lr <= 0:
            p.append(f"method.phase2_lr: {self.phase2_lr} must be > 0")
        if self.phase2_schedule not in SCHEDULES or self.phase2_schedule in ("step", "swa_paper"):
            p.append(f"method.phase2_schedule: {self.phase2_schedule!r} is not one of cosine, linear, constant")
        if not 0 <= self.phase2_warmup_epochs < max(self.phase2_epochs, 1):
            p.append(f"method.phase2_warmup_epochs: {self.phase2_warmup_epochs} must be in [0, phase2_epochs)")
        if not 0 <= self.phase2_final_lr_fraction <= 1:
            p.append(f"method.phase2_final_lr_fraction: {self.phase2_final_lr_fraction} must be in [0, 1]")
        if self.worker_seed_stride < 1:
            p.append(f"method.worker_seed_stride: {self.worker_seed_stride} must be >= 1")
        if self.on_worker_failure not in ("stop", "average_survivors"):
            p.append(f"method.on_worker_failure: {self.on_worker_failure!r} is not one of stop, average_survivors")
        if self.survivor_wait_s <= 0:
            p.append(f"method.survivor_wait_s: {self.survivor_wait_s} must be > 0")
        return p

    def validate_world(self, world_size: int) -> list[str]:
        per_process, problems = self.models_per_process(self.workers, world_size, "method.workers")
        if problems or per_process > 1:
            return problems or ([f"method.on_worker_failure: average_survivors needs one process per worker, "
                                 f"not {per_process} in-process workers per process"]
                                if self.on_worker_failure == "average_survivors" else [])
        if world_size % self.workers:
            return [f"method.workers: {self.workers} workers do not divide the {world_size} launched processes; "
                    f"launch a multiple of {self.workers} processes or pick a divisor of {world_size}"]
        if self.on_worker_failure == "average_survivors" and self.workers != world_size:
            return [f"method.on_worker_failure: average_survivors needs one process per worker, but "
                    f"{self.workers} workers share {world_size} processes"]
        return []

    def worker_seed(self, run_seed: int, worker: int) -> int:
        return run_seed + self.worker_seed_stride * (worker + 1)


class SWAP(Strategy):
    """The result is the phase-3 average ("swap"); "model" is each worker's own model."""

    output_name = "swap"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._phase = "phase1"
        self.phase2_start: int | None = None  # first epoch (0-based) of phase 2
        self.phase1_end: dict = {}  # how phase 1 ended: epoch, train accuracy, which rule fired
        self.average: torch.nn.Module | None = None
        self._partial: str | None = None  # set when survivors ended the run (average_survivors)

    @property
    def phase(self) -> str:
        return self._phase

    def setup(self, ctx) -> None:
        super().setup(ctx)
        m, comm = self.cfg.method, ctx.comm
        self.per_process = m.models_per_process(m.workers, comm.size, "method.workers")[0]
        self.virtual_world = comm.size * self.per_process  # processes, as if each model had its own
        # Every rank creates every group now, in the same order (Horovod and torch require it).
        # With in-process workers every process is a group (of its own models).
        self.group = comm.split(comm.size if self.per_process > 1 else m.workers)
        if self.per_process > 1:
            self.local_workers = build_local_workers(ctx.model, ctx.optimizer, self.per_process,
                                                     m.workers_vectorised)
        self._build_lr_fns(self.virtual_world)
        global_batch = self.cfg.optim.batch_size * self.virtual_world
        worker_batch = m.phase2_batch_size * (self.group.size if self.per_process == 1 else 1)
        if worker_batch >= global_batch and comm.rank == 0:
            print(f"warning: SWAP phase-2 worker batch {worker_batch} (phase2_batch_size {m.phase2_batch_size} x "
                  f"{self.group.size} processes) is not smaller than the phase-1 global batch {global_batch}; "
                  f"SWAP's phase 2 is meant to refine with small batches, so this defeats the method", flush=True)

    def _build_lr_fns(self, world_size: int) -> None:
        m = self.cfg.method
        self.phase1_cap = self.cfg.schedule.epochs - m.phase2_epochs
        self.phase1_lr = build_lr_fn(dataclasses.replace(self.cfg.schedule, epochs=self.phase1_cap),
                                     peak_lr(self.cfg.optim, self.cfg.optim.batch_size * world_size))
        self.phase2_lr = build_lr_fn(ScheduleConfig(epochs=m.phase2_epochs, kind=m.phase2_schedule,
                                                    warmup_epochs=m.phase2_warmup_epochs,
                                                    final_lr_fraction=m.phase2_final_lr_fraction), m.phase2_lr)

    # ------------------------------------------------------------------ --dry-run
    def plan(self, world_size: int) -> None:
        m = self.cfg.method
        self._build_lr_fns(world_size * m.models_per_process(m.workers, world_size, "method.workers")[0])
        self.phase2_start = self.phase1_cap  # planned as if stop_accuracy is never reached

    def planned_phase(self, epoch: int) -> str:
        return "phase1" if epoch < self.phase1_cap else "phase2"

    def layout(self, world_size: int) -> list[str]:
        m, b = self.cfg.method, self.cfg.optim.batch_size
        per_process = m.models_per_process(m.workers, world_size, "method.workers")[0]
        if per_process > 1:
            v = world_size * per_process
            return [f"{per_process} in-process models on each of {world_size} processes, one per worker "
                    f"(virtual ranks 0-{v - 1}; swa_lib.inprocess)",
                    f"phase 1: the {v} models as data-parallel replicas, global batch {v} x {b} = {v * b}; "
                    f"ends at its cap of epoch {self.phase1_cap}" + (f" or at {m.stop_accuracy} % training "
                                                                     f"accuracy" if m.stop_accuracy else ""),
                    f"phase 2: {m.workers} workers of one model, batch {m.phase2_batch_size} each, for "
                    f"{m.phase2_epochs} epochs",
                    f"phase 3: average of the {m.workers} workers, BN recomputed over the {v} phase-1 shards"]
        g = world_size // m.workers
        end = f"at {m.stop_accuracy} % training accuracy or" if m.stop_accuracy is not None else "at"
        workers = ", ".join(f"{k}: ranks {k * g}-{(k + 1) * g - 1}" if g > 1 else f"{k}: rank {k}"
                            for k in range(m.workers))
        return [f"phase 1: one model, data-parallel over all {world_size} processes, global batch "
                f"{world_size} x {b} = {world_size * b}; ends {end} its cap of epoch {self.phase1_cap}",
                f"phase 2: {m.workers} workers of {g} process(es), batch {g} x {m.phase2_batch_size} = "
                f"{g * m.phase2_batch_size} each, for {m.phase2_epochs} epochs; workers {workers}",
                f"phase 3: average of the {m.workers} workers, BN recomputed over all {world_size} processes"]

    # ------------------------------------------------------------------ what the loop asks
    def data_shard(self, epoch: int) -> DataShard:
        return self.data_shards(epoch)[0]

    def data_shards(self, epoch: int) -> list[DataShard]:
        return self._shards(phase1=self._phase == "phase1")

    def _shards(self, phase1: bool) -> list[DataShard]:
        """Phase 1: shard r of the (virtual) world; phase 2: worker k's whole set in its own order."""
        m, seed, comm = self.cfg.method, self.cfg.run.seed, self.ctx.comm
        if self.local_workers is None:
            if phase1:
                return [DataShard(comm.rank, comm.size, seed, self.cfg.optim.batch_size)]
            return [DataShard(self.group.rank, self.group.size, m.worker_seed(seed, self.group.index),
                              m.phase2_batch_size)]
        ranks = virtual_ranks(comm, self.per_process)  # replica / worker v = this process's model j
        if phase1:
            return [DataShard(v, self.virtual_world, seed, self.cfg.optim.batch_size) for v in ranks]
        return [DataShard(0, 1, m.worker_seed(seed, v), m.phase2_batch_size) for v in ranks]

    @property
    def isolated(self) -> bool:
        return self._phase == "phase2" and self.cfg.method.on_worker_failure == "average_survivors"

    def gradient_group(self):
        if self._phase == "phase1":
            return self.ctx.comm.world
        return None if self.local_workers is not None else self.group

    def eval_group(self):
        return self.ctx.comm.world if self._phase == "phase1" else self.group

    def lr(self, epoch: float) -> float:
        if self.phase2_start is None or epoch < self.phase2_start:  # phase 1 (phase2_start: set when it ends)
            return self.phase1_lr(epoch)
        return self.phase2_lr(epoch - self.phase2_start)

    def after_epoch(self, epoch: int, train_metrics: dict) -> None:
        m, completed = self.cfg.method, epoch + 1
        if self._phase == "phase1":
            acc = 100 * train_metrics["acc"]  # the loop summed it over the world
            by_acc = m.stop_accuracy is not None and acc >= m.stop_accuracy
            if by_acc or completed >= self.phase1_cap:
                self._end_phase1(completed, acc, "stop_accuracy" if by_acc else "epoch_cap")
        elif self._phase == "phase2" and completed >= self.phase2_start + m.phase2_epochs:
            self._average()
            if self._partial is not None:
                return  # the world is gone: nothing more is logged or shared
        self.ctx.logger.scalars({"swap/phase": PHASES.index(self._phase) + 1}, self.ctx.step, epoch=completed)

    def _end_phase1(self, completed: int, acc: float, rule: str) -> None:
        self.phase1_end = {"epoch": completed, "train_acc": acc, "rule": rule}
        self.phase2_start = completed
        self._phase = "phase2"
        self.ctx.logger.scalars({"swap/phase1_end_epoch": completed, "swap/phase1_end_train_acc": acc,
                                 "swap/phase1_stopped_by_accuracy": float(rule == "stop_accuracy")},
                                self.ctx.step, epoch=completed)
        if self.ctx.comm.rank == 0:
            print(f"SWAP phase 1 ended after epoch {completed} ({rule}): training accuracy {acc:.2f} %; "
                  f"phase 2: {self.cfg.method.workers} workers x {self.cfg.method.phase2_epochs} epochs", flush=True)

    def _average(self) -> None:
        # Phase 3 is training work: it counts in "train" (what the tables call training time) and has
        # its own column, like the other phases.
        with self.ctx.timer("train"), self.ctx.timer("phase/phase3"):
            self._average_and_recompute_bn()

    def _average_and_recompute_bn(self) -> None:
        ctx, comm, cfg = self.ctx, self.ctx.comm, self.cfg
        if self.isolated:
            # This worker's result on disk first, so that the others can average without it.
            write_worker_result(ctx.run_dir, self.group.index, ctx.model)
            present = wait_for_workers(ctx.run_dir, cfg.method.workers, cfg.method.survivor_wait_s)
            if len(present) < cfg.method.workers:
                self._partial, average = average_survivors(ctx, cfg, self.group.index, present)
                self.average = average
                return
        average = copy.deepcopy(ctx.model)
        if self.local_workers is not None:  # the mean over every process's models
            average.load_state_dict(mean_of_workers(self.local_workers, comm, comm.world))
        else:  # members of a worker hold the same replica: the world mean is the mean over workers
            average_model_(comm, average, comm.world, buffers=False)  # Distributed
        # BN recomputed on the phase-1 shards of every process (or virtual rank), combined exactly, in
        # the last epoch's order and augmentation (on every resume too).
        recompute_bn_(average, ctx.workload, self._shards(phase1=True), ctx.epoch - 1, comm=comm, group=comm.world,
                      max_batches=cfg.eval.bn_update_batches, device=ctx.device)
        self.average = average
        self._phase = "phase3"

    def partial_result(self) -> str | None:
        return self._partial

    def eval_targets(self):
        return {"swap": EvalTarget(self.average)} if self.average is not None else {}

    def finished(self) -> bool:
        return self._phase == "phase3"

    def final_metrics(self) -> dict[str, float]:
        if not self.phase1_end:
            return {}
        return {"swap/phase1_end_epoch": float(self.phase1_end["epoch"]),
                "swap/phase1_end_train_acc_pct": float(self.phase1_end["train_acc"]),
                "swap/phase1_stopped_by_accuracy": float(self.phase1_end["rule"] == "stop_accuracy")}

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"phase": self._phase, "phase2_start": self.phase2_start, "phase1_end": self.phase1_end,
                "average": None if self.average is None else self.average.state_dict(),
                "workers": None if self.local_workers is None else self.local_workers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._phase, self.phase2_start, self.phase1_end = state["phase"], state["phase2_start"], state["phase1_end"]
        if state["average"] is not None:
            self.average = copy.deepcopy(self.ctx.model)
            self.average.load_state_dict(state["average"])
        if self.local_workers is not None:
            self.local_workers.load_state_dict(state["workers"])
