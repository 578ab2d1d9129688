"""`pagoda bench gateway`, short and bounded: a real responder and a real gateway, LiteLLM left out (its venv is
made by the full benchmark only). No timing is asserted; the numbers must exist and add up."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from pagoda.bench.gateway import RateResult, _with_added, add_arguments, run
from pagoda.bench.gateway_routing import workload


def test_a_short_run_measures_direct_and_through_the_gateway(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "gateway.json"
    args = parser.parse_args(["--rates", "40", "--duration-s", "0.5", "--warmup-s", "0.2", "--no-litellm",
                              "--out", str(out)])
    assert run(args) == 0
    rows = {r["target"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"direct", "pagoda"}
    for row in rows.values():
        assert row["requests"] == 20 and row["errors"] == 0
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert math.isclose(rows["pagoda"]["added_p50_ms"], rows["pagoda"]["p50_ms"] - rows["direct"]["p50_ms"],
                        abs_tol=1e-3)
    assert "pagoda" in capsys.readouterr().out


def test_rounds_are_merged_by_median_and_added_is_against_direct() -> None:
    def row(target: str, p50: float, p99: float) -> RateResult:
        return RateResult(target, 100.0, 100.0, 10, 0, p50, p50, p99, 0.0)

    merged = {r.target: r for r in _with_added([row("direct", 1.0, 2.0), row("pagoda", 1.5, 3.0),
                                                row("direct", 3.0, 4.0), row("pagoda", 1.7, 3.4),
                                                row("direct", 2.0, 3.0), row("pagoda", 9.0, 9.0)])}
    assert merged["direct"].p50_ms == 2.0 and merged["pagoda"].p50_ms == 1.7
    assert merged["pagoda"].added_p50_ms == pytest.approx(-0.3) and merged["pagoda"].added_p99_ms == pytest.approx(0.4)


@pytest.mark.parametrize("flags", [["--rates", "0"], ["--duration-s", "0"]])
def test_bad_settings_are_named(flags: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match=flags[0]):
        run(parser.parse_args([*flags, "--no-litellm"]))


def test_the_workloads_share_prefixes_or_none() -> None:
    shared = workload("shared", 0, 20, prefixes=3, prefix_words=50)
    assert len({m[0]["content"] for m in shared}) <= 3 and len({m[1]["content"] for m in shared}) == 20
    assert workload("shared", 0, 20, 3, 50) == shared and workload("shared", 1, 20, 3, 50) != shared
    alone = workload("none", 0, 20, prefixes=3, prefix_words=50)
    assert len({m[0]["content"] for m in alone}) == 20


def test_a_tiny_routing_run_over_two_real_replicas(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "routing.json"
    args = parser.parse_args(["--mode", "routing", "--requests", "2", "--prefixes", "1", "--prefix-words", "20",
                              "--max-tokens", "2", "--concurrency", "2", "--num-kv-blocks", "64", "--out", str(out)])
    assert run(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["workload"], r["policy"]) for r in rows} == {(w, p) for w in ("shared", "none")
                                                             for p in ("round_robin", "prefix")}
    assert all(r["errors"] == 0 and r["output_tok_per_s"] > 0 and r["ttft_p50_ms"] > 0 for r in rows)
