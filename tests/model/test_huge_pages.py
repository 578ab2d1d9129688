"""Weights and the KV cache in mappings that ask Linux for huge pages: values kept, alignment, the advice
itself (VmFlags `hg` in /proc/self/smaps: whether the kernel grants 2 MB pages depends on its settings), the
opt-out, and a model that computes the same after its parameters moved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagoda import LLM
from pagoda.api.params import SamplingParams
from pagoda.model import huge_pages

needs_huge_pages = pytest.mark.skipif(not huge_pages.enabled(), reason="no MADV_HUGEPAGE on this platform")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_huge_pages
def test_parameters_move_into_one_advised_mapping_and_keep_their_values() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(700, 1600), nn.Linear(1600, 3, bias=False)).to(torch.bfloat16)  # > 2 MB
    module.register_parameter("codes", nn.Parameter(torch.randint(0, 255, (4097,), dtype=torch.uint8),
                                                    requires_grad=False))
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    moved = huge_pages.move_parameters(module)
    params = dict(module.named_parameters())
    assert moved >= sum(p.nbytes for p in params.values())
    starts = sorted(p.data_ptr() for p in params.values())
    assert starts[0] % huge_pages.HUGE_PAGE == 0 and all(s % 64 == 0 for s in starts)
    assert starts[-1] - starts[0] < moved  # one arena
    for name, p in params.items():
        assert torch.equal(p, before[name]) and p.dtype == before[name].dtype
        assert "hg" in _vm_flags(p.data_ptr())
    x = torch.randn(2, 700, dtype=torch.bfloat16)
    assert module(x).shape == (2, 3)


@needs_huge_pages
def test_an_engine_keeps_its_weights_and_cpu_kv_cache_in_advised_mappings() -> None:
    llm = LLM("smollm2-135m", num_kv_blocks=200, block_size=16)
    caches = llm.engine.runner.kv_caches
    assert "hg" in _vm_flags(caches[0].data_ptr())
    assert caches[0].data_ptr() % huge_pages.HUGE_PAGE == 0
    # the same layout as torch.empty would give: one [layers, ...] tensor unbound into its layers
    assert caches[1].data_ptr() - caches[0].data_ptr() == caches[0].nbytes
    assert all("hg" in _vm_flags(p.data_ptr()) for p in llm.engine.runner.model.parameters())


def test_the_opt_out_keeps_torchs_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_DISABLE_HUGE_PAGES", "1")
    assert not huge_pages.enabled()
    module = nn.Linear(1024, 1024)
    pointer = module.weight.data_ptr()
    assert huge_pages.move_parameters(module) == 0 and module.weight.data_ptr() == pointer
    assert huge_pages.huge_page_empty((3, 5), torch.float32).shape == (3, 5)


def test_a_model_generates_the_same_with_and_without_huge_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = ["The capital of France is", "def fib(n):"]
    params = SamplingParams(temperature=0, max_tokens=12)
    on = [o.outputs[0].token_ids for o in LLM("smollm2-135m").generate(prompts, params)]
    monkeypatch.setenv("PAGODA_DISABLE_HUGE_PAGES", "1")
    off = [o.outputs[0].token_ids for o in LLM("smollm2-135m").generate(prompts, params)]
    assert on == off
