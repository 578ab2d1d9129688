"""llama.cpp as a peer in `pagoda bench offline --peer llamacpp`, through llama-cpp-python's C API bindings
(the optional extra ``pagoda-llm[peers]``) on the same GGUF file.

llama-cpp-python's high-level ``Llama`` object decodes one sequence at a time; for a fair throughput
comparison this drives llama.cpp the way its own server does: ``slots`` sequences share one context,
each ``llama_decode`` call carries one new token for every running sequence plus whole prompts of newly
admitted ones, finished sequences leave the KV cache at once and waiting prompts take their place
(continuous batching). Greedy decoding, every request runs to exactly its requested length.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm


_QUIET_LOG: Any = None


@dataclass
class _Slot:
    request: int
    seq_id: int
    position: int
    generated: int = 0
    next_token: int = -1


def _bindings() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ValueError("--peer llamacpp needs llama-cpp-python: pip install 'pagoda-llm[peers]' "
                           "(it builds llama.cpp from source, ~5 minutes on 2 cores)") from None
    return llama_cpp


def run_llamacpp(gguf_path: str, prompts: list[list[int]], out_lens: list[int], slots: int = 64,
                 threads: int | None = None, batch_tokens: int = 2048) -> dict[str, Any]:
    lib = _bindings()
    threads = threads or os.cpu_count() or 1
    lib.llama_backend_init()
    global _QUIET_LOG
    if _QUIET_LOG is None:  # kept alive at module level: llama.cpp calls it long after this frame
        _QUIET_LOG = lib.llama_log_callback(lambda level, text, data: None)
    lib.llama_log_set(_QUIET_LOG, ctypes.c_void_p(0))
    t0 = time.perf_counter()
    model = lib.llama_model_load_from_file(gguf_path.encode(), lib.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    per_sequence = max(len(p) + n for p, n in zip(prompts, out_lens)) + 1
    params = lib.llama_context_default_params()
    params.n_ctx = slots * per_sequence
    params.n_batch = batch_tokens
    params.n_ubatch = min(512, batch_tokens)
    params.n_seq_max = slots
    params.n_threads = threads
    params.n_threads_batch = threads
    # One KV stream per sequence: with a unified cache every query would attend over all slots x context
    # cells (masked), which is how llama-server runs only when asked to (--kv-unified).
    params.kv_unified = False
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context (n_ctx too large for memory?)")
    load_s = time.perf_counter() - t0
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    memory = lib.llama_get_memory(ctx)
    batch = lib.llama_batch_init(batch_tokens, 0, 1)
    waiting = list(range(len(prompts)))
    waiting.reverse()  # pop() takes requests in order
    free_seq_ids = list(range(slots - 1, -1, -1))
    running: list[_Slot] = []
    bar = tqdm(total=sum(out_lens), desc="llama.cpp tokens", unit="tok")
    generated = 0
    t0 = time.perf_counter()
    try:
        while running or waiting:
            n = 0
            logit_rows: list[tuple[int, _Slot]] = []

            def add(token: int, position: int, seq_id: int, want_logits: bool) -> None:
                nonlocal n
                batch.token[n] = token
                batch.pos[n] = position
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = 1 if want_logits else 0
                n += 1

            for slot in running:
                logit_rows.append((n, slot))
                add(slot.next_token, slot.position, slot.seq_id, True)
                slot.position += 1
            while waiting and free_seq_ids and n + len(prompts[waiting[-1]]) <= batch_tokens:
                request = waiting.pop()
                slot = _Slot(request, free_seq_ids.pop(), len(prompts[request]))
                for i, token in enumerate(prompts[request]):
                    add(token, i, slot.seq_id, i == len(prompts[request]) - 1)
                logit_rows.append((n - 1, slot))
                running.append(slot)
            batch.n_tokens = n
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (KV cache full?)")
            for row, slot in logit_rows:
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
                slot.next_token = int(logits.argmax())
                slot.generated += 1
            bar.update(len(logit_rows))
            generated += len(logit_rows)
            still = []
            for slot in running:
                if slot.generated >= out_lens[slot.request]:
                    lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
                    free_seq_ids.append(slot.seq_id)
                else:
                    still.append(slot)
            running = still
        wall = time.perf_counter() - t0
    finally:
        bar.close()
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    if generated != sum(out_lens):
        raise RuntimeError(f"llama.cpp produced {generated} tokens, {sum(out_lens)} were requested")
    useful = generated
    return {
        "system": "llama.cpp",
        "version": getattr(_bindings(), "__version__", "?"),
        "weights": "as stored in the GGUF file (quantized)",
        "slots": slots,
        "threads": threads,
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "output_tokens": useful,
        "output_tok_per_s": round(useful / wall, 1),
    }
