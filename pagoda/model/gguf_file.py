"""Reading GGUF files: metadata, tensor index and dequantization.

The ``gguf`` package defines the format's constants and can dequantize every
tensor type; its reader builds a numpy view per metadata element, which costs
seconds on a 49k-token vocabulary, so the header is parsed here in one pass and
the common types are dequantized with vectorized torch ops.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# Far above any writer's choice (32 by default, a page at most); a larger value is a corrupt field.
_MAX_ALIGNMENT = 1 << 20
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS: llama.cpp refuses more too
_INT64_MAX = (1 << 63) - 1
# Arrays of arrays are legal, but nothing writes deep ones: a cap keeps a crafted file from recursing.
_MAX_ARRAY_DEPTH = 4

# GGUF value type id -> (struct format, numpy dtype) for fixed-size scalars.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<?"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_SCALAR_STRUCTS = {vtype: struct.Struct(fmt) for vtype, (fmt, _) in _SCALARS.items()}
_STRING = 8
_ARRAY = 9

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ARRAY_HEADER = struct.Struct("<IQ")
_TYPE_AND_OFFSET = struct.Struct("<IQ")
_DIMS = [struct.Struct(f"<{n}Q") for n in range(_MAX_DIMS + 1)]
# The fewest bytes one item can take, so a count is refused before anything is allocated for it.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte scalar
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
_MIN_STRING_BYTES = 8
_MIN_ARRAY_BYTES = _ARRAY_HEADER.size


class GGUFError(ValueError):
    """A malformed GGUF file; the message names the file and the field that is wrong."""

    def __init__(self, path: Path, field: str, problem: str) -> None:
        super().__init__(f"{path}: {field}: {problem}")
        self.path = path
        self.field = field


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first), e.g. (out_features, in_features)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Reads the header front to back; every read is checked against the file's size before it happens."""

    def __init__(self, mm: mmap.mmap, path: Path) -> None:
        self.mm = mm
        self.path = path
        self.pos = 0
        self.size = len(mm)

    def fail(self, field: str, problem: str) -> GGUFError:
        return GGUFError(self.path, field, problem)

    def need(self, n: int, field: str) -> None:
        left = self.size - self.pos
        if n > left:
            raise self.fail(field, f"needs {n} bytes at offset {self.pos} but only {left} remain (truncated file?)")

    def unpack(self, layout: struct.Struct, field: str) -> tuple[Any, ...]:
        self.need(layout.size, field)
        values = layout.unpack_from(self.mm, self.pos)
        self.pos += layout.size
        return values

    def count(self, field: str, min_item_bytes: int) -> int:
        """A u64 item count, refused unless that many items of at least ``min_item_bytes`` fit in the rest."""
        (n,) = self.unpack(_U64, field)
        left = self.size - self.pos
        if n * min_item_bytes > left:
            raise self.fail(field, f"{n} items need at least {n * min_item_bytes} bytes but only {left} remain")
        return n

    def string(self, field: str) -> str:
        n = self.count(field, 1)
        data = self.mm[self.pos : self.pos + n]
        self.pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(field, f"{n}-byte string at offset {self.pos - n} is not valid UTF-8") from None

    def string_array(self, count: int, field: str) -> list[str]:
        # The tokenizer's vocabulary and merges: ~100k strings, read in one tight loop (start-up time).
        mm, pos, size, strings = self.mm, self.pos, self.size, []
        read_length = _U64.unpack_from
        try:
            for _ in range(count):
                (length,) = read_length(mm, pos)
                pos += 8
                end = pos + length
                if end > size:
                    raise self.fail(f"{field}[{len(strings)}]", f"{length}-byte string runs past the end of the file")
                strings.append(mm[pos:end].decode("utf-8"))
                pos = end
        except struct.error:
            raise self.fail(f"{field}[{len(strings)}]", "string length runs past the end of the file") from None
        except UnicodeDecodeError:
            raise self.fail(f"{field}[{len(strings)}]", f"string at offset {pos} is not valid UTF-8") from None
        self.pos = pos
        return strings

    def value(self, vtype: int, field: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_STRUCTS:
            return self.unpack(_SCALAR_STRUCTS[vtype], field)[0]
        if vtype == _STRING:
            return self.string(field)
        if vtype != _ARRAY:
            raise self.fail(field, f"unknown GGUF value type {vtype}")
        if depth == _MAX_ARRAY_DEPTH:
            raise self.fail(field, f"arrays nested deeper than {_MAX_ARRAY_DEPTH} levels")
        (item_type,) = self.unpack(_U32, f"{field} array type")
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type][1])
            count = self.count(f"{field} array count", dtype.itemsize)
            values = np.frombuffer(self.mm, dtype=dtype, count=count, offset=self.pos).tolist()
            self.pos += dtype.itemsize * count
            return values
        if item_type == _STRING:
            return self.string_array(self.count(f"{field} array count", _MIN_STRING_BYTES), field)
        if item_type == _ARRAY:
            count = self.count(f"{field} array count", _MIN_ARRAY_BYTES)
            return [self.value(_ARRAY, f"{field}[{i}]", depth + 1) for i in range(count)]
        raise self.fail(f"{field} array type", f"unknown GGUF value type {item_type}")


def _alignment(metadata: dict[str, Any], path: Path) -> int:
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    # `type is int`: a bool is an int to isinstance, and a float alignment is as corrupt as a zero one.
    if type(alignment) is not int or not 0 < alignment <= _MAX_ALIGNMENT or alignment & (alignment - 1):
        raise GGUFError(
            path, "metadata key 'general.alignment'", f"{alignment!r} is not a power of two up to {_MAX_ALIGNMENT}"
        )
    return alignment


# One tensor table entry: name, GGUF-order dims (innermost first), type, offset in the data section, bytes.
_Entry = tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]


def _tensor_entry(cur: _Cursor, index: int, alignment: int) -> _Entry:
    name = cur.string(f"tensor {index} name")
    field = f"tensor {name!r}"
    (n_dims,) = cur.unpack(_U32, f"{field} n_dims")
    if n_dims > _MAX_DIMS:
        raise cur.fail(f"{field} n_dims", f"{n_dims} dimensions, at most {_MAX_DIMS} are allowed")
    dims = cur.unpack(_DIMS[n_dims], f"{field} dims")
    type_id, offset = cur.unpack(_TYPE_AND_OFFSET, f"{field} type")
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise cur.fail(f"{field} type", f"unknown ggml type id {type_id}") from None
    # Zero-sized dimensions are legal, so every dimension is bounded, not only their product.
    if math.prod(max(d, 1) for d in dims) > _INT64_MAX:
        raise cur.fail(f"{field} dims", f"{list(dims)} overflow ggml's 64-bit element count")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    row = dims[0] if dims else 1
    if row % block:
        raise cur.fail(f"{field} dims", f"rows of {row} elements are not whole {qtype.name} blocks of {block}")
    if offset % alignment:
        raise cur.fail(f"{field} offset", f"{offset} is not a multiple of the alignment {alignment}")
    return name, dims, qtype, offset, math.prod(dims) // block * block_bytes


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap refuses empty files with a message naming neither
            raise GGUFError(path, "header.magic", "the file is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


class GGUFFile:
    """A memory-mapped GGUF file: ``metadata`` dict and ``tensors`` by name.

    Any malformed part of the file raises ``GGUFError`` here, never a bare struct, overflow or
    allocation error, and nothing is allocated for a count before the bytes it claims are known to exist.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mm = _map(self.path)
        cur = _Cursor(self._mm, self.path)
        cur.need(4, "header.magic")
        magic = self._mm[:4]
        if magic != _MAGIC:
            raise cur.fail("header.magic", f"starts with {magic!r}: not a GGUF file (bad magic)")
        cur.pos = 4
        (self.version,) = cur.unpack(_U32, "header.version")
        if self.version not in _VERSIONS:
            raise cur.fail("header.version", f"GGUF version {self.version} is not supported (only 2 and 3)")
        n_tensors = cur.count("header.tensor_count", _MIN_TENSOR_INFO_BYTES)
        n_kv = cur.count("header.metadata_kv_count", _MIN_KV_BYTES)
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata entry {i} key")
            field = f"metadata key {key!r}"
            if key in self.metadata:
                raise cur.fail(field, "appears twice")
            (vtype,) = cur.unpack(_U32, f"{field} type")
            self.metadata[key] = cur.value(vtype, field)
        alignment = _alignment(self.metadata, self.path)
        entries = [_tensor_entry(cur, i, alignment) for i in range(n_tensors)]
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, qtype, offset, nbytes in entries:
            if name in self.tensors:
                raise cur.fail(f"tensor {name!r} name", "appears twice")
            start = data_start + offset
            if start + nbytes > cur.size:
                raise cur.fail(
                    f"tensor {name!r} offset",
                    f"data at bytes {start}..{start + nbytes} lies outside the file ({cur.size} bytes)",
                )
            self.tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor sharing the mapping (no copy)."""
        info = self.tensors[name]
        return torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def raw_rows(self, name: str, row_order: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's bytes as [rows, bytes per row] (blocks never span rows), rows reordered by ``row_order``."""
        info = self.tensors[name]
        rows = self.raw(name).view(info.shape[0], -1)
        return rows if row_order is None else rows[row_order]

    def load(self, name: str, dtype: torch.dtype = torch.float32, row_order: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantized tensor ``name`` in PyTorch shape order, cast to ``dtype``.

        ``row_order`` reorders the rows (outermost dim) first; quantization blocks never span rows,
        so this moves the raw bytes, which is cheaper than moving the dequantized values.
        """
        info = self.tensors[name]
        if not info.nbytes:  # a zero-sized dimension: torch.frombuffer refuses to read nothing
            return torch.empty(info.shape, dtype=dtype)
        raw = self.raw(name)
        if row_order is not None:
            raw = raw.view(info.shape[0], -1)[row_order].reshape(-1)
        try:
            return dequantize(raw, info.qtype, info.shape).to(dtype)
        except NotImplementedError as exc:  # a type the gguf package cannot dequantize either (I32, F64...)
            raise GGUFError(self.path, f"tensor {name!r} type", str(exc)) from None


def _f16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[blocks, 16] packed bytes -> [blocks, 32] fp32: low nibbles are elements 0-15, high 16-31."""
    q = torch.empty(qs.shape[0], 32, dtype=torch.float32, device=qs.device)
    q[:, :16] = qs & 0x0F
    q[:, 16:] = qs >> 4
    return q


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16_column(blocks, 0)
    return _nibbles(blocks[:, 2:18]).sub_(8.0).mul_(d)


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16_column(blocks, 0)
    m = _f16_column(blocks, 2)
    return _nibbles(blocks[:, 4:20]).mul_(d).add_(m)


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16_column(blocks, 0)
    return d * blocks[:, 2:34].contiguous().view(torch.int8).to(torch.float32)


_TORCH_BLOCK_DEQUANT = {
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
}
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of one GGUF tensor -> float tensor of ``shape``.

    F32/F16/BF16 and Q4_0/Q4_1/Q8_0 run in torch; every other type goes through
    ``gguf.quants.dequantize`` (numpy), which covers the K-quants and IQ types.
    """
    if qtype in _PLAIN_DTYPES:
        return raw.view(_PLAIN_DTYPES[qtype]).reshape(shape)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    if qtype in _TORCH_BLOCK_DEQUANT:
        values = _TORCH_BLOCK_DEQUANT[qtype](raw.reshape(-1, block_bytes))
        return values.reshape(shape)
    from gguf.quants import dequantize as gguf_dequantize

    rows = raw.numpy().reshape(-1, shape[-1] // block * block_bytes)
    return torch.from_numpy(gguf_dequantize(rows, qtype).astype(np.float32)).reshape(shape)
