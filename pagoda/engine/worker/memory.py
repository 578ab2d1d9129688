"""How many KV blocks the engine gets, decided once at start-up.

On a GPU: ``gpu_memory_utilization`` of the device's memory holds the weights, the activations of the
largest step (measured by running one, ``profile_step``), the CUDA graphs' memory pool (which holds the
activations of the largest captured decode step for as long as the engine lives, beside the eager steps'
own) and memory outside torch's allocator (CUDA context, library workspaces); the KV cache gets the rest.
On the CPU the budget is ``kv_cache_gib``.
Whichever way, when the model or ``max_model_len`` cannot fit the engine refuses to start with the numbers
and what to change, instead of running out of memory under load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagoda.engine.worker.model_runner import allocate_kv_cache
from pagoda.model.attention.base import AttentionBackend, AttentionMetadata
from pagoda.model.llama import LlamaForCausalLM

GIB = 2**30


@dataclass
class GpuMemoryProfile:
    total_bytes: int  # the device's memory
    weight_bytes: int
    activation_bytes: int  # peak of torch's allocator during the profiled step, less weights and its cache
    non_torch_bytes: int  # this process's device memory outside torch's allocator
    free_bytes: int  # free on the device after the profile (other processes' use is not ours to take)
    graph_bytes: int = 0  # the same for the largest captured decode step: what the graphs' pool will hold


def check_weights_fit(weight_bytes: int, total_bytes: int, utilization: float) -> None:
    """Before loading anything: refuse a model whose weights alone exceed the budget."""
    budget = total_bytes * utilization
    if weight_bytes > budget:
        raise ValueError(
            f"the model's weights need {weight_bytes / GIB:.2f} GiB but gpu_memory_utilization={utilization} of "
            f"this {total_bytes / GIB:.1f} GiB device allows {budget / GIB:.2f} GiB in all; raise "
            "gpu_memory_utilization, load a smaller dtype or model, or use a larger device"
        )


def gpu_kv_blocks(profile: GpuMemoryProfile, utilization: float, bytes_per_block: int) -> int:
    """KV blocks left in the budget after weights, peak activations and non-torch memory."""
    budget = profile.total_bytes * utilization
    working = profile.activation_bytes + profile.graph_bytes
    left = budget - profile.weight_bytes - working - profile.non_torch_bytes
    left = min(left, profile.free_bytes - working)
    return max(0, int(left // bytes_per_block))


def check_kv_fits(num_blocks: int, block_size: int, max_model_len: int, budget_hint: str) -> None:
    """One full-length sequence must fit in the cache, else a long request could never run."""
    tokens = num_blocks * block_size
    if tokens < max_model_len:
        fit = (tokens // block_size) * block_size
        raise ValueError(
            f"the KV cache holds {tokens} tokens ({num_blocks} blocks of {block_size}), fewer than "
            f"max_model_len={max_model_len}; set max_model_len to at most {fit}"
            + (f" or {budget_hint}" if budget_hint else "")
        )


def describe_gpu_budget(profile: GpuMemoryProfile, utilization: float, max_num_batched_tokens: int) -> str:
    return (
        f"raise gpu_memory_utilization (now {utilization}: {profile.total_bytes * utilization / GIB:.2f} GiB, of which "
        f"weights {profile.weight_bytes / GIB:.2f} GiB, activations {profile.activation_bytes / GIB:.2f} GiB at "
        f"max_num_batched_tokens={max_num_batched_tokens} (lower it to shrink them), "
        + (f"CUDA graphs {profile.graph_bytes / GIB:.2f} GiB (--enforce-eager frees them), " if profile.graph_bytes
           else "")
        + f"other {profile.non_torch_bytes / GIB:.2f} GiB)"
    )


def profile_batch(num_tokens: int, max_model_len: int) -> list[int]:
    """Sequence lengths of the profiled step: the step's whole token budget in sequences as long as
    allowed (the worst case for attention's working memory)."""
    lengths = [max_model_len] * (num_tokens // max_model_len)
    if num_tokens % max_model_len:
        lengths.append(num_tokens % max_model_len)
    return lengths


@torch.inference_mode()
def profile_step(
    model: LlamaForCausalLM,
    attention: AttentionBackend,
    block_size: int,
    num_tokens: int,
    num_sampled_rows: int,
    max_model_len: int,
    device: torch.device,
) -> int:
    """Run the largest step the scheduler can build (``num_tokens`` prefill tokens, logits for
    ``num_sampled_rows`` rows upcast as the sampler does) over a throw-away KV cache just large enough;
    returns that cache's size in bytes (so the caller can take it out of the measured peak)."""
    lengths = profile_batch(num_tokens, max_model_len)
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq)
    caches = allocate_kv_cache(model, num_blocks, block_size, str(device), attention.kv_format)
    tables = torch.zeros(len(lengths), max(blocks_per_seq), dtype=torch.int64)
    slots: list[int] = []
    positions: list[int] = []
    first = 0
    for row, (n, nb) in enumerate(zip(lengths, blocks_per_seq)):
        tables[row, :nb] = torch.arange(first, first + nb)
        slots.extend(range(first * block_size, first * block_size + n))
        positions.extend(range(n))
        first += nb
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens=lengths,
        seq_lens=lengths,
        block_tables=tables,
        block_size=block_size,
        pad_slot=num_blocks * block_size,
        device=device,
    )
    attention.prepare(metadata)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(model.config.vocab_size, (num_tokens,), generator=generator).to(device)
    hidden = model(input_ids, torch.tensor(positions, device=device), caches, attention, metadata)
    rows = min(num_sampled_rows, num_tokens)
    logits = model.compute_logits(hidden[:rows]).float()
    torch.softmax(logits, dim=-1)
    cache_bytes = sum(c.numel() * c.element_size() for c in caches)
    del caches, hidden, logits
    return cache_bytes


def profile_gpu_memory(run_step: Callable[[], int], device: torch.device, baseline_used_bytes: int,
                       run_graph_step: Callable[[], int] | None = None) -> GpuMemoryProfile:
    """Measure ``run_step`` (a ``profile_step`` call; returns its throw-away cache's bytes) on ``device``, and
    ``run_graph_step`` (the largest decode step CUDA graphs will capture, if any) likewise.
    ``baseline_used_bytes``: device memory in use before this process loaded the model (other processes,
    counted neither as ours nor as free)."""
    torch.cuda.synchronize(device)
    weight_bytes = torch.cuda.memory_allocated(device)

    def peak_of(step: Callable[[], int]) -> int:
        torch.cuda.reset_peak_memory_stats(device)
        cache_bytes = step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - weight_bytes - cache_bytes)

    activation_bytes = peak_of(run_step)
    graph_bytes = peak_of(run_graph_step) if run_graph_step is not None else 0
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, (total - free) - baseline_used_bytes - torch.cuda.memory_reserved(device))
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return GpuMemoryProfile(total, weight_bytes, activation_bytes, non_torch, free, graph_bytes)
