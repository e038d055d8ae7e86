"""Per-rank program: the real entry point (swa_lib.cli.main) with a NaN loss on one rank only.

Usage: nan_rank.py BAD_RANK BAD_STEP CLI_ARGS...
On rank BAD_RANK, the loss of optimizer step BAD_STEP (1-based; 0: never) is multiplied by
NaN, and the rank prints `NAN_INJECTED t=<unix time>` first, so a test can time how long the
job takes to end after the failure. Works under mpirun and torchrun.
"""
import sys
import time

import swa_lib.cli as cli


def main() -> int:
    bad_rank, bad_step, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    build = cli.build_trainer

    def build_with_nan(cfg, comm, run_dir):
        trainer = build(cfg, comm, run_dir)
        if comm.rank == bad_rank and bad_step:
            loss_fn = trainer.workload.loss_fn

            def poisoned(out, y):
                loss = loss_fn(out, y)
                if trainer.ctx.step + 1 != bad_step:  # the step counter moves after the optimizer step
                    return loss
                print(f"NAN_INJECTED t={time.time()} rank={comm.rank} step={bad_step}", flush=True)
                return loss * float("nan")

            trainer.workload.loss_fn = poisoned
        return trainer

    cli.build_trainer = build_with_nan
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
