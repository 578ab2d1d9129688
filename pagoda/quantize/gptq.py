"""GPTQ (Frantar et al., 2022): quantize a weight matrix column by column, each column's rounding error spread
over the columns not yet quantized in proportion to the inverse Hessian of the layer's inputs, so that the
layer's *outputs* on the calibration data move as little as possible. As AutoGPTQ does it: H = 2/N X^T X,
dead inputs zeroed, damping of ``damp`` times the mean diagonal, the upper Cholesky factor of H^-1, lazy
updates in blocks of 128 columns, the group grids found when each group's first column comes up (from weights
already corrected for the earlier columns' errors), and act-order (``desc_act``): columns taken in decreasing
order of their Hessian diagonal.

The driver quantizes the decoder layer by layer and, within a layer, its projections in the order their
inputs are computed (q/k/v, o, gate/up, down), each from inputs computed with the ones before it already
quantized; the next layer's inputs come from the quantized layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from pagoda.model.layers.quantization.grid import grid, quantize_groups, to_codes
from pagoda.model.llama import LlamaForCausalLM
from pagoda.quantize.calibration import LayerRunner, inputs_of, projections

LAZY_BLOCK = 128  # columns per lazy update (AutoGPTQ's blocksize)


@dataclass
class QuantizedWeight:
    """One projection's codes in the checkpoint's column order, with what GPTQ's layout stores beside them."""

    q: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # fp16 [out, groups]
    zero: torch.Tensor  # uint8 [out, groups]
    g_idx: torch.Tensor  # int32 [in]: each input column's group

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.scale.float()[:, g] * (self.q.float() - self.zero.float()[:, g])).to(dtype)


@dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    group_size: int = 128  # -1: one group per row
    sym: bool = False
    desc_act: bool = False
    damp: float = 0.01
    # The least zero point the checkpoint can store (GPTQ's v1 layout stores zero - 1).
    min_zero: int = 1


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, settings: GPTQSettings) -> QuantizedWeight:
    """One weight [out, in] against its inputs' Hessian [in, in]."""
    s = settings
    w = weight.float().clone()
    h = hessian.float().clone()
    k = w.shape[1]
    group = k if s.group_size == -1 or s.group_size >= k else s.group_size
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if s.desc_act else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += s.damp * torch.mean(torch.diag(h)) * torch.eye(k)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # Blocks hold whole groups, so that a group's grid is found from columns already corrected.
    block = group * -(-LAZY_BLOCK // group) if group < k else LAZY_BLOCK
    codes = torch.zeros_like(w)
    scales, zeros = [], []
    if group == k:  # one grid per row, from the whole row
        scale, zero = grid(w, s.bits, s.sym, s.min_zero)
        scales.append(scale)
        zeros.append(zero)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group < k and (i1 + i) % group == 0:
                scale, zero = grid(w1[:, i : i + group], s.bits, s.sym, s.min_zero)
                scales.append(scale)
                zeros.append(zero)
            col = w1[:, i]
            q = to_codes(col[:, None], scale, zero, s.bits)[:, 0]
            codes[:, i1 + i] = q
            err = (col - scale * (q - zero)) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return QuantizedWeight(
        q=codes[:, inverse].to(torch.uint8),
        scale=torch.stack(scales, dim=1).to(torch.float16),
        zero=torch.stack(zeros, dim=1).to(torch.uint8),
        g_idx=(inverse // group).to(torch.int32),  # column j was quantized in position inverse[j]
    )


@torch.inference_mode()
def gptq_model(model: LlamaForCausalLM, sequences: list[torch.Tensor], settings: GPTQSettings) -> dict[str, QuantizedWeight]:
    """Every decoder projection quantized, keyed by its parameter name (``layers.3.qkv_proj``); the model's
    weights are left holding the quantized values."""
    runner = LayerRunner(model, len(sequences[0]))
    states = runner.embed(sequences)
    results: dict[str, QuantizedWeight] = {}
    for index, layer in enumerate(tqdm(model.layers, desc="GPTQ", unit="layer", disable=None)):
        for name, linear in projections(layer).items():
            k = linear.in_features
            xtx = torch.zeros(k, k)
            tokens = [0]

            def accumulate(_: str, x: torch.Tensor) -> None:
                x = x.float()
                xtx.addmm_(x.T, x)
                tokens[0] += x.shape[0]

            with inputs_of({name: linear}, accumulate):
                runner.run(layer, states)
            result = gptq_quantize(linear.weight, xtx * (2 / tokens[0]), settings)
            linear.weight.copy_(result.dequantize(linear.weight.dtype))
            results[f"layers.{index}.{name}"] = result
        states = runner.run(layer, states)
    return results


def rtn_model(model: LlamaForCausalLM, settings: GPTQSettings) -> dict[str, QuantizedWeight]:
    """Round to nearest on the same grids, no calibration (``pagoda quantize --method int4|int8``)."""
    results = {}
    for index, layer in enumerate(model.layers):
        for name, linear in projections(layer).items():
            k = linear.in_features
            group = k if settings.group_size == -1 else settings.group_size
            q, scale, zero = quantize_groups(linear.weight, group, settings.bits, settings.sym, settings.min_zero)
            results[f"layers.{index}.{name}"] = QuantizedWeight(q, scale, zero,
                                                                (torch.arange(k) // group).to(torch.int32))
    return results

