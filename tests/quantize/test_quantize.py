"""`pagoda quantize`: GPTQ's error compensation and AWQ's scaling against round to nearest on the outputs
they exist to protect, the calibration runner, the written checkpoints (Pagoda's packer against the published
loops; they load and stay close to the float model), and the CLI's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pagoda import LLM
from pagoda.cli import main
from pagoda.model.layers.quantization.grid import dequantize_groups, quantize_groups
from pagoda.model.layers.quantization.packing import pack_int32
from pagoda.model.layers.quantization import awq as awq_layout
from pagoda.model.loader import load_model
from pagoda.quantize import awq as awq_module
from pagoda.quantize.awq import awq_layer, search_scale
from pagoda.quantize.calibration import LayerRunner, inputs_of, projections, token_sequences
from pagoda.quantize.gptq import GPTQSettings, gptq_quantize
from tests.model.test_gptq_awq import PREFILL_TOKENS, prefill_logits, reference_awq_pack, reference_gptq_pack


def _correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5)
    x[:, :4] *= 8
    return x + 0.1 * torch.randn(tokens, k, generator=g)


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group", [32, 64, -1])
def test_gptq_moves_the_outputs_less_than_rounding_to_nearest(desc_act: bool, group: int) -> None:
    x, w = _correlated_inputs(2048, 128), torch.randn(48, 128)
    result = gptq_quantize(w, 2 * x.T @ x / len(x), GPTQSettings(group_size=group, desc_act=desc_act))
    size = 128 if group == -1 else group
    rtn = dequantize_groups(*quantize_groups(w, size, bits=4, sym=False, min_zero=1), size)

    def output_error(wq: torch.Tensor) -> float:
        return ((x @ (w - wq).T) ** 2).mean().item()

    assert output_error(result.dequantize(torch.float32)) < 0.6 * output_error(rtn)
    assert int(result.q.max()) <= 15 and int(result.zero.min()) >= 1  # v1 can store it
    # Each group holds `size` columns; act-order takes them in order of the Hessian's diagonal.
    counts = torch.bincount(result.g_idx.long())
    assert (counts == size).all()
    assert (desc_act and group != -1) == (not torch.equal(result.g_idx.long(), torch.arange(128) // size))


def test_gptq_on_8_bits_symmetric_keeps_the_zero_at_128() -> None:
    x, w = _correlated_inputs(512, 64), torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    result = gptq_quantize(w, x.T @ x, GPTQSettings(bits=8, group_size=-1, sym=True))
    assert (result.zero == 128).all()
    # Seeded: GPTQ moves later weights to make up for earlier roundings, so the largest error depends on the
    # draw (0.017-0.030 of the max over 60 draws); unseeded, this test passed or failed with the test order.
    assert (result.dequantize(torch.float32) - w).abs().max() < w.abs().max() / 50


def test_awq_scales_move_the_outputs_less_than_rounding_to_nearest() -> None:
    x, w = _correlated_inputs(1024, 128, seed=1), torch.randn(64, 128)

    def linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return inputs @ weight.T

    s = search_scale(w, x, 32, linear)
    rtn = dequantize_groups(*quantize_groups(w, 32, bits=4, sym=False), 32)
    scaled = dequantize_groups(*quantize_groups(w * s, 32, bits=4, sym=False), 32) / s
    assert ((x @ (w - scaled).T) ** 2).mean() < 0.9 * ((x @ (w - rtn).T) ** 2).mean()
    assert not torch.equal(s, torch.ones_like(s))  # the large channels got scaled


def test_awq_scaling_keeps_the_float_layer_s_function(make_tiny_model, monkeypatch) -> None:
    """Scales folded into the norms and the v / up rows (no grouped-query attention here, so v -> o too):
    before clipping and rounding, the layer computes what it did."""
    folder, _ = make_tiny_model("llama", seed=1, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                num_key_value_heads=4)
    loaded = load_model(str(folder), torch.float32)
    layer = loaded.model.layers[0]
    runner = LayerRunner(loaded.model, 64)
    states = runner.embed(token_sequences(loaded.tokenizer, "It is a truth universally acknowledged. " * 40, 64, 2))
    captured: dict[str, torch.Tensor] = {}
    with inputs_of(projections(layer), lambda name, x: captured.setdefault(name, x.float().clone())):
        before = runner.run(layer, states)
    norm_before = layer.input_layernorm.weight.clone()
    monkeypatch.setattr(awq_module, "CLIP_STEPS", 1)  # a shrink of 0: clipping at the max changes nothing
    awq_layer(layer, captured, 32)
    assert not torch.equal(norm_before, layer.input_layernorm.weight)
    for a, b in zip(before, runner.run(layer, states)):
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-4)


def test_the_layer_runner_leaves_its_inputs_as_they_were(make_tiny_model) -> None:
    """GPTQ runs a layer once per projection over the same states: a layer that updates its residual input in
    place must not change them (it did, and GPTQ came out worse than rounding)."""
    folder, _ = make_tiny_model("llama")
    loaded = load_model(str(folder), torch.float32)
    runner = LayerRunner(loaded.model, 32)
    states = runner.embed([torch.arange(100, 132)])
    first = runner.run(loaded.model.layers[0], states)
    copies = [(s.hidden.clone(), s.residual.clone()) for s in first]
    once = runner.run(loaded.model.layers[1], first)
    twice = runner.run(loaded.model.layers[1], first)
    for (hidden, residual), state in zip(copies, first):
        assert torch.equal(hidden, state.hidden) and torch.equal(residual, state.residual)
    assert torch.equal(once[0].hidden, twice[0].hidden)


def test_pagodas_packer_writes_the_published_layouts() -> None:
    rng = np.random.default_rng(0)
    q4 = rng.integers(0, 16, (64, 32))
    zeros = rng.integers(1, 16, (2, 32))
    ref_qweight, ref_qzeros = reference_gptq_pack(q4, zeros, 4, v1=True)
    assert np.array_equal(pack_int32(torch.from_numpy(q4), 4, dim=0).numpy(), ref_qweight)
    assert np.array_equal(pack_int32(torch.from_numpy(zeros - 1), 4, dim=1).numpy(), ref_qzeros)
    q8 = rng.integers(0, 256, (64, 24))
    assert np.array_equal(pack_int32(torch.from_numpy(q8), 8, dim=0).numpy(), reference_gptq_pack(q8, zeros, 8, False)[0])
    assert np.array_equal(pack_int32(torch.from_numpy(q4.T.copy()), 4, dim=1, order=awq_layout.ORDER).numpy(),
                          reference_awq_pack(q4.T))
    # GPTQ's symmetric 4-bit zero point 8, stored minus one in v1: the well-known 0x77777777 words.
    assert (pack_int32(torch.full((1, 8), 7), 4, dim=1) == 0x77777777).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq", "int4", "int8"])
def test_a_written_checkpoint_loads_and_stays_close_to_the_float_model(method: str, make_tiny_model, tmp_path,  # noqa: ANN001
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The written weights, through the dense product (a prompt longer than the int8-activation kernel
    takes, AMX tiles and the panel kernel for prompts off): what is measured is the quantization of the
    weights alone."""
    monkeypatch.setenv("PAGODA_DISABLE_AMX", "1")
    monkeypatch.setattr("pagoda.model.layers.quantization.gguf.panels_for_prompts", lambda ops: False)
    folder, hf = make_tiny_model("llama", seed=2, hidden_size=128, intermediate_size=256)
    out = tmp_path / method
    args = ["quantize", "--method", method, str(folder), str(out), "--seq-len", "64", "--max-sequences", "8"]
    if method in ("gptq", "awq", "int4"):
        args += ["--group-size", "32"]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == ("awq" if method == "awq" else "gptq")
    assert config["bits"] == (8 if method == "int8" else 4)
    llm = LLM(str(out), dtype="float32", num_kv_blocks=16, block_size=4)
    with torch.no_grad():
        expected = hf(torch.tensor([PREFILL_TOKENS])).logits[0].float()
    got = prefill_logits(llm, PREFILL_TOKENS)
    relative = (got - expected).norm() / expected.norm()
    assert relative < (0.02 if method == "int8" else 0.25), relative
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= (0.9 if method == "int8" else 0.5)


def test_the_cli_refuses_what_a_method_cannot_write(tmp_path, capsys) -> None:
    for args, message in [
        (["--method", "awq", "--sym"], "--sym does not fit --method awq"),
        (["--method", "gptq", "--bits", "8"], "--bits 8 needs --sym"),
        (["--method", "int8", "--bits", "4"], "--bits 4 does not fit --method int8"),
        (["--method", "gptq", "--group-size", "48"], "--group-size must be -1 or a multiple of 32, got 48"),
    ]:
        assert main(["quantize", *args, "smollm2-135m", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
