"""swa_lib: weight averaging for distributed training (SWA, SWAP, SWALP, HWA, LAWA/EMA).

The pieces a researcher drops into their own loop:
  swa_lib.comm       one thin communication layer (Horovod, torch.distributed, single process)
  swa_lib.averaging  BN recompute over a process group, built on torch.optim.swa_utils
  swa_lib.methods    one small strategy object per method, with the hooks the loop calls
  swa_lib.quant      block-floating-point quantization (SWALP), kept outside the loop
and the reproduction machinery around them: config, loop, checkpoint, run_log, cli.
"""
__version__ = "0.1.0"
