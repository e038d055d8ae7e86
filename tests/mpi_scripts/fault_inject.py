"""Per-rank program: the experiment command line (swa_lib.cli.main) with one fault injected.

Usage: fault_inject.py FAULT RANKS STEP CLI_ARGS...
  FAULT   none | ready | sigterm | sigint | sigkill | sigkill_checkpoint | sigkill_phase3 | nan | fill_disk
  RANKS   "all", or comma-separated world ranks that inject the fault (e.g. "1")
  STEP    optimizer step after which the fault fires (sigkill_checkpoint: the first checkpoint
          write at or after this step; fill_disk: at the first checkpoint write at or after this
          step, rank 0 fills the file system of the run directory with one file, run_dir/../filler,
          as another job on a shared disk would, and then every rank writes its file; ready: no
          fault, every rank prints the INJECT line once the trainer is built (config checked, data
          loaded, model built) and exits 0 without training: the startup cost of a launch;
          sigkill_phase3: SWAP only, STEP unused: the rank kills itself in phase 3, after the
          average of the workers and before the BN recompute of the average)
Exits with the code main() returns, so a test sees exactly what a user's shell would.

The faults act on the process itself, at a chosen point, so that a test lands in a known
phase: a signal sent to oneself is delivered like one from a scheduler (the handler runs
between two bytecodes of the main thread), and SIGKILL cannot be caught at all.
"""
import io
import os
import signal
import sys

import swa_lib.checkpoint
import swa_lib.cli
import tiny_models  # noqa: F401 - registers the tiny test models

FAULTS = ("none", "ready", "sigterm", "sigint", "sigkill", "sigkill_checkpoint", "sigkill_phase3", "nan", "fill_disk")


def fill(path) -> None:
    """Write zeros to `path` until the file system is full."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def main() -> int:
    fault, ranks, step, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    if fault not in FAULTS:
        raise SystemExit(f"fault {fault!r} is not one of {FAULTS}")
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", 0))
    mine = fault != "none" and (ranks == "all" or rank in {int(r) for r in ranks.split(",")})
    build_trainer = swa_lib.cli.build_trainer

    def build_with_fault(cfg, comm, run_dir):
        trainer = build_trainer(cfg, comm, run_dir)
        if fault == "ready":
            print(f"INJECT ready rank={rank}", flush=True)
            sys.stdout.flush()
            os._exit(0)
        if not mine:
            return trainer
        after_step = trainer.strategy.after_step

        def after_step_with_fault(s):
            after_step(s)
            if s != step or fault in ("sigkill_checkpoint", "fill_disk", "sigkill_phase3"):  # these fire elsewhere
                return
            print(f"INJECT {fault} rank={rank} step={s} phase={trainer.strategy.phase}", flush=True)
            if fault in ("sigterm", "sigint", "sigkill"):
                os.kill(os.getpid(), getattr(signal, fault.upper()))
            elif fault == "nan":
                with __import__("torch").no_grad():
                    next(trainer.ctx.model.parameters()).fill_(float("nan"))

        trainer.strategy.after_step = after_step_with_fault
        if fault == "sigkill_checkpoint":
            real_save = swa_lib.checkpoint.atomic_torch_save

            def save_then_die(obj, path):
                if trainer.ctx.step < step:
                    return real_save(obj, path)
                # Half of the file under the temporary name, as a kill in mid-write leaves it.
                buffer = io.BytesIO()
                __import__("torch").save(obj, buffer)
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                tmp.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                print(f"INJECT {fault} rank={rank} step={trainer.ctx.step} file={path}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

            swa_lib.checkpoint.atomic_torch_save = save_then_die
        if fault == "sigkill_phase3":
            import swa_lib.methods.swap as swap_module

            def die_before_bn_recompute(*args, **kwargs):
                print(f"INJECT {fault} rank={rank} step={trainer.ctx.step} phase=phase3", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

            swap_module.recompute_bn_ = die_before_bn_recompute
        if fault == "fill_disk":
            real_save = swa_lib.checkpoint.atomic_torch_save
            filled = []

            def fill_then_save(obj, path):
                if trainer.ctx.step >= step and not filled:
                    filled.append(path)
                    if rank == 0:
                        print(f"INJECT {fault} rank={rank} step={trainer.ctx.step} file={path}", flush=True)
                        fill(run_dir.parent / "filler")
                    trainer.ctx.comm.barrier()  # every rank writes into the full disk
                return real_save(obj, path)

            swa_lib.checkpoint.atomic_torch_save = fill_then_save
        return trainer

    swa_lib.cli.build_trainer = build_with_fault
    return swa_lib.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
