"""The benchmark's CPU smoke mode runs every section's code path (CI); GPU numbers live in benchmarks/results."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke_mode_writes_results(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_benchmark.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, timeout=900, capture_output=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert results["smoke"] and results["environment"]["torch"]
    variants = {(row["configuration"], row["variant"]) for row in results["step"]}
    assert len(variants) == 12  # 6 CPU-capable variants x 2 configurations (fused AdamW, CUDA graph: GPU only)
    readings = {row["variant"]: row["map_reading"] for row in results["step"]}
    assert readings["reference, fp32 (as published)"] == "released" and "released" in readings.values()
    assert readings["project: 16x16 capture only, SDPA elsewhere, fp32"] == "head-mean"
    assert all("median_s" in row and row["loss"] > 0 for row in results["step"]), results["step"]
    assert results["sampling"]["plain"]["images_per_s"] > 0 and "capture_overhead" in results["sampling"]
    assert results["full_run"][0]["steps"] == 4
    assert "single pair" in (tmp_path / "benchmark.md").read_text()


def test_committed_gpu_results_name_their_device():
    results = json.loads((ROOT / "benchmarks" / "results" / "h200" / "benchmark.json").read_text())
    assert "H200" in results["environment"]["device"] and not results["smoke"]
    rows = {row["variant"]: row for row in results["step"] if row["configuration"] == "single pair"}
    reference, graph = rows["reference, fp32 (as published)"], rows["+ the whole step as one CUDA graph"]
    assert reference["median_s"] / graph["median_s"] >= 3 and graph["peak_gib"] / reference["peak_gib"] <= 0.3
