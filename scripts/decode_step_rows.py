"""Time one-call decode steps of R rows (a token and its drafts over --context tokens, 100 unless given) on the bundled
Q4_1 model, the Q4 projections on the VNNI kernel against AMX tiles of the step's own rows, interleaved in
one process (PAGODA_TILE_MIN_ROWS's measurement; needs a CPU with AMX int8).

    python scripts/decode_step_rows.py 1 2 4 6 8 16
    python scripts/decode_step_rows.py --context 400 1 2 4 8
"""

from __future__ import annotations

import argparse
import time

from pagoda import LLM
from pagoda.model.loader import resolve_model

REPEATS = 20


def main(rows_counts: list[int], context: int) -> None:
    llm = LLM(str(resolve_model("smollm2-135m").path), num_kv_blocks=64, block_size=16)
    runner, fused = llm.engine.runner, llm.engine.runner.model.fused_decode
    if fused is None or not llm.engine.runner.model.fused_decode.ops.amx_available():
        raise SystemExit("needs the one-call decode path and AMX int8 tiles")
    if context + 16 > 64 * 16:
        raise SystemExit("--context: at most 1008 tokens (64 blocks of 16)")
    tokens, blocks = list(range(1000, 1000 + context + 16)), list(range(64))
    runner.hidden_states(tokens, 0, context, blocks)

    def step_ms(rows: int) -> float:
        runner.hidden_states(tokens, context, rows, blocks)
        started = time.perf_counter()
        for _ in range(REPEATS):
            runner.hidden_states(tokens, context, rows, blocks)
        return (time.perf_counter() - started) / REPEATS * 1000

    for rows in rows_counts:
        best = {0: float("inf"), rows: float("inf")}
        for _ in range(4):
            for tile_min_rows in best:
                fused.tile_min_rows = tile_min_rows
                best[tile_min_rows] = min(best[tile_min_rows], step_ms(rows))
        print(f"rows {rows:2d}: VNNI {best[0]:6.2f} ms  tiles {best[rows]:6.2f} ms  ({best[0] / best[rows]:.2f}x)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=int, nargs="*", default=[1, 2, 4, 6, 8, 16], help="rows a step (1-16)")
    parser.add_argument("--context", type=int, default=100, help="tokens in the cache before the step's rows")
    args = parser.parse_args()
    main(args.rows, args.context)
