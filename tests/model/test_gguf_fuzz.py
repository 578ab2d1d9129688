"""Fuzzing the GGUF reader: seeded mutations of small valid files (header, metadata, tensor table, data).

Each case must parse and dequantize every tensor, or raise ``GGUFError``; through the full loader it must
load or raise ValueError (GGUFError or a metadata error naming the key). Never another exception, never a
hang: every count is checked against the file's size before it is used, so each case is bounded.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter
from gguf.quants import quantize

from pagoda.model import loader
from pagoda.model.gguf_file import GGUFError, GGUFFile

SEED = 20240613
READER_CASES = 3000
LOADER_CASES = 1000

Field = tuple[int, int, str]  # offset, width in bytes, label
# GGUF scalar value type -> width; 8 is a string, 9 an array.
_SCALAR_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _write(path: Path, fill: Callable[[GGUFWriter], None]) -> bytes:
    writer = GGUFWriter(str(path), "llama")
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _fill_types(writer: GGUFWriter) -> None:
    """Every kind of metadata value and a handful of tensor types, all tiny."""
    writer.add_custom_alignment(32)
    writer.add_uint32("test.u32", 7)
    writer.add_int32("test.i32", -3)
    writer.add_float32("test.f32", 0.25)
    writer.add_bool("test.flag", True)
    writer.add_string("test.name", "tiny ü")
    writer.add_array("test.names", ["a", "bé", "中文"])
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_array("test.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("t.f32", rng.standard_normal((2, 8)).astype(np.float32))
    writer.add_tensor("t.vec", rng.standard_normal(8).astype(np.float32))
    writer.add_tensor("t.f16", rng.standard_normal((3, 4)).astype(np.float16))
    for qtype in (T.Q8_0, T.Q4_0):
        writer.add_tensor(f"t.{qtype.name}", quantize(rng.standard_normal((2, 32)).astype(np.float32), qtype), raw_dtype=qtype)
    block, block_bytes = GGML_QUANT_SIZES[T.Q4_K]  # gguf cannot quantize K-quants: random blocks
    writer.add_tensor("t.Q4_K", rng.integers(0, 256, (1, block_bytes), dtype=np.uint8), raw_dtype=T.Q4_K)


TINY_TOKENS = ["<s>", "</s>", "a", "b", "c", "ab", "Ġ", "Ġa", "h", "i", "hi", "!", "x", "y", "z", "xy"]


def write_tiny_llama_gguf(path: Path, drop: str | None = None, reshape: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A complete llama model (1 layer, hidden 8, 16 tokens, gpt2 tokenizer) as F32/F16 GGUF; ``drop`` leaves
    one tensor out and ``reshape`` gives some tensors another shape, to test the loader's errors."""
    hidden, ffn, heads, kv_heads, head_dim, vocab = 8, 16, 2, 1, 4, len(TINY_TOKENS)
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (heads * head_dim, hidden),
        "blk.0.attn_k.weight": (kv_heads * head_dim, hidden),
        "blk.0.attn_v.weight": (kv_heads * head_dim, hidden),
        "blk.0.attn_output.weight": (hidden, heads * head_dim),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    } | (reshape or {})

    def fill(writer: GGUFWriter) -> None:
        writer.add_context_length(64)
        writer.add_embedding_length(hidden)
        writer.add_block_count(1)
        writer.add_feed_forward_length(ffn)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(TINY_TOKENS)
        writer.add_token_types([3, 3] + [1] * (vocab - 2))
        writer.add_token_merges(["a b", "h i", "Ġ a", "x y"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_add_bos_token(True)
        rng = np.random.default_rng(1)
        for i, (name, shape) in enumerate(shapes.items()):
            if name != drop:
                values = rng.standard_normal(shape).astype(np.float32) * 0.1
                writer.add_tensor(name, values.astype(np.float16) if i % 2 else values)

    _write(path, fill)
    return path


def _layout(data: bytes) -> tuple[list[Field], list[int], int]:
    """Every integer field of a valid little-endian file, the offsets where its regions begin, and where
    its tensor table ends."""
    fields: list[Field] = []
    bounds: list[int] = []
    pos = 0

    def take(width: int, label: str) -> int:
        nonlocal pos
        fields.append((pos, width, label))
        pos += width
        return int.from_bytes(data[pos - width : pos], "little")

    def skip_string(label: str) -> None:
        nonlocal pos
        length = take(8, f"{label} length")
        pos += length

    def value(vtype: int, label: str) -> None:
        nonlocal pos
        if vtype in _SCALAR_WIDTHS:
            take(_SCALAR_WIDTHS[vtype], label)
        elif vtype == 8:
            skip_string(label)
        else:
            item_type, count = take(4, f"{label} item type"), take(8, f"{label} count")
            for i in range(count):
                value(item_type, f"{label}[{i}]")

    take(4, "magic")
    take(4, "version")
    n_tensors, n_kv = take(8, "tensor_count"), take(8, "kv_count")
    for i in range(n_kv):
        bounds.append(pos)
        skip_string(f"kv {i} key")
        value(take(4, f"kv {i} type"), f"kv {i} value")
    offsets = []
    for i in range(n_tensors):
        bounds.append(pos)
        skip_string(f"tensor {i} name")
        for d in range(take(4, f"tensor {i} n_dims")):
            take(8, f"tensor {i} dim {d}")
        take(4, f"tensor {i} type")
        offsets.append(take(8, f"tensor {i} offset"))
    table_end = pos
    data_start = -(-pos // 32) * 32
    bounds += [table_end, data_start] + [data_start + o for o in offsets] + [len(data)]
    return fields, bounds, table_end


def _int_values(original: int, width: int) -> set[int]:
    top = 1 << (8 * width)
    candidates = {0, 1, 2, 3, 31, 33, top - 1, top - 2, top >> 1, (top >> 1) - 1, 1 << 31, (1 << 31) - 1}
    candidates |= {original + 1, original - 1, original * 2, original + 4096, original ^ 0x80}
    return {v % top for v in candidates} - {original}


def _cases(data: bytes, budget: int, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Truncations at every byte of the header/tables and each side of every region boundary, each integer
    field set to 0/1/huge/negative/off-by-one, then random byte and bit changes up to ``budget`` cases."""
    fields, bounds, table_end = _layout(data)
    structured: list[tuple[str, bytes]] = []
    cuts = set(range(table_end)) | {b + d for b in bounds for d in (-1, 0, 1) if 0 <= b + d < len(data)}
    structured += [(f"truncated to {cut} bytes", data[:cut]) for cut in sorted(cuts)]
    for offset, width, label in fields:
        original = int.from_bytes(data[offset : offset + width], "little")
        for v in sorted(_int_values(original, width)):
            mutated = data[:offset] + v.to_bytes(width, "little") + data[offset + width :]
            structured.append((f"{label} @{offset} = {v}", mutated))
    rng.shuffle(structured)
    yield from structured[:budget]
    for i in range(budget - len(structured)):
        mutated = bytearray(data)
        if i % 4 == 3:  # a few flips anywhere, the tensor data included
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield f"random bit flips {i}", bytes(mutated)
        else:
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(table_end)] = rng.randrange(256)
            yield f"random header bytes {i}", bytes(mutated)


def _run(cases: Iterator[tuple[str, bytes]], folder: Path, attempt: Callable[[Path], None], allowed: type) -> int:
    """Runs every case; returns how many there were, failing with the first few unexpected exceptions."""
    unexpected: list[str] = []
    count = 0
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # random bytes dequantize to inf/nan
        for count, (label, data) in enumerate(cases, 1):
            path = folder / f"case{count}.gguf"  # a fresh file: an earlier case's mapping may still be alive
            path.write_bytes(data)
            try:
                attempt(path)
            except allowed:
                pass
            except Exception as exc:  # the point of the test: any other exception is a finding
                unexpected.append(f"{label}: {type(exc).__name__}: {exc}")
            path.unlink()
    assert not unexpected, f"{len(unexpected)} of {count} cases raised something else:\n" + "\n".join(unexpected[:10])
    return count


def _open_and_load_all(path: Path) -> None:
    gguf = GGUFFile(path)
    for name in gguf.tensors:
        gguf.load(name)


def test_reader_raises_only_gguf_error(tmp_path: Path) -> None:
    data = _write(tmp_path / "types.gguf", _fill_types)
    _open_and_load_all(tmp_path / "types.gguf")  # the unmutated file is valid
    cases = _cases(data, READER_CASES, random.Random(SEED))
    assert _run(cases, tmp_path, _open_and_load_all, GGUFError) == READER_CASES


def test_loader_raises_only_value_error(tmp_path: Path) -> None:
    data = write_tiny_llama_gguf(tmp_path / "tiny.gguf").read_bytes()
    loader.load_model(str(tmp_path / "tiny.gguf"), torch.float32)  # the unmutated model loads
    cases = _cases(data, LOADER_CASES, random.Random(SEED + 1))

    def load(path: Path) -> None:
        loader.load_model(str(path), torch.float32)

    assert _run(cases, tmp_path, load, ValueError) == LOADER_CASES
