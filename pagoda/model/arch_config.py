"""Architecture hyper-parameters of one checkpoint (the HF ``config.json`` fields we use)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_args, get_origin

# GGUF `general.architecture` -> HF `architectures[0]`.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Far above any released model (hidden 16k, vocab 256k, 128 heads), and small enough that no product of
# three sizes overflows int64 when the module is first sized on the meta device.
_MAX_GGUF_SIZE = 1 << 20
_REQUIRED: Any = object()


def _has_kind(value: Any, kind: type) -> bool:
    # A bool is an int to isinstance; a float field may hold an int.
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def gguf_value(meta: dict[str, Any], key: str, kind: Any, default: Any = _REQUIRED) -> Any:
    """``meta[key]`` checked to be ``kind`` (``int``, ``float``, ``str``, ``bool`` or ``list[item]``).

    GGUF values carry their own type tags, so a bad file can put any type under any key: this turns
    that into a ValueError naming the key rather than a KeyError or TypeError wherever it is used.
    """
    if key not in meta:
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    value = meta[key]
    outer = get_origin(kind) or kind
    if not _has_kind(value, outer) or not all(_has_kind(v, item) for item in get_args(kind) for v in value):
        expected = kind.__name__ if isinstance(kind, type) else str(kind)
        raise ValueError(f"GGUF metadata key {key!r} should be {expected}, not {type(value).__name__}")
    return value


@dataclass
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot pick a model class")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        # transformers >= 5 nests rope settings under `rope_parameters`.
        rope_params = cfg.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta", 10000.0)
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        use_sliding = cfg.get("use_sliding_window", True)
        return cls(
            architecture=archs[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", archs[0] == "Qwen2ForCausalLM")),
            sliding_window=cfg.get("sliding_window") if use_sliding else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output_weight: bool) -> "ArchConfig":
        arch = gguf_value(meta, "general.architecture", str)
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )

        def get(key: str, kind: Any, default: Any = _REQUIRED) -> Any:
            return gguf_value(meta, f"{arch}.{key}", kind, default)

        def size(key: str, default: Any = _REQUIRED) -> int:
            value = get(key, int, default)
            if not 0 < value <= _MAX_GGUF_SIZE:
                raise ValueError(f"GGUF metadata key '{arch}.{key}' is {value}, not a size in 1..{_MAX_GGUF_SIZE}")
            return value

        heads = size("attention.head_count")
        hidden = size("embedding_length")
        vocab = size("vocab_size", len(gguf_value(meta, "tokenizer.ggml.tokens", list, [])) or _REQUIRED)
        head_dim = size("attention.key_length", hidden // heads)
        if head_dim % 2:  # rotary embeddings turn pairs of dimensions
            raise ValueError(f"GGUF head dimension {head_dim} is odd ('{arch}.attention.key_length')")
        kv_heads = size("attention.head_count_kv", heads)
        if heads % kv_heads:  # each key/value head serves a whole group of query heads
            raise ValueError(f"GGUF head counts: {heads} query heads do not split into {kv_heads} key/value groups")
        eos = gguf_value(meta, "tokenizer.ggml.eos_token_id", int, None)
        scaling_type = get("rope.scaling.type", str, None)
        rope_scaling = None
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", float))}
        elif scaling_type not in (None, "none"):
            raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported")
        context = get("context_length", int, 4096)
        if context <= 0:
            raise ValueError(f"GGUF metadata key '{arch}.context_length' is {context}, not a positive length")
        return cls(
            architecture=GGUF_ARCHITECTURES[arch],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=size("feed_forward_length"),
            num_hidden_layers=size("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", float, 1e-6)),
            rope_theta=float(get("rope.freq_base", float, 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=context,
            tie_word_embeddings=not has_output_weight,
            attention_bias=arch == "qwen2",
            sliding_window=None,
            bos_token_id=gguf_value(meta, "tokenizer.ggml.bos_token_id", int, None),
            eos_token_ids=[eos] if eos is not None else [],
        )
