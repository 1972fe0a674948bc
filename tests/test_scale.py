"""The scale benchmark's bookkeeping (bench/scale.py): a unit's figures from its run directory, the
growth from the fewest to the most sites, and the table; the runs themselves are `dsfedmed bench
scale` (bench/results/scale.json)."""

from __future__ import annotations

import json

import pytest

from bench.scale import summarise, unit_config, write_results


def _run_dir(tmp_path, sites, cpu, rss):
    d = tmp_path / f"run-{sites}"
    d.mkdir()
    rows = [{"round": 0, "bytes_down": 1000 * sites, "bytes_up": 10 * sites, "seconds": 9.0, "dropped": [],
             "server_rss_mb": 500.0}]  # fmt: skip
    for r in (1, 2):
        rows.append(
            {
                "round": r,
                "bytes_down": 200 * sites,
                "bytes_up": 100 * sites,
                "seconds": 2.0 * r,
                "dropped": ["phantom-3"] if r == 2 else [],
                "server_cpu_s": {"send": cpu, "aggregate": cpu * r},
                "server_cpu_s_total": cpu + cpu * r,
                "server_rss_mb": rss,
            }  # fmt: skip
        )
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "summary.json").write_text(json.dumps({"status": "completed", "server_rss_baseline_mb": 450.0}))
    return d


def test_a_unit_is_summarised_from_rounds_one_on(tmp_path):
    s = summarise(_run_dir(tmp_path, 5, cpu=0.1, rss=470.0), 5)
    assert s["rounds"] == 2 and s["dropped"] == 1
    assert s["server_cpu_s_per_round"] == pytest.approx((0.2 + 0.3) / 2)
    assert s["server_cpu_s_by_stage"] == {"aggregate": pytest.approx(0.15), "send": pytest.approx(0.1)}
    assert s["bytes_per_round_per_site"] == pytest.approx(300.0) and s[
        "bytes_round0_per_site"
    ] == pytest.approx(1010.0)
    assert s["server_peak_mb"] == pytest.approx(500.0 - 450.0)  # round 0's RSS counts too
    assert s["server_seconds_per_round"] == pytest.approx(3.0) and s["server_peak_from"] == "round-end RSS"
    d = tmp_path / "run-5"  # rows that carry the process's high-water mark use it
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    (d / "metrics.jsonl").write_text(
        "\n".join(json.dumps({**r, "server_maxrss_mb": 900.0}) for r in rows) + "\n"
    )
    s = summarise(d, 5)
    assert s["server_peak_mb"] == pytest.approx(450.0) and s["server_peak_from"] == "high-water mark"


def test_growth_and_table_from_the_units(tmp_path):
    units = tmp_path / "units" / "scale"
    units.mkdir(parents=True)
    for sites, cpu, mb, b in ((5, 0.2, 40.0, 300.0), (50, 1.8, 200.0, 310.0)):
        rec = {"method": "dsfedmed-logits", "sites": sites, "status": "completed", "server_cpu_s_per_round": cpu,
               "server_cpu_s_by_stage": {"send": cpu}, "server_seconds_per_round": 3.0, "server_peak_mb": mb,
               "bytes_per_round_per_site": b, "dropped": 0}  # fmt: skip
        (units / f"dsfedmed-logits-n{sites}.json").write_text(json.dumps(rec))
    (units / "floors").mkdir()
    (units / "floors" / "n50.json").write_text(
        json.dumps(
            {
                "untrained": 0.13,
                "all-foreground": 0.11,
                "all-background": 0.05,
                "fm-zero-shot": 0.14,
                "best_floor": {"name": "untrained", "dice05_test_mean": 0.13},
            }
        )  # fmt: skip
    )
    rec50 = json.loads((units / "dsfedmed-logits-n50.json").read_text())
    (units / "dsfedmed-logits-n50.json").write_text(
        json.dumps({**rec50, "dice05_test_mean": 0.16, "dice_test_mean": 0.2})
    )
    (units / "fedavg-n5.json").write_text(
        json.dumps({"method": "fedavg", "sites": 5, "flower_status": "finished:failed"})
    )
    res = write_results(tmp_path)
    g = res["growth_5_to_50"]["dsfedmed-logits"]
    assert g["server_cpu_ratio"] == pytest.approx(9.0) and g["memory_ratio"] == pytest.approx(5.0)
    assert g["bytes_per_site_change"] == pytest.approx(310 / 300 - 1) and g["sites_ratio"] == 10
    assert "fedavg" not in res["growth_5_to_50"]  # a failed unit is shown, never used
    md = (tmp_path / "scale.md").read_text()
    assert "| fedavg | 5 | finished:failed |" in md and "server CPU per round x9.0" in md
    assert json.loads((tmp_path / "scale.json").read_text())["rows"][0]["method"] == "dsfedmed-logits"
    # the floors of the same splits stand beside what the runs learned; 0.16 is within 0.05 of 0.13
    assert res["floors"]["50"]["fm-zero-shot"] == 0.14
    assert (
        "| dsfedmed-logits | 50 | 0.160 (0.200) *at the floor* | n/a | 0.130 | 0.110 | 0.050 | 0.140 |" in md
    )
    assert "| dsfedmed-logits | 5 | n/a | n/a | n/a | n/a | n/a | n/a |" in md


def test_the_deadline_grows_with_the_sites():
    assert unit_config("fedavg", 50)["round-timeout-s"] > unit_config("fedavg", 5)["round-timeout-s"]
    assert unit_config("dsfedmed-logits", 10)["exchange"] == "logits"
