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


def test_an_unknown_mode_is_named_with_the_known_ones(capsys) -> None:
    assert main(["bench", "quality", "--modes", "bf16,int3"]) == 2
    assert "unknown --modes int3; known: fp32, bf16, gguf" in capsys.readouterr().err
