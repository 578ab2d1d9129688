"""How keys and values are stored in the paged cache (``kv_cache_dtype``), one source for every backend:

* ``auto``: the model's dtype;
* ``int8``: each row (one token of one KV head) as int8 codes with its own scale, max|x| / 127, stored as
  the fp32 in the row's last four bytes: a row is head_dim + 4 bytes, half of bf16's for head_dim 64 and up;
* ``fp8_e4m3`` (``fp8``): float8 e4m3 values of x / scale, with one scale per layer for keys and one for
  values (vLLM's per-tensor k_scale / v_scale: a checkpoint's, else 1.0); values saturate at +-448.

A layer's cache is one tensor [2, blocks, block_size, kv_heads, row width] of the storage dtype, so the block
tables, slot mapping and prefix cache are the same whatever the format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e4m3")
INT8_SCALE_BYTES = 4  # the fp32 scale at the end of an int8 row
FP8_MAX = 448.0  # float8 e4m3's largest finite value


@dataclass(frozen=True)
class KVCacheFormat:
    kind: str  # "auto" | "int8" | "fp8_e4m3"
    model_dtype: torch.dtype

    @classmethod
    def of(cls, kv_cache_dtype: str, model_dtype: torch.dtype) -> KVCacheFormat:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported; supported: {', '.join(KV_CACHE_DTYPES)}")
        return cls("fp8_e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype, model_dtype)

    @property
    def quantized(self) -> bool:
        return self.kind != "auto"

    @property
    def storage_dtype(self) -> torch.dtype:
        return {"auto": self.model_dtype, "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}[self.kind]

    @property
    def copy_dtype(self) -> torch.dtype:
        """The dtype to index and copy cache rows in: torch's CPU index_copy_ and gathers have no float8
        kernels, so fp8 rows move as their bytes."""
        return torch.uint8 if self.kind == "fp8_e4m3" else self.storage_dtype

    def row_width(self, head_dim: int) -> int:
        """Elements of the storage dtype per row."""
        return head_dim + INT8_SCALE_BYTES if self.kind == "int8" else head_dim

    def bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        """Keys and values of one token in one layer."""
        return 2 * kv_heads * self.row_width(head_dim) * self.storage_dtype.itemsize

    def encode(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """[..., head_dim] in the model dtype -> [..., row width] rows of the storage dtype. ``scale``: fp8's."""
        if self.kind == "auto":
            return x
        if self.kind == "fp8_e4m3":
            return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        xf = x.float()
        row_scale = xf.abs().amax(dim=-1, keepdim=True) / 127
        codes = torch.round(xf / torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale)))
        return torch.cat([codes.to(torch.int8), row_scale.view(torch.int8)], dim=-1)

    def decode(self, rows: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The inverse of ``encode``, in the model dtype."""
        if self.kind == "auto":
            return rows
        if self.kind == "fp8_e4m3":
            return (rows.view(torch.float8_e4m3fn).float() * scale).to(self.model_dtype)
        head_dim = rows.shape[-1] - INT8_SCALE_BYTES
        row_scale = rows[..., head_dim:].contiguous().view(torch.float32)
        return (rows[..., :head_dim].float() * row_scale).to(self.model_dtype)
