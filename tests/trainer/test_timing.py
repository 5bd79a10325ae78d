"""Per-step CPU/wall timing, compression work and the end-to-end estimate (``compressm_hf.trainer.timing``)."""

from __future__ import annotations

import pytest

from compressm_hf.trainer.report import build_report, read_report, write_report
from compressm_hf.trainer.timing import add_timing_to_report, run_timing, timing_lines


def _records(n_steps=100, cut=40, full=256, small=100, cpu_full=0.40, cpu_small=0.28, stats=(32, 40)):
    """A run cut once at ``cut``; the machine got busier after the cut: wall time *rises* by 40 %."""
    out = []
    for step in range(1, n_steps + 1):
        size = full if step <= cut else small
        cpu = cpu_full if size == full else cpu_small
        statistics = stats[0] < step <= stats[1]
        if statistics:
            cpu += 0.01  # the fused statistics: a little more CPU per step
        wall = cpu / 2 if step <= cut else cpu / 2 * 1.4 * cpu_full / cpu_small
        out.append(
            {
                "step": step,
                "seconds": wall,
                "cpu_seconds": cpu,
                "statistics": statistics,
                "total_state_size": size,
            }
        )
    return out


EVENTS = [{"kind": "reduction", "step": 40, "wall_time_s": 0.15, "cpu_time_s": 0.2}, {"kind": "rollback"}]


def test_cpu_time_gives_the_speed_up_when_wall_time_drifts():
    t = run_timing(_records(), EVENTS)
    assert t["step_speedup_wall"] == pytest.approx(1 / 1.4)  # what the old summary printed (x0.71)
    assert t["step_speedup_cpu"] == pytest.approx(0.40 / 0.28)
    assert t["full_size"]["total_state_size"] == 256 and t["final_size"]["total_state_size"] == 100
    assert t["full_size"]["steps"] == 40 - 2 - 8  # warm-up and statistics steps left out


def test_end_to_end_estimate_and_compression_work():
    t = run_timing(_records(), EVENTS)
    full_estimate = 100 * 0.40
    run = 40 * 0.40 + 60 * 0.28 + 8 * 0.01 + 0.2
    assert t["full_run_cpu_estimate_s"] == pytest.approx(full_estimate)
    assert t["run_cpu_s"] == pytest.approx(run)
    assert t["ideal_run_cpu_s"] == pytest.approx(40 * 0.40 + 60 * 0.28)
    assert t["end_to_end_speedup_cpu"] == pytest.approx(full_estimate / run)
    assert t["saved_cpu_s"] == pytest.approx(full_estimate - run)
    work = t["compression_work"]
    assert work["statistics_steps"] == 8 and work["statistics_cpu_s"] == pytest.approx(0.08)
    assert work["planning_and_surgery_cpu_s"] == pytest.approx(0.2) and work["events"] == 1
    assert work["fraction_of_run"] == pytest.approx((0.08 + 0.2) / run)


def test_summary_lines_say_how_it_was_measured():
    text = "\n".join(timing_lines(run_timing(_records(), EVENTS)))
    assert "x1.43 in CPU time" in text and "x0.71 in wall time" in text
    assert "end-to-end estimate" in text and "time.process_time" in text
    assert "compression work: 0.28 s CPU" in text
    assert timing_lines(None) == []
    plain = timing_lines(run_timing(_records(cut=200)), compressed=False)
    assert len(plain) == 1 and "s CPU" in plain[0]


def test_no_records_and_sizes_seen_only_while_collecting():
    assert run_timing([]) is None
    recs = _records(n_steps=10, cut=5, stats=(2, 5))  # no clean full-size step after the warm-up
    t = run_timing(recs)
    assert t["full_size"]["cpu_s_per_step"] == pytest.approx(0.41)  # falls back to the statistics steps


def test_timing_is_added_to_the_report(tmp_path):
    path = tmp_path / "compression_report.json"
    assert not add_timing_to_report(path, {"steps_timed": 1})  # no report yet: nothing written
    write_report(
        path, build_report(config={}, schedule_steps=[40], original_sizes=[64], final_sizes=[25], events=[])
    )
    assert add_timing_to_report(path, run_timing(_records(), EVENTS))
    report = read_report(path)
    assert report["timing"]["compression_work"]["events"] == 1 and report["final_sizes"] == [25]


def test_warm_up_steps_count_as_measured():
    recs = _records()
    recs[0]["cpu_seconds"] = 5.0  # first step: kernel load, allocator warm-up
    t = run_timing(recs, EVENTS)
    assert t["full_run_cpu_estimate_s"] == pytest.approx(5.0 + 99 * 0.40)
    assert t["ideal_run_cpu_s"] == pytest.approx(5.0 + 39 * 0.40 + 60 * 0.28)
