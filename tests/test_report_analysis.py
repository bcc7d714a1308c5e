"""The report's random-baseline comparison and `--replot`, on hand-made results (no measurement)."""
import json

import pytest

from benchmarks.report import curve_at, gates_vs_random, replot, served_vs_static

RANDOM = {"name": "random skipping", "gate": None, "rule": "budget",
          "points": [{"flops_ratio": 0.3, "top1": 0.1}, {"flops_ratio": 0.5, "top1": 0.3},
                     {"flops_ratio": 1.0, "top1": 0.9}]}


def test_random_curve_is_interpolated_and_flat_beyond_full_cost():
    assert curve_at(RANDOM["points"], 0.4) == pytest.approx(0.2)
    assert curve_at(RANDOM["points"], 1.0) == pytest.approx(0.9)
    assert curve_at(RANDOM["points"], 1.7) == pytest.approx(0.9)  # the full backbone is cheaper
    assert curve_at(RANDOM["points"], 0.2) is None  # below its cheapest point: nothing to compare


def test_series_where_random_is_better_are_named_with_their_worst_point():
    good = {"name": "good", "gate": "resnet8", "rule": "budget",
            "points": [{"flops_ratio": 0.4, "top1": 0.5}, {"flops_ratio": 0.8, "top1": 0.85}]}
    two_pass = {"name": "two-pass", "gate": "lstm", "rule": "budget",
                "points": [{"flops_ratio": 0.45, "top1": 0.3}, {"flops_ratio": 1.5, "top1": 0.6}]}
    rows = {r["name"]: r for r in gates_vs_random({"series": [RANDOM, good, two_pass]})}
    assert rows["good"]["random_better"] == 0 and rows["good"]["worst"] is None
    bad = rows["two-pass"]
    assert (bad["points"], bad["random_better"], bad["over_full_cost"]) == (2, 1, 1)
    assert bad["worst"] == {"flops_ratio": 1.5, "top1": 0.6, "random_top1": pytest.approx(0.9)}


def test_replot_redraws_from_results_and_refuses_a_directory_without_them(tmp_path):
    pytest.importorskip("matplotlib", reason="replot draws the report's plots")
    with pytest.raises(FileNotFoundError, match="results.json"):
        replot(tmp_path)
    trained = {"name": "resnet8 gate, budget", "gate": "resnet8", "rule": "budget",
               "points": [{"flops_ratio": 0.5, "top1": 0.2}, {"flops_ratio": 1.0, "top1": 0.9}]}
    results = {
        "machine": {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "torch": "x", "commit": "abc1234"},
        "command": "skipserve bench report --out somewhere", "quick": True,
        "checkpoint": {"name": "default", "sha256": "0123456789abcdef" * 4},
        "accuracy": {"backbone_top1": 0.9, "val_images": 10, "config": {"gate_epochs": 1},
                     "series": [RANDOM, trained]},
        "engine": {"arch": "resnet8", "results": [
            {"batch": 1, "skip_fraction": 0.5, "flops_ratio": 0.5, "full_ms": 2.0, "gated_ms": 1.1, "masked_ms": 2.1,
             "speedup": 1.8, "ideal_speedup": 2.0, "efficiency": 0.9}]},
        "labels": {"images": 4, "units": 3, "naive_s": 1.0, "cached_s": 0.5, "speedup": 2.0, "max_abs_diff": 0.0},
        "profile": {"per_unit_skip_rate": [0.1, 0.5, 0.9], "distinct_paths": 3, "n_images": 10, "top1": 0.8,
                    "flops_ratio": 0.6}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = replot(tmp_path)
    assert set(out["plots"]) == {"accuracy", "engine", "profile"} and out["finite"]
    md = (tmp_path / "report.md").read_text()
    assert "commit abc1234" in md and "redrawn from results.json" in md  # measured-by and drawn-by both said
    assert "`default`, sha256 0123456789ab." in md
    assert "- resnet8 gate, budget: 1 of 2 points" in md  # 0.2 at 50 % FLOPs is below random's 0.3


def test_a_gated_model_is_compared_with_its_static_path_not_with_random_skipping():
    gated = {"name": "served", "gate": "resnet8", "rule": "budget",
             "points": [{"flops_ratio": 0.4, "top1": 0.7}, {"flops_ratio": 0.6, "top1": 0.8}]}
    static = {"name": "served: static path", "gate": None, "rule": "static", "static_of": "served",
              "points": [{"flops_ratio": 0.3, "top1": 0.5}, {"flops_ratio": 0.5, "top1": 0.7},
                         {"flops_ratio": 0.7, "top1": 0.9}]}
    acc = {"series": [RANDOM, gated, static]}
    (row,) = served_vs_static(acc)
    # at 0.4 the static path is interpolated to 0.6 (gate ahead); at 0.6 to 0.8 (a tie: static as good)
    assert (row["name"], row["points"], row["static_better"]) == ("served", 2, 1)
    assert row["worst"] == {"flops_ratio": 0.6, "top1": 0.8, "static_top1": pytest.approx(0.8)}
    rows = {r["name"]: r for r in gates_vs_random(acc)}
    assert set(rows) == {"served", "served: static path"}  # random skipping stays the baseline of both
