"""Which quantization a model loads with: the checkpoint's own (``quantization_config`` in config.json: GPTQ or
AWQ), or one applied as the weights load (``--quantization int8|int4``)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from pagoda.model.layers.quantization.awq import AWQConfig
from pagoda.model.layers.quantization.gptq import GPTQConfig
from pagoda.model.layers.quantization.int4 import Int4QuantConfig
from pagoda.model.layers.quantization.int8 import Int8QuantConfig

AT_LOAD = ("int8", "int4")
CHECKPOINT = ("gptq", "awq")

QuantConfig = Int8QuantConfig | Int4QuantConfig | GPTQConfig | AWQConfig


def quant_config(requested: str | None, checkpoint: dict[str, Any] | None, ops: ModuleType | None,
                 group_size: int) -> QuantConfig | None:
    """``requested``: --quantization (None, int8, int4, gptq, awq); ``checkpoint``: the checkpoint's
    quantization_config, if any; ``group_size``: int4's."""
    if checkpoint is not None:
        method = checkpoint.get("quant_method") if isinstance(checkpoint, dict) else None
        if method not in CHECKPOINT:
            raise ValueError(f"checkpoint quantization_config.quant_method {method!r} is not supported; "
                             f"supported: {', '.join(CHECKPOINT)}")
        if requested not in (None, method):
            raise ValueError(f"--quantization {requested} does not fit this checkpoint, which is quantized with {method}")
        return (GPTQConfig if method == "gptq" else AWQConfig).from_config(checkpoint, ops)
    if requested in CHECKPOINT:
        raise ValueError(f"--quantization {requested} needs a {requested} checkpoint (quantization_config in its "
                         f"config.json); write one with `pagoda quantize --method {requested} MODEL OUT`")
    if requested == "int8":
        return Int8QuantConfig(ops)
    if requested == "int4":
        return Int4QuantConfig(ops, group_size)
    if requested is not None:
        raise ValueError(f"quantization {requested!r} is not supported; supported: {', '.join(AT_LOAD + CHECKPOINT)}")
    return None
