"""Per-rank program: HWA under mpirun (4 ranks, K groups) against hand computations.

1. Every step: right after a sync all ranks hold the same weights and momentum, equal to the
   mean of the K groups' weights just before it; between syncs the members of a group are
   identical and the groups differ.
2. The window holds the last M synced weights; the "hwa" output is their mean, and it (BN
   statistics included) is the same on every rank.
3. M = 1 (online-only): same training trajectory, and the output is the final online model.
4. H = null (independent training): each group's model equals a one-process run with the
   group's batch and data seed (a BN-free model, so batch statistics cannot differ).
5. Stopped after one epoch and resumed: model, window and cycle counter as in 1-2, bitwise.
6. The other sync modes, one epoch each: momentum "keep" leaves every rank's momentum as it
   was, "reset" zeroes it, and average_buffers false leaves every rank's BN statistics as they
   were (while the default averages them: after a sync they agree on every rank).
Usage: hwa_oracles.py K RUN_DIR
"""
import functools
import sys
from pathlib import Path

import torch

import data
import tiny_models  # noqa: F401 - registers the tiny test models
from rank_harness import check, run_rank
from swa_lib.averaging import flat_parameters
from swa_lib.cli import build_trainer
from swa_lib.comm import init_comm
from swa_lib.config import load_config
from swa_lib.methods import DataShard

PERIOD, WINDOW, EPOCHS, MODEL_BATCH = 3, 3, 2, 32  # 384 images / 32 = 12 steps per epoch, 8 cycles
data.load_dataset = functools.lru_cache(data.load_dataset)  # six trainers here read the same arrays




def overrides(groups, batch, model="tiny_cnn_bn", period=PERIOD, window=WINDOW, backend="horovod", epochs=EPOCHS):
    return ["method.name=hwa", f"method.groups={groups}", f"method.sync_period_steps={period}",
            f"method.window_cycles={window}", "data.dataset=cifar10_jpg", "data.train_subset=384",
            "data.test_subset=300", f"model.name={model}", f"optim.batch_size={batch}", "optim.lr=0.05",
            f"schedule.epochs={epochs}", "eval.batch_size=100", "eval.bn_update_batches=4", "run.progress=false",
            f"dist.backend={backend}", f"eval.every_epochs={epochs}", "run.checkpoint_every_epochs=0"]


def state_of(trainer):
    model, opt = trainer.ctx.model, trainer.ctx.optimizer
    momenta = [opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters() if p in opt.state]
    return flat_parameters(model), torch.cat(momenta) if momenta else torch.zeros(0)


def watch_syncs(trainer, comm, log):
    """Wrap after_step to check (1) at every step; synced weights go to `log`."""
    strategy, K = trainer.strategy, trainer.cfg.method.groups
    original = strategy.after_step

    def after_step(step):
        before, _ = state_of(trainer)
        original(step)
        after, momentum = state_of(trainer)
        everyone = comm.allgather_object((strategy.group.index, strategy.group.rank, before, after, momentum))
        leaders = [e for e in everyone if e[1] == 0]  # one member per group, in group order
        if step % PERIOD == 0:
            for _, _, _, a, m in everyone:
                check(torch.equal(a, after) and torch.equal(m, momentum), f"step {step}: ranks differ after a sync")
            hand = torch.stack([e[2] for e in leaders]).double().mean(0).float()
            err = (after - hand).abs().max().item()
            check(err < 1e-6, f"step {step}: synced weights differ from the mean of the {K} groups by {err}")
            log.append(after)
        else:
            for index, _, _, a, _ in everyone:
                check(torch.equal(a, after) == (index == strategy.group.index),
                      f"step {step}: a group member differs, or two groups agree between syncs")
    strategy.after_step = after_step


def float_buffers(model):
    return torch.cat([b.detach().reshape(-1).float() for b in model.buffers() if b.is_floating_point()])


def check_sync_modes(trainer, comm):
    """(6): at every sync, the weights become the mean of the groups on every rank, and the
    momentum and BN statistics do what the config says."""
    strategy, m = trainer.strategy, trainer.cfg.method
    original, seen = strategy.after_step, []

    def after_step(step):
        w0, mom0 = state_of(trainer)
        buf0 = float_buffers(trainer.ctx.model)
        original(step)
        w1, mom1 = state_of(trainer)
        buf1 = float_buffers(trainer.ctx.model)
        if step % PERIOD:
            return
        everyone = comm.allgather_object((strategy.group.rank, w0, w1, buf1))
        hand = torch.stack([e[1] for e in everyone if e[0] == 0]).double().mean(0).float()
        check(all(torch.equal(e[2], w1) for e in everyone) and (w1 - hand).abs().max().item() < 1e-6,
              f"{m.momentum}/buffers {m.average_buffers}, step {step}: weights are not the groups' mean everywhere")
        if m.momentum == "keep":
            check(torch.equal(mom1, mom0), f"momentum keep, step {step}: the sync changed this rank's momentum")
        if m.momentum == "reset":
            check(mom1.numel() > 0 and not mom1.any(), f"momentum reset, step {step}: momentum is not zero")
        if m.average_buffers:
            check(all(torch.equal(e[3], buf1) for e in everyone), f"step {step}: BN statistics differ after a sync")
        else:
            check(torch.equal(buf1, buf0), f"average_buffers false, step {step}: the sync changed BN statistics")
            check(any(not torch.equal(e[3], buf1) for e in everyone),
                  f"average_buffers false, step {step}: every group has the same BN statistics (nothing tested)")
        seen.append(step)
    strategy.after_step = after_step
    trainer.fit()
    check(len(seen) == 384 // MODEL_BATCH // PERIOD, f"{len(seen)} syncs checked")


def main():
    K, run_dir = int(sys.argv[1]), Path(sys.argv[2])
    comm = init_comm("horovod")
    check(comm.size == 4, f"this test needs 4 ranks, got {comm.size}")
    batch = MODEL_BATCH * K // comm.size  # per process, so one model's batch is MODEL_BATCH for any K

    main_run = build_trainer(load_config(None, overrides(K, batch)), comm, run_dir / "hwa")
    synced = []
    watch_syncs(main_run, comm, synced)
    summary = main_run.fit()
    s = main_run.strategy
    check(s.cycles == len(synced) == EPOCHS * 384 // MODEL_BATCH // PERIOD, f"{s.cycles} cycles, {len(synced)} syncs")
    check(len(s.window) == WINDOW and all(torch.equal(a, b) for a, b in zip(s.window, synced[-WINDOW:], strict=True)),
          "the window is not the last M synced weights")
    hand = torch.stack(synced[-WINDOW:]).double().mean(0).float()
    err = (flat_parameters(s.average) - hand).abs().max().item()
    check(err < 1e-7, f"hwa output differs from the hand mean of the window by {err}")
    outputs = comm.allgather_object((flat_parameters(s.average), [b.clone() for b in s.average.buffers()],
                                     summary["final"]["output/acc"]))
    for w, bufs, acc in outputs:
        check(torch.equal(w, outputs[0][0]) and len(bufs) > 0
              and all(torch.equal(a, b) for a, b in zip(bufs, outputs[0][1], strict=True))
              and acc == outputs[0][2], "the hwa output (weights, BN statistics, accuracy) differs between ranks")
    check(summary["output_name"] == "hwa", summary["output_name"])

    online = build_trainer(load_config(None, overrides(K, batch, window=1)), comm, run_dir / "online")
    online.fit()
    final = flat_parameters(online.ctx.model)
    check(torch.equal(final, flat_parameters(main_run.ctx.model)), "the window changed the training trajectory")
    check(torch.equal(flat_parameters(online.strategy.average), final), "M=1: output is not the online model")

    cfg_args = overrides(K, batch)
    # The pause writes a checkpoint, which the second trainer in the same directory resumes from.
    paused = build_trainer(load_config(None, cfg_args + ["run.stop_after_epochs=1"]), comm, run_dir / "resumed")
    check("stopped_at_epoch" in paused.fit(), "the first half did not pause")
    resumed = build_trainer(load_config(None, cfg_args), comm, run_dir / "resumed")
    resumed.fit()
    r = resumed.strategy
    check(r.cycles == s.cycles and len(r.window) == len(s.window)
          and len(r.window) > 0 and all(torch.equal(a, b) for a, b in zip(r.window, s.window, strict=True)),
          "resume: window or cycle counter differ")
    check(torch.equal(flat_parameters(resumed.ctx.model), flat_parameters(main_run.ctx.model)),
          "resume: the training model differs from the uninterrupted run")

    for extra in (["method.momentum=keep"], ["method.momentum=reset"], ["method.average_buffers=false"]):
        name = extra[0].split(".")[1].replace("=", "_")
        check_sync_modes(build_trainer(load_config(None, overrides(K, batch, epochs=1) + extra), comm,
                                       run_dir / name), comm)

    # Last: init_comm("single") below gives this process all cores, which changes float sums.
    independent = build_trainer(load_config(None, overrides(K, batch, "tiny_cnn_no_bn", period="null", window=1)),
                                comm, run_dir / "independent")
    result = independent.fit()
    check(result["output_name"] == "model", result["output_name"])
    g, cfg = independent.strategy.group, independent.cfg
    ref = build_trainer(load_config(None, overrides(1, MODEL_BATCH, "tiny_cnn_no_bn", period="null", window=1,
                                                    backend="single")),
                        init_comm("single"), run_dir / f"ref{comm.rank}")
    seed = cfg.run.seed + g.index * cfg.method.group_seed_stride  # the group's own data order
    ref.strategy.data_shard = lambda epoch: DataShard(0, 1, seed, MODEL_BATCH)
    ref.fit()
    err = (flat_parameters(independent.ctx.model) - flat_parameters(ref.ctx.model)).abs().max().item()
    check(err < 1e-5, f"H=null: group {g.index} differs from its one-process run by {err}")

    comm.barrier()
    print(f"HWA_ORACLES_OK rank={comm.rank} K={K} group={g.index} acc={summary['final']['output/acc']:.4f}",
          flush=True)
    comm.shutdown()


if __name__ == "__main__":
    run_rank(main)
