"""swa_lib: weight averaging for distributed training (SWA, SWAP, SWALP, HWA, LAWA/EMA).

The pieces a researcher drops into their own loop:
  swa_lib.comm       one thin communication layer (Horovod, torch.distributed, single process)
  swa_lib.averaging  what averaging methods share: flat views, BN recompute over a process group
                     (built on torch.optim.swa_utils), evaluation, and the own-loop pieces
                     HWAAverager, swap_average_, LAWA, EMA (see examples/)
  swa_lib.methods    one small strategy object per method, with the hooks the loop calls
                     (the contract: swa_lib/methods/base.py)
  swa_lib.quant      block-floating-point quantization (SWALP), kept outside the loop
and the reproduction machinery around them: config, loop, checkpoint, run_log, cli, and
workload, the one module that needs the checkout's data/ and models/ (not for own loops).
"""
__version__ = "0.1.0"
