"""`pagoda bench structured`, small: every part reports, the two throughput runs decode the same tokens, and
the generated compile variants are valid schemas that compile."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from pagoda.bench import structured
from pagoda.cli import main


def test_variants_are_valid_schemas() -> None:
    for schema in structured.variants(40):
        jsonschema.validators.validator_for(schema).check_schema(schema)


def test_a_short_run_reports_every_part(tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    assert main(["bench", "structured", "--concurrency", "3", "--max-tokens", "24", "--variants", "12",
                 "--repeats", "1", "--rounds", "1", "--kv-cache-gib", "0.2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    run = report["throughput"]
    assert run["output_tokens"] > 0 and run["constrained_tok_per_s"] > 0 and run["unconstrained_tok_per_s"] > 0
    assert run["mask_fill_ms_per_step"] > 0 and run["mask_apply_ms_per_step"] > 0
    assert report["compile"]["schemas"] == len(structured.SCHEMAS) + 12
    assert report["ttft"]["cold_p50_ms"] > 0 and report["ttft"]["cached_p50_ms"] > 0
