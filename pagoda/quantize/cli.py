"""`pagoda quantize --method gptq|awq|int8|int4 MODEL OUT`. Torch loads only when the command runs, so that
building the CLI's parser stays light (`pagoda serve`'s HTTP process never imports torch)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHODS = ("gptq", "awq", "int8", "int4")
CALIBRATION_TEXT = "calibration_text.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model to quantize: a folder, a .gguf file (dequantized first) or an alias")
    parser.add_argument("out", type=Path, help="the folder to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="gptq / awq: calibrated (GPTQ error compensation, AWQ scale and clip search); "
                             "int4 / int8: round to nearest; all written in GPTQ's layout but awq")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None, help="gptq: 4 (default) or 8")
    parser.add_argument("--group-size", type=int, default=128,
                        help="input columns per scale / zero point (-1: one per row; int8 always -1)")
    parser.add_argument("--sym", action="store_true", help="gptq / int4: symmetric grids (zero point 8)")
    parser.add_argument("--desc-act", action="store_true", help="gptq: act-order (columns by Hessian diagonal)")
    parser.add_argument("--damp-percent", type=float, default=0.01, help="gptq: damping, a fraction of mean diag(H)")
    parser.add_argument("--calibration-file", type=Path, default=None,
                        help=f"a UTF-8 text (default: the shipped pagoda/data/{CALIBRATION_TEXT})")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration tokens per sequence")
    parser.add_argument("--max-sequences", type=int, default=None, help="at most this many calibration sequences")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the dtype the model runs in while calibrating")


def settings(args: argparse.Namespace) -> tuple[int, int, bool]:
    """(bits, group size, symmetric) for the method, with its checks."""
    if args.method != "gptq" and args.bits not in (None, 8 if args.method == "int8" else 4):
        raise ValueError(f"--bits {args.bits} does not fit --method {args.method}")
    if args.method == "int8":
        return 8, -1, True
    bits = args.bits or 4
    if bits == 8 and not args.sym:
        raise ValueError("--bits 8 needs --sym (8-bit GPTQ layers run as symmetric int8)")
    if args.method == "awq" and args.sym:
        raise ValueError("--sym does not fit --method awq (AWQ's GEMM layout has zero points)")
    if args.group_size != -1 and (args.group_size < 32 or args.group_size % 32):
        raise ValueError(f"--group-size must be -1 or a multiple of 32, got {args.group_size}")
    if args.seq_len < 16:
        raise ValueError(f"--seq-len must be >= 16, got {args.seq_len}")
    return bits, args.group_size, args.sym


def run(args: argparse.Namespace) -> int:
    import torch

    from pagoda.model.loader import load_model
    from pagoda.quantize.awq import awq_model
    from pagoda.quantize.calibration import shipped_text, token_sequences
    from pagoda.quantize.checkpoint import checkpoint_tensors, write_checkpoint
    from pagoda.quantize.gptq import GPTQSettings, gptq_model, rtn_model

    bits, group, sym = settings(args)
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} exists and is not empty; pick a new folder")
    started = time.monotonic()
    loaded = load_model(args.model, getattr(torch, args.dtype))
    model = loaded.model
    if args.method in ("gptq", "awq"):
        text = args.calibration_file.read_text(encoding="utf-8") if args.calibration_file else shipped_text(CALIBRATION_TEXT)
        sequences = token_sequences(loaded.tokenizer, text, args.seq_len, args.max_sequences)
        print(f"calibration: {len(sequences)} sequences of {args.seq_len} tokens")
    gptq = GPTQSettings(bits=bits, group_size=group, sym=sym, desc_act=args.desc_act, damp=args.damp_percent)
    if args.method == "gptq":
        quantized = gptq_model(model, sequences, gptq)
    elif args.method == "awq":
        quantized = awq_model(model, sequences, group)
    else:
        quantized = rtn_model(model, gptq)
    layout = "awq" if args.method == "awq" else "gptq"
    meta = {"quantizer": "pagoda", "method": "rtn" if args.method in ("int8", "int4") else args.method,
            "source": loaded.name}
    if layout == "awq":
        config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": None, "meta": meta}
    else:
        config = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": args.desc_act, "sym": sym,
                  "checkpoint_format": "gptq", "damp_percent": args.damp_percent, "static_groups": False,
                  "true_sequential": True, "meta": meta}
    write_checkpoint(args.out, loaded.arch, loaded.tokenizer, checkpoint_tensors(model, quantized, layout, bits), config)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB, {args.method}, {bits}-bit, group {group}) "
          f"in {time.monotonic() - started:.0f} s")
    print(json.dumps(config))
    return 0
