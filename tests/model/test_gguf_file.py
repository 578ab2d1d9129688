"""Our GGUF parser and dequantization against the `gguf` package's reader, for every common type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from pagoda.model.gguf_file import GGUFFile

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
# gguf can dequantize but not quantize these: random block bytes exercise the same path.
RAW_ONLY = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    path = str(tmp_path_factory.mktemp("gguf") / "types.gguf")
    writer = GGUFWriter(path, "llama")
    writer.add_uint32("test.answer", 42)
    writer.add_array("test.names", ["a", "bé", "中文"])
    writer.add_array("test.floats", [0.5, 1.5])
    rng = np.random.default_rng(0)
    expected: dict[str, np.ndarray] = {}
    for qtype in QUANTIZABLE:
        values = rng.standard_normal((6, 256)).astype(np.float32)
        data = values if qtype == T.F32 else quantize(values, qtype)
        writer.add_tensor(f"t.{qtype.name}", data, raw_dtype=None if qtype == T.F32 else qtype)
    for qtype in RAW_ONLY:
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (6, 256 // block * block_bytes), dtype=np.uint8)
        writer.add_tensor(f"t.{qtype.name}", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", QUANTIZABLE + RAW_ONLY, ids=lambda t: t.name)
def test_dequantize_matches_gguf(gguf_path: str, qtype: T) -> None:
    ours = GGUFFile(gguf_path).load(f"t.{qtype.name}")
    info = next(t for t in GGUFReader(gguf_path).tensors if t.name == f"t.{qtype.name}")
    ref = torch.from_numpy(np.array(gguf_dequantize(info.data, qtype), dtype=np.float32)).reshape(6, 256)
    assert ours.shape == (6, 256)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)


def test_metadata(gguf_path: str) -> None:
    meta = GGUFFile(gguf_path).metadata
    assert meta["test.answer"] == 42
    assert meta["test.names"] == ["a", "bé", "中文"]
    assert meta["test.floats"] == [0.5, 1.5]
    assert meta["general.architecture"] == "llama"


def test_bundled_file_metadata_matches_reader(bundled_gguf) -> None:
    ours = GGUFFile(bundled_gguf)
    reader = GGUFReader(bundled_gguf)
    for key in ("llama.block_count", "llama.embedding_length", "llama.rope.freq_base", "tokenizer.ggml.eos_token_id"):
        assert ours.metadata[key] == pytest.approx(reader.fields[key].contents())
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert ours.metadata["tokenizer.ggml.tokens"][:100] == [bytes(tokens.parts[i]).decode() for i in tokens.data[:100]]
    assert set(ours.tensors) == {t.name for t in reader.tensors}


def test_not_gguf(tmp_path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(bad)
