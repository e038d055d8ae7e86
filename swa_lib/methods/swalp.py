"""SWALP: SWA of a model trained in block floating point (Yang et al., ICML 2019, arXiv 1904.11943).

The training model computes with quantized weights, activations, errors, gradients
and momentum (swa_lib.quant, kept outside the loop: hooks on the model and a wrapper
around the optimizer). The average is kept in full precision, taken once per epoch
from `swa_start_epoch` as in classic SWA, and has no quantizers: its BN statistics
are recomputed and it is evaluated in fp32.

As in the official code (stevenygd/SWALP train.py), every evaluated model gets a BN
update on training data first: the low-precision training model is evaluated as a
BN-updated copy ("model"), and the paper's "SGD-LP" number is the same run's
low-precision model at epoch `swa_start_epoch`, BN-updated, kept and evaluated as
"swa_start_model" (summary key `swa_start_model/acc`), not a separate run. Those extra
copies draw their rounding noise from generators of their own and their BN update runs
under a forked RNG, so the run's final weights do not depend on them.

Where activations and errors are quantized is `quant_placement` (swa_lib.quant.placement).
With `average: false` the strategy is plain low-precision SGD. With every word length set
to null it is classic SWA, bit for bit (tests/test_swalp.py checks this).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from swa_lib.averaging import recompute_bn_
from swa_lib.methods.base import EvalTarget
from swa_lib.methods.swa import SWA, SWAConfig
from swa_lib.quant import (
    PLACEMENTS,
    ActivationErrorQuantizer,
    BlockFloat,
    QuantizedSGD,
    insert_quantizers_by_placement,
    remove_quantizers,
)
from swa_lib.quant.placement import OFFICIAL_PLACEMENT_MODELS

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
    # Where activations (forward) and errors (backward) are quantized, see swa_lib.quant.placement:
    # layer_inputs (every Conv2d / Linear input; any model) | relu_outputs (after every ReLU; any
    # model) | official (the official SWALP VGG16 / PreResNet placement; those models only).
    quant_placement: str = "layer_inputs"
    # Evaluate the training model as a copy whose BN statistics were recomputed on training data
    # (the official code BN-updates every model it evaluates). false: evaluate it as it trains.
    bn_update_model: bool = True
    # Keep the low-precision model of epoch swa_start_epoch (BN-updated) and evaluate it as
    # "swa_start_model": the paper's SGD-LP baseline. Needs average: true.
    record_swa_start_model: bool = True

    def validate(self, cfg) -> list[str]:
        p = super().validate(cfg) if self.average else []
        if self.quant_placement not in PLACEMENTS:
            p.append(f"method.quant_placement: {self.quant_placement!r} is not one of {', '.join(PLACEMENTS)}")
        elif self.quant_placement == "official" and cfg.model.name not in OFFICIAL_PLACEMENT_MODELS:
            p.append(f"method.quant_placement: official is defined for {', '.join(OFFICIAL_PLACEMENT_MODELS)}, "
                     f"not {cfg.model.name}; use layer_inputs or relu_outputs")
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
        self.swa_start_model: nn.Module | None = None

    def prepare_model(self, model: nn.Module, device: torch.device) -> None:
        m = self.cfg.method
        insert_quantizers_by_placement(model, m.quant_placement, m.format("act"), m.format("err"), fused=m.fused)

    def build_optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        m = self.cfg.method
        # SWALP: the same seed on every rank, so quantized updates of data-parallel replicas agree.
        self.generator = torch.Generator(device=device).manual_seed(self.cfg.run.seed)
        return QuantizedSGD(super().build_optimizer(model, device), fmt_weight=m.format("weight"),
                            fmt_grad=m.format("grad"), fmt_momentum=m.format("momentum"), fmt_acc=m.format("acc"),
                            generator=self.generator, fused=m.fused)

    def setup(self, ctx) -> None:
        super().setup(ctx)  # the average is a deep copy of the quantized model ...
        remove_quantizers(self.average.module)  # ... that must compute in full precision

    @property
    def phase(self) -> str:
        return super().phase if self.cfg.method.average else "lp_sgd"

    def planned_phase(self, epoch: int) -> str:
        return super().planned_phase(epoch) if self.cfg.method.average else "lp_sgd"

    def after_epoch(self, epoch: int, train_metrics: dict) -> None:
        m = self.cfg.method
        if m.average:
            super().after_epoch(epoch, train_metrics)
            if m.record_swa_start_model and epoch + 1 == m.swa_start_epoch:
                self.swa_start_model = self._bn_updated_copy()

    def eval_targets(self):
        """The average, and, replacing the loop's raw training model under the same name
        "model", its BN-updated copy; from swa_start on also the kept "swa_start_model"."""
        targets = super().eval_targets() if self.cfg.method.average else {}
        if self.cfg.method.bn_update_model:
            # The loop recomputes its BN statistics under a forked RNG (see _bn_updated_copy).
            targets["model"] = EvalTarget(self._own_copy(), recompute_bn=True, isolate_rng=True)
        if self.swa_start_model is not None:
            # The same noise at every evaluation: the recorded result does not drift.
            self._own_generator(self.swa_start_model, self.cfg.run.seed)
            targets["swa_start_model"] = EvalTarget(self.swa_start_model)
        return targets

    def _own_generator(self, model: nn.Module, seed: int) -> None:
        """Give the quantizers of a copy their own generator, so that using the copy never
        draws from the training model's noise stream (the global RNG or self.generator)."""
        generator = torch.Generator(device=self.ctx.device).manual_seed(seed)
        for module in model.modules():
            if isinstance(module, ActivationErrorQuantizer):
                module.generator = generator

    def _own_copy(self) -> nn.Module:
        """A copy of the low-precision training model whose quantizers draw their own noise."""
        model = copy.deepcopy(self.ctx.model)
        self._own_generator(model, self.cfg.run.seed + self.ctx.step)
        return model

    def _bn_updated_copy(self) -> nn.Module:
        """`_own_copy` with BN statistics recomputed on training data as the loop does for an
        EvalTarget, without advancing any RNG the run uses (dropout and rounding noise in the BN
        update's forward passes draw from forked states)."""
        ctx, model = self.ctx, self._own_copy()
        epoch = max(ctx.epoch - 1, 0)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with ctx.timer("bn_update"), torch.random.fork_rng(devices=devices):
            recompute_bn_(model, ctx.workload, self.data_shard(epoch), epoch, comm=ctx.comm, group=self.eval_group(),
                          max_batches=self.cfg.eval.bn_update_batches, device=ctx.device)
        return model

    def state_dict(self) -> dict:
        kept = None if self.swa_start_model is None else self.swa_start_model.state_dict()
        return {**super().state_dict(), "generator": self.generator.get_state(), "swa_start_model": kept}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        if state.get("swa_start_model") is not None:
            self.swa_start_model = copy.deepcopy(self.ctx.model)
            self.swa_start_model.load_state_dict(state["swa_start_model"])
