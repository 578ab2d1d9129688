"""`pagoda bench quality` end to end on a tiny model: the fp32 reference agrees with itself, every mode scores
the same positions, and the goals are judged against bf16."""

from __future__ import annotations

import json

from pagoda.cli import main


def test_quality_scores_each_mode_against_fp32(make_tiny_model, tmp_path) -> None:
    folder, _ = make_tiny_model("llama", seed=4, hidden_size=128, intermediate_size=256)
    out = tmp_path / "quality.json"
    assert main(["bench", "quality", "--model", str(folder), "--modes", "bf16,int8,int4", "--window", "48",
                 "--chunk", "16", "--group-size", "32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    modes = report["modes"]
    assert list(modes) == ["fp32", "bf16", "int8", "int4"]  # the reference always runs, first
    assert modes["fp32"]["top1_agreement"] == 1.0
    assert len({m["positions"] for m in modes.values()}) == 1 and modes["fp32"]["positions"] > 0
    assert all(0 < m["perplexity"] < 1e6 for m in modes.values())
    assert modes["int4"]["weight_mb"] < modes["int8"]["weight_mb"] < modes["bf16"]["weight_mb"]
    assert set(report["goals"]) == {"int8_vs_bf16", "int4_vs_bf16"}


def test_decode_steps_score_the_same_positions_as_prefill(make_tiny_model, tmp_path) -> None:
    """--decode-rows: a window's first 16 tokens prefilled, the rest scored by decode steps of 3 rows (the decode
    kernels); the same positions as the prompt path, and in fp32 nearly the same logprobs."""
    folder, _ = make_tiny_model("llama", seed=4, hidden_size=128, intermediate_size=256)
    reports = []
    for rows in (0, 3):
        out = tmp_path / f"quality-{rows}.json"
        assert main(["bench", "quality", "--model", str(folder), "--modes", "fp32", "--window", "40",
                     "--decode-rows", str(rows), "--out", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    prefill, decode = (r["modes"]["fp32"] for r in reports)
    assert reports[1]["decode_rows"] == 3
    assert decode["positions"] == prefill["positions"] > 16
    assert abs(decode["perplexity"] / prefill["perplexity"] - 1) < 1e-3


def test_decode_rows_out_of_range_are_refused(capsys) -> None:
    assert main(["bench", "quality", "--modes", "fp32", "--decode-rows", "18"]) == 2
    assert "--decode-rows must be 0 (prefill) to 17, got 18" in capsys.readouterr().err


def test_an_unknown_mode_is_named_with_the_known_ones(capsys) -> None:
    assert main(["bench", "quality", "--modes", "bf16,int3"]) == 2
    assert "unknown --modes int3; known: fp32, bf16, gguf" in capsys.readouterr().err
