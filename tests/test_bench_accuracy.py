"""`skipserve bench accuracy` on the tiny model and images: every series, finite numbers, honest FLOPs."""
import math

import pytest

from benchmarks.accuracy import AccuracyBenchConfig, run


def test_accuracy_curves_cover_every_gate_and_rule(gated_checkpoint, image_tar, tmp_path):
    cfg = AccuracyBenchConfig(backbone=str(gated_checkpoint), data=str(image_tar), gates=("resnet8", "mlp"),
                              rules=("budget", "threshold"), gate_epochs=1, extra_models={}, run_dir=str(tmp_path))
    result = run(cfg)
    names = [s["name"] for s in result["series"]]
    assert names == ["random skipping", "resnet8 gate, budget", "resnet8 gate, threshold", "mlp gate, budget",
                     "mlp gate, threshold"]
    for series in result["series"]:
        for p in series["points"]:
            assert 0 <= p["top1"] <= 1 and math.isfinite(p["flops_ratio"]) and p["flops_ratio"] > 0
    budget = {s["name"]: s["points"] for s in result["series"]}
    for p in budget["random skipping"]:
        assert p["flops_ratio"] <= p["knob"] + 1e-9, "random skipping meets each budget, and pays no gate"
    for p in budget["resnet8 gate, budget"]:
        assert p["flops_ratio"] > min(p["knob"], 1.0) - 0.35  # the budget, plus the gate's own cost
    # an inline gate under a rule that needs every score pays a second pass
    assert budget["mlp gate, budget"][-1]["flops_ratio"] > 1.9


def test_a_gated_model_is_measured_against_its_static_path(gated_checkpoint, image_tar, tmp_path, monkeypatch):
    import training.labels

    def no_labels(*a, **k):
        raise AssertionError("no gate to train, so no S3 labels to compute")

    monkeypatch.setattr(training.labels, "label_dataset", no_labels)
    cfg = AccuracyBenchConfig(backbone=str(gated_checkpoint), data=str(image_tar), gates=(),
                              extra_models={"served": str(gated_checkpoint)}, run_dir=str(tmp_path))
    result = run(cfg)
    series = {s["name"]: s for s in result["series"]}
    assert list(series) == ["random skipping", "served", "served: static path"]
    static = series["served: static path"]
    assert (static["rule"], static["gate"], static["static_of"]) == ("static", None, "served")
    flops = [p["flops_ratio"] for p in static["points"]]
    assert [p["knob"] for p in static["points"]] == list(range(1, len(flops) + 1))
    assert flops == sorted(flops) and flops[0] < 1.0
    # every unit kept is the full backbone, with no gate to pay for
    assert flops[-1] == pytest.approx(1.0) and static["points"][-1]["top1"] == pytest.approx(result["backbone_top1"])
