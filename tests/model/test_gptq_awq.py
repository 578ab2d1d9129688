"""GPTQ and AWQ checkpoints: tiny Llama checkpoints packed by the published arithmetic (AutoGPTQ's and
AutoAWQ's packing loops, written out here independently of Pagoda's packer) load and give HF transformers'
logits for the same dequantized weights; act-order g_idx, 8-bit GPTQ, both GPTQ formats; Pagoda's packer
against those loops; errors that name the unsupported setting or the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda import LLM
from pagoda.engine.core.request import Request
from pagoda.api.params import SamplingParams
from pagoda.model.layers.quantization.gguf import NATIVE_MAX_ROWS
from pagoda.model.layers.quantization.select import quant_config

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
FUSED = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv", "mlp.gate_proj": "gate_up",
         "mlp.up_proj": "gate_up"}


def reference_gptq_pack(intweight: np.ndarray, zeros: np.ndarray, bits: int, v1: bool) -> tuple[np.ndarray, np.ndarray]:
    """AutoGPTQ's pack loops: intweight [in, out], zeros [groups, out] -> qweight, qzeros (int32)."""
    intweight, zeros = intweight.astype(np.uint32), zeros.astype(np.uint32)
    if v1:
        zeros = zeros - 1  # the v1 format stores zero - 1 (zeros here are >= 1)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 32 // bits):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 32 // bits):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += 32 // bits
        col += 1
    return qweight.view(np.int32), qzeros.view(np.int32)


def reference_awq_pack(values: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM packing of [rows, out] 4-bit values: eight a word, in its order map."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    values = values.astype(np.uint32)
    packed = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
    for col in range(values.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + order_map[i]] << (i * 4)
    return packed.view(np.int32)


def _codes(out: int, k: int, group: int, bits: int, sym: bool, g_idx: np.ndarray, rng: np.random.Generator):
    """Random codes, zeros and fp16 scales, and the weight [out, in] they stand for."""
    groups = -(-k // group)
    q = rng.integers(0, 2**bits, (k, out))
    zeros = np.full((groups, out), 2 ** (bits - 1)) if sym else rng.integers(1, 2**bits, (groups, out))
    scales = rng.uniform(0.004, 0.02, (groups, out)).astype(np.float16)
    weight = scales.astype(np.float32)[g_idx] * (q - zeros[g_idx])
    return q, zeros, scales, torch.from_numpy(weight.T.copy()).float()


def write_quantized(hf_folder: Path, hf_model, dest: Path, layout: str, bits: int = 4, group: int = 32,  # noqa: ANN001
                    sym: bool = False, desc_act: bool = False, fmt: str = "gptq", seed: int = 0) -> Path:
    """A quantized copy of a tiny HF checkpoint; ``hf_model``'s projections get the dequantized weights."""
    rng = np.random.default_rng(seed)
    state = {name: t.detach().clone() for name, t in hf_model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(hf_model.config.num_hidden_layers):
        orders: dict[str, np.ndarray] = {}  # one act-order per input a fused layer shares
        for proj in PROJECTIONS:
            prefix = f"model.layers.{layer}.{proj}"
            out, k = state[f"{prefix}.weight"].shape
            key = FUSED.get(proj, proj)
            if key not in orders:
                orders[key] = rng.permutation(k) if desc_act else np.arange(k)
            size = k if group == -1 else group
            g_idx = np.argsort(orders[key]) // size  # column j is quantized in position invperm[j]
            q, zeros, scales, weight = _codes(out, k, size, bits, sym, g_idx, rng)
            state[f"{prefix}.weight"] = weight
            if layout == "gptq":
                qweight, qzeros = reference_gptq_pack(q, zeros, bits, v1=fmt == "gptq")
                tensors[f"{prefix}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
            else:
                qweight, qzeros = reference_awq_pack(q), reference_awq_pack(zeros)
            tensors[f"{prefix}.qweight"] = torch.from_numpy(qweight.copy())
            tensors[f"{prefix}.qzeros"] = torch.from_numpy(qzeros.copy())
            tensors[f"{prefix}.scales"] = torch.from_numpy(scales.copy())
    for name, tensor in state.items():
        if not any(name == f"model.layers.{i}.{p}.weight" for i in range(hf_model.config.num_hidden_layers)
                   for p in PROJECTIONS):
            tensors[name] = tensor.contiguous()
    hf_model.load_state_dict(state)
    dest.mkdir()
    save_file(tensors, str(dest / "model.safetensors"))
    config = json.loads((hf_folder / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
         "checkpoint_format": fmt}
        if layout == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"})
    (dest / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_folder / name, dest / name)
    return dest


def prefill_logits(llm: LLM, tokens: list[int]) -> torch.Tensor:
    engine, runner = llm.engine, llm.engine.runner
    req = Request("r", list(tokens), SamplingParams(), frozenset())
    assert engine.scheduler.kv.allocate(req, len(tokens))
    hidden = runner.hidden_states(req.token_ids, 0, len(tokens), req.block_ids)
    with torch.inference_mode():
        logits = runner.model.compute_logits(hidden).float()
    engine.scheduler.kv.free(req)
    return logits


TOKENS = [1, 504, 3458, 282, 4649, 314, 2411, 30, 216, 9000, 77, 1254]
# A prompt of more rows than the int8-activation kernel takes: the dense matmul over dequantized tiles.
PREFILL_TOKENS = TOKENS * 2
assert len(PREFILL_TOKENS) > NATIVE_MAX_ROWS

CASES = {
    "gptq-4bit": dict(layout="gptq"),
    "gptq-4bit-sym": dict(layout="gptq", sym=True),
    "gptq-4bit-act-order": dict(layout="gptq", desc_act=True),
    "gptq-v2": dict(layout="gptq", fmt="gptq_v2"),
    "gptq-group-per-row": dict(layout="gptq", group=-1),
    "gptq-8bit": dict(layout="gptq", bits=8, sym=True),
    "awq": dict(layout="awq"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_packed_by_the_published_arithmetic_gives_hf_logits(case: str, make_tiny_model, tmp_path,  # noqa: ANN001
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pagoda on the packed checkpoint against HF transformers on its dequantized weights (fp32 prefill:
    the dense matmul over dequantized tiles; decode rows, AMX tiles and the panel kernel for prompts
    would meet int8 activations)."""
    monkeypatch.setenv("PAGODA_DISABLE_AMX", "1")
    monkeypatch.setattr("pagoda.model.layers.quantization.gguf.panels_for_prompts", lambda ops: False)
    folder, hf = make_tiny_model("llama", seed=3)
    quantized = write_quantized(folder, hf, tmp_path / case, **CASES[case])
    llm = LLM(str(quantized), dtype="float32", num_kv_blocks=16, block_size=4)
    with torch.no_grad():
        expected = hf(torch.tensor([PREFILL_TOKENS])).logits[0].float()
    torch.testing.assert_close(prefill_logits(llm, PREFILL_TOKENS), expected, rtol=1e-4, atol=1e-4)


def _rewrite_config(folder: Path, **quantization: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(quantization)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "gptq", "bits": 3}, "GPTQ checkpoint: bits=3 is not supported; supported: 4, 8"),
    ({"quant_method": "gptq", "bits": 8, "sym": False}, "bits=8 with sym=false is not supported"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ checkpoint: version 'gemv' is not supported; supported: gemm"),
    ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point=false is not supported"),
    ({"quant_method": "fp8"}, "quant_method 'fp8' is not supported; supported: gptq, awq"),
])
def test_an_unsupported_checkpoint_setting_is_named_with_the_supported_ones(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quant_config(None, config, None, 128)


def test_a_quantization_that_does_not_fit_the_checkpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="--quantization int8 does not fit this checkpoint, which is quantized with gptq"):
        quant_config("int8", {"quant_method": "gptq", "bits": 4}, None, 128)
    with pytest.raises(ValueError, match="--quantization awq needs a awq checkpoint"):
        quant_config("awq", None, None, 128)


def test_a_packed_tensor_that_does_not_fit_the_config_is_named(make_tiny_model, tmp_path) -> None:
    folder, hf = make_tiny_model("llama", seed=3)
    quantized = write_quantized(folder, hf, tmp_path / "gptq", layout="gptq")
    _rewrite_config(quantized, group_size=64)  # the scales hold groups of 32
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model\.layers\.\d+\.[a-z_.]+\.(qzeros|scales)' has shape \(\d+, \d+\), "
                       r"expected \(\d+, \d+\)"):
        LLM(str(quantized), dtype="float32", num_kv_blocks=16, block_size=4)


def test_fused_parts_with_different_act_orders_are_refused(make_tiny_model, tmp_path) -> None:
    folder, hf = make_tiny_model("llama", seed=3)
    quantized = write_quantized(folder, hf, tmp_path / "gptq", layout="gptq", desc_act=True)
    tensors = load_file(str(quantized / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(quantized / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.[qk]_proj\.g_idx' differs from the g_idx of the "
                                         r"other parts of its fused layer"):
        LLM(str(quantized), dtype="float32", num_kv_blocks=16, block_size=4)
