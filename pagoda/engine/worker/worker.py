"""The in-process executor: loads the model, sizes and allocates the KV cache, captures CUDA graphs, and
runs the core's steps through its model runner."""

from __future__ import annotations

import logging
import time

import torch

from pagoda.config import EngineConfig, SpeculativeConfig
from pagoda.engine.worker.draft_model import DraftModelProposer
from pagoda.engine.worker.ngram_proposer import NgramProposer
from pagoda.api.messages import EncoderInfo
from pagoda.engine.worker.executor import ModelInfo
from pagoda.engine.step import ModelRunnerOutput, SchedulerOutput
from pagoda.model.attention import AttentionBackend, get_backend
from pagoda.model.attention.kv_format import KVCacheFormat
from pagoda.model.bert import BertEncoder, find_encoder
from pagoda.model.layers.linear import configure_linear
from pagoda.model.loader import LoadedModel, default_dtype, load_model, weight_bytes
from pagoda.engine.worker.cuda_graphs import DecodeGraphs, capture_sizes
from pagoda.engine.worker.input_batch import InputBatch
from pagoda.engine.worker.memory import (
    GIB,
    check_kv_fits,
    check_weights_fit,
    describe_gpu_budget,
    gpu_kv_blocks,
    profile_gpu_memory,
    profile_step,
)
from pagoda.engine.worker.model_runner import ModelRunner, allocate_kv_cache, kv_bytes_per_block
from pagoda.engine.worker.sampler import Sampler

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc, cc, sc = config.model_config, config.cache_config, config.scheduler_config
        self.device = resolve_device(mc.device)
        if mc.batch_invariant and self.device != "cpu":
            raise ValueError("batch_invariant=True is implemented on the CPU only; use device='cpu'")
        torch.manual_seed(mc.seed)
        self.dtype = DTYPES[mc.dtype] if mc.dtype != "auto" else default_dtype(self.device)
        configure_linear(mc.batch_invariant, self.device)
        baseline_used = 0
        # dtype auto: a GGUF file's quantized layers run as stored; an explicit dtype dequantizes to it.
        keep_gguf_quants = mc.dtype == "auto" and mc.quantization is None
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            baseline_used = total - free
            spec = config.speculative_config
            draft_bytes = weight_bytes(spec.model, self.dtype, None, mc.quantization_group_size, self.device,
                                       keep_gguf_quants) if spec is not None and spec.model is not None else 0
            check_weights_fit(weight_bytes(mc.model, self.dtype, mc.quantization, mc.quantization_group_size,
                                           self.device, keep_gguf_quants) + draft_bytes, total,
                              cc.gpu_memory_utilization)
        loaded = load_model(mc.model, self.dtype, mc.load_format, mc.tokenizer, mc.seed, self.device,
                            keep_gguf_quants=keep_gguf_quants,
                            quantization=mc.quantization, quantization_group_size=mc.quantization_group_size)
        self.model = loaded.model.eval()
        spec = config.speculative_config
        self.draft = load_draft_model(spec, loaded, self.dtype, mc.load_format, mc.seed, self.device,
                                      keep_gguf_quants) if spec is not None and spec.method == "draft_model" else None
        self.encoder = self._load_encoder()  # before the KV plan, which measures what is left on a GPU
        arch = loaded.arch
        self.max_model_len = resolve_max_model_len(config, arch.max_position_embeddings, arch.sliding_window)
        kv_format = KVCacheFormat.of(cc.kv_cache_dtype, self.dtype)
        attention = get_backend(mc.attention_backend, self.device, kv_format,
                                mc.batch_invariant, arch.num_attention_heads // arch.num_key_value_heads)
        use_graphs = self.device == "cuda" and not mc.enforce_eager and attention.graph_capturable
        num_blocks = self._plan_kv_blocks(attention, baseline_used, use_graphs)
        self._report_kv_cache(attention.kv_format, num_blocks)
        kv_caches = allocate_kv_cache(self.model, num_blocks, cc.block_size, self.device, attention.kv_format)
        proposer: NgramProposer | DraftModelProposer | None = None
        if self.draft is not None:
            assert spec is not None
            if self.draft.arch.max_position_embeddings < self.max_model_len:
                raise ValueError(f"speculative_config.model {spec.model!r} takes up to "
                                 f"{self.draft.arch.max_position_embeddings} positions, fewer than max_model_len="
                                 f"{self.max_model_len}; lower max_model_len")
            draft_arch = self.draft.arch
            proposer = DraftModelProposer(
                self.draft.model,
                allocate_kv_cache(self.draft.model, num_blocks, cc.block_size, self.device, kv_format),
                get_backend(mc.attention_backend, self.device, kv_format, mc.batch_invariant,
                            draft_arch.num_attention_heads // draft_arch.num_key_value_heads),
                cc.block_size, spec.num_speculative_tokens, sc.max_num_batched_tokens, torch.device(self.device))
        elif spec is not None:
            assert spec.prompt_lookup_min is not None and spec.prompt_lookup_max is not None  # set by its checks
            proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max, spec.num_speculative_tokens)
        graphs = None
        if use_graphs:
            started = time.monotonic()
            graphs = DecodeGraphs(self.model, kv_caches, attention, cc.block_size, sc.max_num_seqs,
                                  self.max_model_len, use_cuda_graphs=True)
            logger.info("captured CUDA graphs for decode batches %s in %.1f s", graphs.sizes, time.monotonic() - started)
        self.runner = ModelRunner(self.model, kv_caches, cc.block_size, attention, Sampler(mc.seed, self.device),
                                  InputBatch(sc.max_num_seqs, self.max_model_len, cc.block_size), self.device, graphs,
                                  proposer)
        self.info = ModelInfo(
            name=loaded.name,
            max_model_len=self.max_model_len,
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            eos_token_ids=frozenset(loaded.tokenizer.eos_token_ids) | frozenset(arch.eos_token_ids),
            tokenizer=loaded.tokenizer,
            dtype=str(self.dtype).removeprefix("torch."),
            num_blocks=num_blocks,
            encoder=None if self.encoder is None else EncoderInfo(
                self.encoder.name, self.encoder.config.hidden_size, self.encoder.max_tokens,
                self.encoder.config.vocab_size, self.encoder.tokenizer_json),
        )

    def _load_encoder(self) -> BertEncoder | None:
        folder = find_encoder(self.config.model_config.embedding_model)
        if folder is None:
            return None
        encoder = BertEncoder(folder, device=self.device)
        logger.info("embeddings: %s (%d-d, up to %d tokens per input)", encoder.name,
                    encoder.config.hidden_size, encoder.max_tokens)
        return encoder

    def _report_kv_cache(self, kv_format: KVCacheFormat, num_blocks: int) -> None:
        """How many tokens the cache holds, and for a quantized cache how many more than the model dtype's."""
        cfg, block_size = self.model.config, self.config.cache_config.block_size
        per_token = kv_format.bytes_per_token(cfg.num_key_value_heads, cfg.head_dim) * cfg.num_hidden_layers
        message = (f"KV cache: {num_blocks * block_size} tokens ({num_blocks} blocks of {block_size}, "
                   f"{num_blocks * block_size * per_token / GIB:.2f} GiB) stored as {_name(kv_format.storage_dtype)}")
        if self.draft is not None:
            draft_bytes = kv_bytes_per_block(self.draft.model, block_size, kv_format) * num_blocks
            message += f", and the draft model's for the same tokens ({draft_bytes / GIB:.2f} GiB)"
        if kv_format.quantized:
            dense = KVCacheFormat.of("auto", self.dtype).bytes_per_token(cfg.num_key_value_heads, cfg.head_dim)
            ratio = dense * cfg.num_hidden_layers / per_token
            message += f": {ratio:.2f}x the tokens {_name(self.dtype)} would hold in the same memory"
        logger.info(message)

    def _plan_kv_blocks(self, attention: AttentionBackend, baseline_used: int, use_graphs: bool) -> int:
        """The KV cache's size in blocks: exact when ``num_kv_blocks`` is set, else from the memory budget
        (see worker/memory.py), refusing to start when one max_model_len sequence would not fit."""
        cc, sc = self.config.cache_config, self.config.scheduler_config
        if cc.num_kv_blocks:
            return cc.num_kv_blocks
        bytes_per_block = kv_bytes_per_block(self.model, cc.block_size, attention.kv_format)
        if self.draft is not None:  # its cache mirrors the target's blocks
            bytes_per_block += kv_bytes_per_block(self.draft.model, cc.block_size, attention.kv_format)
        if self.device == "cuda":
            device = torch.device(self.device)
            largest_graph = capture_sizes(sc.max_num_seqs)[-1]
            profile = profile_gpu_memory(
                lambda: profile_step(self.model, attention, cc.block_size, sc.max_num_batched_tokens,
                                     sc.max_num_seqs, self.max_model_len, device),
                device, baseline_used,
                # The largest captured decode step: that many one-token sequences, each sampling.
                (lambda: profile_step(self.model, attention, cc.block_size, largest_graph, largest_graph, 1, device))
                if use_graphs else None)
            num_blocks = gpu_kv_blocks(profile, cc.gpu_memory_utilization, bytes_per_block)
            hint = describe_gpu_budget(profile, cc.gpu_memory_utilization, sc.max_num_batched_tokens)
            logger.info("GPU memory: %s; KV cache %d blocks (%.2f GiB)", profile, num_blocks,
                        num_blocks * bytes_per_block / GIB)
        else:
            num_blocks = int(cc.kv_cache_gib * GIB // bytes_per_block)
            needed = -(-self.max_model_len // cc.block_size) * bytes_per_block / GIB
            hint = f"raise kv_cache_gib (now {cc.kv_cache_gib:g}) to at least {needed:.4g}"
        check_kv_fits(num_blocks, cc.block_size, self.max_model_len, hint)
        return num_blocks

    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(out)

    def sum_hidden(self, token_ids: list[int], start: int, count: int, block_ids: list[int]) -> list[float]:
        return self.runner.hidden_states(token_ids, start, count, block_ids).float().sum(dim=0).tolist()

    def encode(self, rows: list[list[int]]) -> list[list[float]]:
        assert self.encoder is not None, "encode() without an encoder (ModelInfo.encoder is None)"
        return self.encoder.encode(rows)


def load_draft_model(spec: SpeculativeConfig, target: LoadedModel, dtype: torch.dtype, load_format: str, seed: int,
                     device: str, keep_gguf_quants: bool) -> LoadedModel:
    """The draft model, in the target's dtype (random weights when the target's are), refused unless it
    speaks the target's tokenizer: its token ids are the target's."""
    assert spec.model is not None  # checked with the config
    try:
        draft = load_model(spec.model, dtype, "dummy" if load_format == "dummy" else "auto", seed=seed,
                           device=device, keep_gguf_quants=keep_gguf_quants)
    except (OSError, ValueError) as exc:
        raise ValueError(f"speculative_config.model {spec.model!r} could not be loaded: {exc}") from None
    if draft.arch.vocab_size != target.arch.vocab_size:
        raise ValueError(f"speculative_config.model {spec.model!r} has a vocabulary of {draft.arch.vocab_size} "
                         f"tokens, the target {target.arch.vocab_size}: a draft model needs the target's tokenizer")
    if draft.tokenizer.tokenizer.get_vocab() != target.tokenizer.tokenizer.get_vocab():
        raise ValueError(f"speculative_config.model {spec.model!r} has another tokenizer than the target's "
                         "(different token ids): a draft model needs the target's tokenizer")
    logger.info("draft model: %s (%d layers, hidden %d)", draft.name, draft.arch.num_hidden_layers,
                draft.arch.hidden_size)
    draft.model.eval()
    return draft


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> str:
    """``auto``: the CUDA device when torch sees one, else the CPU."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if cuda else "cpu"
    if name == "cuda" and not cuda:
        raise ValueError("device='cuda' but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return name


def resolve_max_model_len(config: EngineConfig, model_limit: int, sliding_window: int | None) -> int:
    limit = model_limit
    if sliding_window:  # without sliding-window attention, stay inside the window
        limit = min(limit, sliding_window)
    wanted = config.model_config.max_model_len
    if wanted is None:
        return limit
    if wanted > limit:
        raise ValueError(f"max_model_len={wanted} exceeds the model's limit of {limit} tokens")
    return wanted
