"""Our GGUF parser and dequantization against the `gguf` package's reader, for every common type; malformed
files give one clear GGUFError naming the file and the field."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from pagoda.model.gguf_file import GGUFError, GGUFFile

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


@pytest.fixture
def small(tmp_path: Path) -> bytes:
    """A valid file with explicit alignment, a string, a string array, two u32s and two F32 tensors."""
    writer = GGUFWriter(str(tmp_path / "small.gguf"), "llama")
    writer.add_custom_alignment(32)
    writer.add_string("test.name", "tiny")
    writer.add_array("test.names", ["a", "b", "c"])
    writer.add_uint32("test.u1", 1)
    writer.add_uint32("test.u2", 2)
    writer.add_tensor("t.a", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.add_tensor("t.b", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return (tmp_path / "small.gguf").read_bytes()


def _patched(tmp_path: Path, data: bytes, offset: int, fmt: str, *values: object) -> Path:
    mutated = bytearray(data)
    struct.pack_into(fmt, mutated, offset, *values)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(mutated))
    return path


def _error(path: Path, field: str) -> str:
    return re.escape(f"{path}: {field}")


def _after(data: bytes, text: bytes, skip: int = 0) -> int:
    return data.index(text) + len(text) + skip


def test_truncated_file_names_the_field(tmp_path: Path, small: bytes) -> None:
    names_array = _after(small, b"test.names")
    table = _after(small, b"t.a")
    t_b = GGUFFile(tmp_path / "small.gguf").tensors["t.b"]
    cuts = {
        2: "header.magic",
        6: "header.version",
        20: "header.tensor_count",  # two tensor entries cannot fit in what is left
        _after(small, b"test.u2") - 2: "metadata entry 5 key",
        names_array + 10: "metadata key 'test.names' array count",
        table + 2: "tensor 't.a' n_dims",
        t_b.offset + t_b.nbytes - 1: "tensor 't.b' offset",  # the table is whole, the last tensor's data is not
    }
    for cut, field in cuts.items():
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(small[:cut])
        with pytest.raises(GGUFError, match=_error(path, field)):
            GGUFFile(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        GGUFFile(empty)


@pytest.mark.parametrize(
    "text, skip, value, field",
    [
        (b"GGUF", 4, 2**63, "header.tensor_count"),
        (b"GGUF", 12, 2**62, "header.metadata_kv_count"),
        (b"test.names", 8, 2**61, "metadata key 'test.names' array count"),
        (b"test.name", 4, 2**64 - 1, "metadata key 'test.name'"),  # a string's length
    ],
)
def test_huge_counts_fail_before_allocating(
    tmp_path: Path, small: bytes, text: bytes, skip: int, value: int, field: str
) -> None:
    path = _patched(tmp_path, small, _after(small, text, skip), "<Q", value)
    with pytest.raises(GGUFError, match=_error(path, field) + ".*items need at least"):
        GGUFFile(path)


@pytest.mark.parametrize("alignment", [0, 3, 48, 2**31])
def test_bad_alignment(tmp_path: Path, small: bytes, alignment: int) -> None:
    path = _patched(tmp_path, small, _after(small, b"general.alignment", 4), "<I", alignment)
    with pytest.raises(GGUFError, match=_error(path, "metadata key 'general.alignment'") + ".*power of two"):
        GGUFFile(path)


# (field, problem, patches): each patch is ((text, bytes after it), struct format, value). After the name
# "t.a" come its n_dims (+0), dims (+4, +12), type (+20) and offset (+24).
MALFORMED = [
    ("metadata key 'test.name'", "unknown GGUF value type 13", [((b"test.name", 0), "<I", 13)]),
    ("metadata key 'test.name'", "not valid UTF-8", [((b"test.name", 12), "<B", 0xFF)]),
    ("metadata key 'test.names' array type", "unknown GGUF value type 99", [((b"test.names", 4), "<I", 99)]),
    ("metadata key 'test.u1'", "appears twice", [((b"test.u2", -1), "<1s", b"1")]),
    ("tensor 't.a' n_dims", "at most 4", [((b"t.a", 0), "<I", 5)]),
    ("tensor 't.a' dims", "overflow", [((b"t.a", 12), "<Q", 2**63)]),
    ("tensor 't.a' dims", "not whole Q8_0 blocks", [((b"t.a", 4), "<Q", 31), ((b"t.a", 20), "<I", T.Q8_0.value)]),
    ("tensor 't.a' type", "unknown ggml type id 1234", [((b"t.a", 20), "<I", 1234)]),
    ("tensor 't.a' offset", "outside the file", [((b"t.a", 24), "<Q", 2**40)]),
    ("tensor 't.a' offset", "not a multiple of the alignment 32", [((b"t.a", 24), "<Q", 4)]),
    ("tensor 't.a' name", "appears twice", [((b"t.b", -3), "<3s", b"t.a")]),
]


@pytest.mark.parametrize("field, problem, patches", MALFORMED, ids=[f"{f} {p}" for f, p, _ in MALFORMED])
def test_malformed_fields(tmp_path: Path, small: bytes, field: str, problem: str, patches) -> None:
    data = small
    for (text, skip), fmt, value in patches:
        data = _patched(tmp_path, data, _after(data, text, skip), fmt, value).read_bytes()
    path = tmp_path / "bad.gguf"
    with pytest.raises(GGUFError, match=_error(path, field) + ".*" + re.escape(problem)):
        GGUFFile(path)


def test_zero_sized_and_undequantizable_tensors(tmp_path: Path, small: bytes) -> None:
    path = _patched(tmp_path, small, _after(small, b"t.a", 12), "<Q", 0)  # shape (2, 32) -> (0, 32)
    assert GGUFFile(path).load("t.a").shape == (0, 32)
    path = _patched(tmp_path, small, _after(small, b"t.a", 20), "<I", T.I32.value)  # same bytes, no dequantizer
    gguf = GGUFFile(path)
    assert gguf.tensors["t.a"].qtype == T.I32
    with pytest.raises(GGUFError, match=_error(path, "tensor 't.a' type")):
        gguf.load("t.a")
