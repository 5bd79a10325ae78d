"""``compressm-train`` reports CPU-time speed-up and compression work (summary and compression_report.json)."""

from __future__ import annotations

import json


def test_summary_and_report_carry_cpu_timing(trained_mamba):
    out, stdout = trained_mamba
    assert "speed-up after compression" not in stdout  # the wall-clock-only ratio is gone
    assert "in CPU time" in stdout and "end-to-end estimate" in stdout and "compression work" in stdout
    assert "time.process_time" in (out / "training_summary.txt").read_text()
    timing = json.loads((out / "compression_report.json").read_text())["timing"]
    assert timing["steps_timed"] == 8
    work = timing["compression_work"]
    assert work["statistics_steps"] >= 2 and work["events"] == 2 and work["planning_and_surgery_cpu_s"] >= 0
