"""AWQ (Lin et al., 2023): before rounding, scale each input channel of a projection by s (and divide the
operation that produces that channel by s, so the float model is unchanged); channels that carry large
activations get larger weights and so a finer grid relative to their values. As AutoAWQ does it, per decoder
layer on the float layer's own inputs:

* scale groups: input norm -> q/k/v; v -> o (only without grouped-query attention, where v's output channels
  are o's inputs one to one); post-attention norm -> gate/up; up -> down;
* s = x_mean**a / (w_mean**(1 - a) + 1e-4), normalised by sqrt(max * min), for a in 0, 0.05, ... 0.95, where
  x_mean is the mean |x| of each input channel and w_mean the mean of |w| relative to its group's max; the a
  whose fake-quantized layer's output is closest (MSE) to the float output wins (gate/up judged on the MLP's
  output, as AutoAWQ's module2inspect; the others on their own outputs);
* then a clip search: for each output row and group, the largest |w| kept, shrunk by 0 .. 45% in steps of
  5%, chosen for the smallest error of that group's partial products over 512 sampled tokens; query and key
  rows are not clipped (their errors are amplified by the softmax).

Layer i + 1's inputs are layer i's float outputs (AutoAWQ's order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from pagoda.model.layers.activation import silu_and_mul
from pagoda.model.layers.quantization.grid import dequantize_groups, quantize_groups
from pagoda.model.llama import DecoderLayer, LlamaForCausalLM
from pagoda.quantize.calibration import LayerRunner, inputs_of, projections
from pagoda.quantize.gptq import QuantizedWeight

GRID = 20
CLIP_STEPS = 10  # shrinks of 0, 5, ... 45%
CLIP_TOKENS = 512
SEARCH_TOKENS = 2048  # tokens the scale search measures its loss on (x_mean uses all)
BITS = 4


def fake_quantize(w: torch.Tensor, group: int) -> torch.Tensor:
    return dequantize_groups(*quantize_groups(w, group, BITS, sym=False), group)


def _sample(x: torch.Tensor, count: int) -> torch.Tensor:
    return x[:: max(1, x.shape[0] // count)][:count]


def search_scale(weight: torch.Tensor, x: torch.Tensor, group: int,
                 output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The best per-input-channel scale [in] for ``weight`` [out, in] on inputs ``x`` [tokens, in];
    ``output(x, w)`` is what the loss compares (the projection's output, or the block's it feeds)."""
    out, k = weight.shape
    w = weight.float()
    grouped = w.abs().reshape(out, -1, group)
    w_mean = (grouped / (grouped.amax(dim=2, keepdim=True) + 1e-6)).reshape(out, k).mean(dim=0)
    x_mean = x.abs().mean(dim=0)
    xs = _sample(x, SEARCH_TOKENS)
    reference = output(xs, w)
    best, best_loss = torch.ones(k), float("inf")
    for ratio in (i / GRID for i in range(GRID)):
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        loss = (output(xs, fake_quantize(w * s, group) / s) - reference).pow(2).mean().item()
        if loss < best_loss:
            best, best_loss = s, loss
    return best


def search_clip(weight: torch.Tensor, x: torch.Tensor, group: int) -> torch.Tensor:
    """Per (row, group) the largest |w| to keep [out, groups]: the shrink whose rounded group's partial
    products over sampled tokens are closest to the float group's."""
    out, k = weight.shape
    xs = _sample(x, CLIP_TOKENS).reshape(-1, k // group, group)  # [tokens, groups, group]
    best_max = torch.empty(out, k // group)
    for rows in torch.arange(out).split(256):
        w = weight[rows].float().reshape(len(rows), -1, group)
        org_max = w.abs().amax(dim=2, keepdim=True)
        reference = torch.einsum("tgk,ogk->otg", xs, w)
        best_err = torch.full((len(rows), k // group), float("inf"))
        chosen = org_max[:, :, 0].clone()
        for step in range(CLIP_STEPS):
            max_val = org_max * (1 - step / GRID)
            clipped = torch.maximum(torch.minimum(w, max_val), -max_val).reshape(len(rows), k)
            q = fake_quantize(clipped, group).reshape(len(rows), -1, group)
            err = (torch.einsum("tgk,ogk->otg", xs, q) - reference).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chosen = torch.where(better, max_val[:, :, 0], chosen)
        best_max[rows] = chosen
    return best_max


def clip_(weight: torch.Tensor, max_val: torch.Tensor, group: int) -> None:
    w = weight.view(weight.shape[0], -1, group)
    w.copy_(torch.maximum(torch.minimum(w, max_val[:, :, None]), -max_val[:, :, None]))


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.T


def awq_layer(layer: DecoderLayer, inputs: dict[str, torch.Tensor], group: int) -> None:
    """Scale and clip one layer's float weights in place (the quantization itself follows)."""
    q_rows = layer.q_size + layer.kv_size  # q and k rows of the fused qkv: never clipped
    v_rows = slice(q_rows, q_rows + layer.kv_size)
    down = layer.down_proj.weight.float()
    inter = down.shape[1]

    def mlp(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x @ gate_up.T) @ down.T

    # input norm -> q/k/v
    s = search_scale(layer.qkv_proj.weight, inputs["qkv_proj"], group, _linear)
    layer.input_layernorm.weight.div_(s.to(layer.input_layernorm.weight.dtype))
    layer.qkv_proj.weight.mul_(s.to(layer.qkv_proj.weight.dtype))
    inputs["qkv_proj"] = inputs["qkv_proj"] / s
    # v -> o, where v's channels are o's inputs one to one
    if layer.q_size == layer.kv_size:
        s = search_scale(layer.o_proj.weight, inputs["o_proj"], group, _linear)
        layer.qkv_proj.weight[v_rows].div_(s[:, None].to(layer.qkv_proj.weight.dtype))
        layer.o_proj.weight.mul_(s.to(layer.o_proj.weight.dtype))
        inputs["o_proj"] = inputs["o_proj"] / s
    # post-attention norm -> gate/up, judged on the MLP's output
    s = search_scale(layer.gate_up_proj.weight, inputs["gate_up_proj"], group, mlp)
    layer.post_attention_layernorm.weight.div_(s.to(layer.post_attention_layernorm.weight.dtype))
    layer.gate_up_proj.weight.mul_(s.to(layer.gate_up_proj.weight.dtype))
    inputs["gate_up_proj"] = inputs["gate_up_proj"] / s
    # up -> down
    s = search_scale(layer.down_proj.weight, inputs["down_proj"], group, _linear)
    layer.gate_up_proj.weight[inter:].div_(s[:, None].to(layer.gate_up_proj.weight.dtype))
    layer.down_proj.weight.mul_(s.to(layer.down_proj.weight.dtype))
    inputs["down_proj"] = inputs["down_proj"] / s

    v = layer.qkv_proj.weight[v_rows]
    clip_(v, search_clip(v, inputs["qkv_proj"], group), group)
    for name in ("o_proj", "gate_up_proj", "down_proj"):
        weight = getattr(layer, name).weight
        clip_(weight, search_clip(weight, inputs[name], group), group)


@torch.inference_mode()
def awq_model(model: LlamaForCausalLM, sequences: list[torch.Tensor], group_size: int) -> dict[str, QuantizedWeight]:
    """Every decoder projection scaled, clipped and rounded, keyed by parameter name; the model keeps the
    scaled (float) weights and norms the checkpoint is written with."""
    runner = LayerRunner(model, len(sequences[0]))
    states = runner.embed(sequences)
    results: dict[str, QuantizedWeight] = {}
    for index, layer in enumerate(tqdm(model.layers, desc="AWQ", unit="layer", disable=None)):
        linears = projections(layer)
        for name, linear in linears.items():
            if linear.in_features % group_size:
                raise ValueError(f"AWQ's layout needs the group size to divide every layer's inputs: layers.{index}."
                                 f"{name} has {linear.in_features}; pick --group-size 32 or 64")
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
        with inputs_of(linears, lambda name, x: captured[name].append(x.float())):
            next_states = runner.run(layer, states)
        awq_layer(layer, {name: torch.cat(xs) for name, xs in captured.items()}, group_size)
        for name, linear in linears.items():
            q, scale, zero = quantize_groups(linear.weight, group_size, BITS, sym=False)
            results[f"layers.{index}.{name}"] = QuantizedWeight(
                q, scale, zero, (torch.arange(linear.in_features) // group_size).to(torch.int32))
        states = next_states
    return results
