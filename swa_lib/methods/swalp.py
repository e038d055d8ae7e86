"""SWALP: SWA of a model trained in block floating point (Yang et al., ICML 2019, arXiv 1904.11943).

The training model computes with quantized weights, activations, errors, gradients
and momentum (swa_lib.quant, kept outside the loop: hooks on the model and a wrapper
around the optimizer). The average is kept in full precision, taken once per epoch
from `swa_start_epoch` as in classic SWA, and has no quantizers: its BN statistics
are recomputed and it is evaluated in fp32.

With `average: false` the same strategy is low-precision SGD, the "SGD 8-bit" row of
the paper's table. With every word length set to null it is classic SWA, bit for bit
(tests/test_swalp.py checks this).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from swa_lib.methods.swa import SWA, SWAConfig
from swa_lib.quant import BlockFloat, QuantizedSGD, insert_quantizers, remove_quantizers

KINDS = ("weight", "grad", "momentum", "acc", "act", "err")


@dataclass
class SWALPConfig(SWAConfig):
    """SWA settings plus one block-floating-point format per tensor kind (null = fp32)."""

    name: ClassVar[str] = "swalp"
    average: bool = True  # false: low-precision SGD without the full-precision average
    rounding: str = "stochastic"  # stochastic | nearest (round half up)
    # Word lengths in bits; 8 everywhere in the paper's main table (verified, official README).
    weight_bits: int | None = 8
    grad_bits: int | None = 8
    momentum_bits: int | None = 8
    acc_bits: int | None = 8
    act_bits: int | None = 8
    err_bits: int | None = 8
    # "small": one exponent per slice along dim 0 (per filter / per sample); "big": per tensor.
    # The paper's 8-bit small-block table uses small blocks for weights and optimizer state.
    weight_block: str = "small"
    grad_block: str = "small"
    momentum_block: str = "small"
    acc_block: str = "small"
    # The official activation/error quantizer ignores its small-block flag and uses big blocks.
    act_block: str = "big"
    err_block: str = "big"
    # true: quantize with two torch.compile'd kernels per call (swa_lib/quant/fused.py):
    # faster, compiled on first use; stochastic noise comes from a seeded hash, so the
    # values differ from the default eager quantizer's (the distribution does not).
    fused: bool = False

    def validate(self, cfg) -> list[str]:
        p = super().validate(cfg) if self.average else []
        if self.rounding not in ("stochastic", "nearest"):
            p.append(f"method.rounding: {self.rounding!r} is not one of stochastic, nearest")
        for kind in KINDS:
            bits, block = getattr(self, f"{kind}_bits"), getattr(self, f"{kind}_block")
            if bits is not None and not 2 <= bits <= 64:
                p.append(f"method.{kind}_bits: {bits} must be in [2, 64] or null (full precision)")
            if block not in ("small", "big"):
                p.append(f"method.{kind}_block: {block!r} is not one of small, big")
        return p

    def format(self, kind: str) -> BlockFloat | None:
        bits = getattr(self, f"{kind}_bits")
        return None if bits is None else BlockFloat(bits, getattr(self, f"{kind}_block"), self.rounding)


class SWALP(SWA):
    """SWA with a low-precision training model; the result is the fp32 average ("swa")."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.output_name = "swa" if cfg.method.average else "model"

    def setup(self, ctx) -> None:
        m = self.cfg.method
        # SWALP: the same seed on every rank, so quantized updates of data-parallel replicas agree.
        self.generator = torch.Generator(device=ctx.device).manual_seed(self.cfg.run.seed)
        insert_quantizers(ctx.model, m.format("act"), m.format("err"), fused=m.fused)
        ctx.optimizer = QuantizedSGD(ctx.optimizer, fmt_weight=m.format("weight"), fmt_grad=m.format("grad"),
                                     fmt_momentum=m.format("momentum"), fmt_acc=m.format("acc"),
                                     generator=self.generator, fused=m.fused)
        super().setup(ctx)  # the average is a deep copy of the quantized model ...
        remove_quantizers(self.average.module)  # ... that must compute in full precision

    @property
    def phase(self) -> str:
        return super().phase if self.cfg.method.average else "lp_sgd"

    def planned_phase(self, epoch: int) -> str:
        return super().planned_phase(epoch) if self.cfg.method.average else "lp_sgd"

    def after_epoch(self, epoch: int, train_metrics: dict) -> None:
        if self.cfg.method.average:
            super().after_epoch(epoch, train_metrics)

    def eval_targets(self):
        return super().eval_targets() if self.cfg.method.average else {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
