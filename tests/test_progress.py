"""`skipserve progress`: what a run directory has done, read from the files the stages write.

The directories here are written by hand, as the stages would leave them part-way; the pipeline
test in test_pipeline.py checks the same report on a real, finished run.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from skipserve.cli import main
from training.progress import format_progress, run_progress

RECIPE = """
stages:
  s1: {kind: backbone, arch: resnet20, epochs: 10}
  labels: {kind: label, model: s1}
  gate: {kind: gate, gate: mlp, model: s1, labels: labels, epochs: 3, policy: budget, knob: 0.6}
  cut: {kind: cut, model: gate, keep: 6}
  s5: {kind: finetune, model: cut, epochs: 4}
ship: {default: s5}
"""


def _records(path, stage, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({"stage": stage, **row}) + "\n")


def _pipeline_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(RECIPE)
    return run


def test_a_pipeline_part_way_through_s1(tmp_path):
    run = _pipeline_dir(tmp_path)
    # three finished epochs; the second was paused (its wall time is no guide to the next ones)
    _records(run / "s1" / "metrics.jsonl", "backbone", [
        {"epoch": 0, "train_loss": 2.0, "val_top1": 0.40, "seconds": 100.0},
        {"epoch": 1, "train_loss": 1.5, "val_top1": 0.55, "seconds": 900.0},
        {"epoch": 2, "train_loss": 1.2, "val_top1": 0.50, "seconds": 110.0}])
    p = run_progress(run)
    assert p["kind"] == "pipeline" and p["summary"] is None
    s1 = p["stages"][0]
    assert (s1["name"], s1["stage"], s1["what"], s1["status"]) == ("s1", "S1", "backbone resnet20", "started")
    assert (s1["epochs_done"], s1["epochs"], s1["last"]["epoch"]) == (3, 10, 2)
    assert (s1["best_val_top1"], s1["best_epoch"]) == (0.55, 1)
    assert s1["seconds_per_epoch"] == 110.0 and s1["eta_s"] == 7 * 110.0
    # every stage is laid out from the recipe, in its order
    assert [(s["name"], s["stage"], s["status"], s["epochs"]) for s in p["stages"][1:]] == [
        ("labels", "S3", "pending", None), ("gate", "S4", "pending", 3), ("cut", "cut", "pending", None),
        ("s5", "S5", "pending", 4)]
    table = format_progress(p).splitlines()
    assert "3/10 epochs" in table[1] and "best 0.5500 at epoch 1" in table[1] and "~13 min left" in table[1]
    assert table[1].endswith("<- next") and not any("<- next" in line for line in table[2:])
    _records(run / "gate" / "metrics.jsonl", "gate", [{"epoch": e, "loss": 0.1} for e in range(3)])
    gate = run_progress(run)["stages"][2]
    assert (gate["stage"], gate["status"], gate["eta_s"]) == ("S4", "epochs done", None)
    assert "<- next" in format_progress(run_progress(run)).splitlines()[1]  # S1 is still first undone
    (run / "gate" / "model.safetensors").write_bytes(b"")
    assert run_progress(run)["stages"][2]["status"] == "done"


def test_a_finished_pipeline_shows_its_evaluations_and_what_it_ships(tmp_path):
    run = _pipeline_dir(tmp_path)
    for name, output in (("s1", "backbone"), ("labels", "labels"), ("gate", "model"), ("cut", "model"), ("s5", "model")):
        (run / name).mkdir()
        (run / name / f"{output}.safetensors").write_bytes(b"")
    (run / "gate" / "eval.json").write_text(json.dumps({"top1": 0.61, "flops_ratio": 0.59}))
    (run / "s5" / "eval.json").write_text(json.dumps({"top1": 0.83, "flops_ratio": 0.594}))
    summary = {"stages": {}, "ship": {"default": {"stage": "s5", "top1": 0.83, "flops_ratio": 0.594,
                                                  "checkpoint": str(run / "ship" / "default.safetensors")}}}
    (run / "summary.json").write_text(json.dumps(summary))
    p = run_progress(run)
    assert [s["status"] for s in p["stages"]] == ["done"] * 5
    assert p["stages"][2]["eval"]["top1"] == 0.61 and p["stages"][4]["eval"]["top1"] == 0.83
    assert p["summary"] == summary
    table = format_progress(p)
    assert "output: top-1 0.8300 at 0.594 of the FLOPs" in table and "<- next" not in table
    assert "ships default (s5): top-1 0.8300 at 0.594 of the FLOPs" in table


def test_a_stage_commands_run_directory(tmp_path):
    run = tmp_path / "s5"
    run.mkdir()
    (run / "finetune-config.json").write_text(json.dumps({"epochs": 2, "lr": 0.01}))
    _records(run / "metrics.jsonl", "finetune", [{"epoch": 0, "train_loss": 0.9, "seconds": 5.0}])
    (s5,) = run_progress(run)["stages"]
    assert (s5["stage"], s5["what"], s5["status"], s5["epochs_done"], s5["eta_s"]) == ("S5", "finetune", "started", 1, 5.0)
    assert "<- next" not in format_progress(run_progress(run))  # a pipeline's order only
    _records(run / "metrics.jsonl", "finetune", [{"epoch": 1, "train_loss": 0.8, "seconds": 5.0}])
    (s5,) = run_progress(run)["stages"]
    assert (s5["status"], s5["eta_s"]) == ("epochs done", None)  # its output went to --out: not looked for
    # `finetune --epochs 0` only recalibrates BN
    recal = tmp_path / "recal"
    recal.mkdir()
    (recal / "finetune-config.json").write_text(json.dumps({"epochs": 0}))
    assert run_progress(recal)["stages"][0]["status"] == "epochs done"
    # train-backbone writes its output into the run directory: done once its summary is there
    s1 = tmp_path / "s1"
    s1.mkdir()
    (s1 / "backbone-config.json").write_text(json.dumps({"arch": "resnet20", "epochs": 1}))
    _records(s1 / "metrics.jsonl", "backbone", [{"epoch": 0, "val_top1": None, "train_loss": 1.0, "seconds": 5.0}])
    assert run_progress(s1)["stages"][0]["status"] == "epochs done"
    (s1 / "backbone-summary.json").write_text(json.dumps({"val_top1": 0.4}))
    assert run_progress(s1)["stages"][0]["status"] == "done"


def test_a_summary_older_than_the_recipe_is_of_an_earlier_run(tmp_path):
    run = _pipeline_dir(tmp_path)
    summary = {"stages": {}, "ship": {}}
    (run / "summary.json").write_text(json.dumps(summary))
    assert run_progress(run)["summary"] == summary
    recipe_time = (run / "summary.json").stat().st_mtime_ns + 10**9
    os.utime(run / "recipe.yaml", ns=(recipe_time, recipe_time))
    assert run_progress(run)["summary"] is None


def test_a_record_being_written_is_not_read_yet(tmp_path):
    run = tmp_path / "s4"
    run.mkdir()
    (run / "gate-config.json").write_text(json.dumps({"kind": "mlp", "epochs": 3}))
    _records(run / "metrics.jsonl", "gate", [{"epoch": 0, "loss": 0.5, "seconds": 4.0}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "gate", "epoch": 1, "lo')  # the stage is appending its next record
    (s4,) = run_progress(run)["stages"]
    assert (s4["what"], s4["status"], s4["epochs_done"]) == ("gate mlp", "started", 1)


def test_progress_cli_prints_json_and_the_table(tmp_path, capsys):
    run = tmp_path / "s1"
    run.mkdir()
    (run / "backbone-config.json").write_text(json.dumps({"arch": "resnet32", "epochs": 4}))
    _records(run / "metrics.jsonl", "backbone", [{"epoch": 0, "val_top1": 0.3, "train_loss": 2.0, "seconds": 60.0}])
    assert main(["progress", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "stage" and out["stages"][0]["what"] == "backbone resnet32"
    assert main(["progress", str(run)]) == 0
    assert "S1 backbone resnet32" in capsys.readouterr().out


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such run directory"),
    (lambda d: d.mkdir(), "not a run directory: no recipe.yaml"),
    (lambda d: (d.mkdir(), (d / "gate-config.json").write_text('{"epochs": 2}'),
                (d / "metrics.jsonl").write_text('{"stage": "gate", "epoch": 0}\n{"stage": "gate", "ep\n{}\n')),
     "metrics.jsonl: line 2 is not JSON"),
    (lambda d: (d.mkdir(), (d / "gate-config.json").write_text('{"epochs": 2}'),
                (d / "metrics.jsonl").write_text('{"stage": "gate", "loss": 1}\n')),
     "metrics.jsonl: line 1 is not an epoch record"),
    (lambda d: (d.mkdir(), (d / "recipe.yaml").write_text("stages: [1\n")), "recipe.yaml: not valid YAML"),
    (lambda d: (d.mkdir(), (d / "recipe.yaml").write_text(RECIPE), (d / "summary.json").write_text("{")),
     "summary.json: not valid JSON"),
    (lambda d: (d.mkdir(), (d / "recipe.yaml").write_text(RECIPE), (d / "summary.json").write_text("[]")),
     "summary.json: expected a JSON object, found list"),
    (lambda d: (d.mkdir(), (d / "recipe.yaml").write_text(RECIPE),
                (d / "summary.json").write_text('{"stages": {}}')),
     "summary.json: missing 'ship'"),
])
def test_a_bad_run_directory_is_named_with_what_is_wrong(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    setup(run)
    with pytest.raises(ValueError, match=re.escape(message)):  # ProgressError, or the pipeline's RecipeError
        run_progress(run)
    assert main(["progress", str(run)]) == 2
    assert message in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path):
    # `skipserve progress runs/x | head -1`: the pipe closes before the table is written
    run = tmp_path / "s1"
    run.mkdir()
    (run / "backbone-config.json").write_text(json.dumps({"arch": "resnet20", "epochs": 4}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a shell's buffered stdout
    proc = subprocess.Popen([sys.executable, "-m", "skipserve", "progress", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # long before the child has imported enough to write
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and b"Traceback" not in err, err.decode()
