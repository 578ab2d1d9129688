"""`pagoda bench spec`, small: every workload reports, batch-1 outputs are identical on and off (else the run
fails), and the paired speedup is the median of the requests' own ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagoda.bench import spec
from pagoda.cli import main


def test_a_short_run_reports_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    assert main(["bench", "spec", "--output-len", "12", "--input-len", "24", "--batch", "4", "--kv-cache-gib", "0.2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["speculative_config"]["method"] == "ngram"
    for name in spec.WORKLOADS:
        workload = report["workloads"][name]
        assert workload["speedup"] > 0
        assert workload["outputs_differing"] == 0 or name == "mixed"  # a batch may part at a bf16 near-tie
        assert workload["acceptance"]["draft_tokens"] >= workload["acceptance"]["accepted_tokens"] >= 0
        assert (workload["speedup_paired_median"] is None) == (name == "mixed")
    assert report["workloads"]["random"]["off"]["decode_tokens"] == 8 * 11  # ignore_eos: every token, 8 requests


def test_the_paired_speedup_is_the_median_of_each_requests_ratio() -> None:
    def run(tokens: int, seconds: float) -> dict:
        return {"tokens": list(range(tokens)), "decode_s": seconds}

    off = [run(11, 1.0), run(21, 4.0), run(5, 1.0), run(1, 0.0)]  # the last decoded nothing: left out
    on = [run(11, 0.5), run(21, 1.0), run(5, 2.0), run(1, 0.0)]
    assert spec.paired_speedup(off, on) == pytest.approx(2.0)  # ratios 2, 4, 0.5
    assert spec.paired_speedup([run(1, 0.0)], [run(1, 0.0)]) is None
