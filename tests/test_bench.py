"""make bench's JSON: figures are merged into reports/bench.json, never replace it."""

from __future__ import annotations

import json

from fitscope.bench import record


def test_record_merges_into_an_existing_file(tmp_path):
    path = tmp_path / "reports" / "bench.json"
    record({"ingest_s_per_11M_rows": 40.0, "tracking_overhead": 0.5}, path)  # another bench
    merged = record({"tracking_overhead": 0.01, "large_gflops": 70.0}, path)
    expected = {"ingest_s_per_11M_rows": 40.0, "tracking_overhead": 0.01, "large_gflops": 70.0}
    assert merged == expected
    assert json.loads(path.read_text()) == expected
