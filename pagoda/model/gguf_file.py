"""Reading GGUF files: metadata, tensor index and dequantization.

The ``gguf`` package defines the format's constants and can dequantize every
tensor type; its reader builds a numpy view per metadata element, which costs
seconds on a 49k-token vocabulary, so the header is parsed here in one pass and
the common types are dequantized with vectorized torch ops.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

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
_STRING = 8
_ARRAY = 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first), e.g. (out_features, in_features)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


_U64 = struct.Struct("<Q")


class GGUFFile:
    """A memory-mapped GGUF file: ``metadata`` dict and ``tensors`` by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._pos = 0
        if self._read(4) != _MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic)")
        (self.version,) = self._unpack("<I")
        if self.version < 2:
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported (need >= 2)")
        n_tensors, n_kv = self._unpack("<QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._read_string()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._read_value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._read_string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            qtype_id, offset = self._unpack("<IQ")
            infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype_id), offset))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, qtype, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(shape)) if shape else 1
            self.tensors[name] = GGUFTensorInfo(
                name, shape, qtype, data_start + offset, n_elements // block * block_bytes
            )

    def _read(self, n: int) -> bytes:
        data = self._mm[self._pos : self._pos + n]
        self._pos += n
        return data

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        values = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += size
        return values

    def _read_string(self) -> str:
        (length,) = self._unpack("<Q")
        return self._read(length).decode("utf-8", errors="replace")

    def _read_string_array(self, count: int) -> list[str]:
        # The tokenizer's vocabulary and merges: ~100k strings, read in one tight loop (start-up time).
        mm, pos, strings = self._mm, self._pos, []
        read_length = _U64.unpack_from
        for _ in range(count):
            (length,) = read_length(mm, pos)
            pos += 8
            strings.append(mm[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
        self._pos = pos
        return strings

    def _read_value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype][0])[0]
        if vtype == _STRING:
            return self._read_string()
        if vtype == _ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1])
                values = np.frombuffer(self._mm, dtype=dtype, count=count, offset=self._pos).copy()
                self._pos += dtype.itemsize * count
                return values.tolist()
            if item_type == _STRING:
                return self._read_string_array(count)
            return [self._read_value(item_type) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor sharing the mapping (no copy)."""
        info = self.tensors[name]
        return torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def load(self, name: str, dtype: torch.dtype = torch.float32, row_order: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantized tensor ``name`` in PyTorch shape order, cast to ``dtype``.

        ``row_order`` reorders the rows (outermost dim) first; quantization blocks never span rows,
        so this moves the raw bytes, which is cheaper than moving the dequantized values.
        """
        info = self.tensors[name]
        raw = self.raw(name)
        if row_order is not None:
            raw = raw.view(info.shape[0], -1)[row_order].reshape(-1)
        return dequantize(raw, info.qtype, info.shape).to(dtype)


def _f16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[blocks, 16] packed bytes -> [blocks, 32] fp32: low nibbles are elements 0-15, high 16-31."""
    q = torch.empty(qs.shape[0], 32, dtype=torch.float32)
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
