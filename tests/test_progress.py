"""`skipserve progress`: what a run directory has done, read from the files the stages write.

The directories here are written by hand, as the stages would leave them part-way; the pipeline
test in test_training.py checks the same report on a real, finished run.
"""
import json
import re
import subprocess
import sys

import pytest

from skipserve.cli import main
from training.progress import format_progress, run_progress

RECIPE = """
rounds: 2
backbone: {arch: resnet20, epochs: 10}
gate: {kind: mlp, epochs: 3}
finetune: {policy: budget, knob: 0.6, epochs: 4}
refine: {epochs: 2}
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
    assert (s1["stage"], s1["what"], s1["status"]) == ("S1", "backbone resnet20", "started")
    assert (s1["epochs_done"], s1["epochs"], s1["last"]["epoch"]) == (3, 10, 2)
    assert (s1["best_val_top1"], s1["best_epoch"]) == (0.55, 1)
    assert s1["seconds_per_epoch"] == 110.0 and s1["eta_s"] == 7 * 110.0
    # every round is laid out from the recipe, refine's epochs from round 2 on
    assert [(s["round"], s["stage"], s["status"], s["epochs"]) for s in p["stages"][1:]] == [
        (1, "S3", "pending", None), (1, "S4", "pending", 3), (1, "S5", "pending", 4),
        (2, "S3", "pending", None), (2, "S4", "pending", 3), (2, "S5", "pending", 2)]
    table = format_progress(p).splitlines()
    assert "3/10 epochs" in table[1] and "best 0.5500 at epoch 1" in table[1] and "~13 min left" in table[1]
    assert table[1].endswith("<- next") and not any("<- next" in line for line in table[2:])


def test_a_resumed_stage_counts_each_epoch_once_and_the_next_stage_is_marked(tmp_path):
    run = _pipeline_dir(tmp_path)
    (run / "s1").mkdir()
    (run / "s1" / "backbone.safetensors").write_bytes(b"")  # S1's output: the stage is done
    (run / "round1").mkdir()
    (run / "round1" / "labels.safetensors").write_bytes(b"")
    _records(run / "round1" / "metrics.jsonl", "gate", [{"epoch": 0, "loss": 0.5, "seconds": 10.0},
                                                        {"epoch": 1, "loss": 0.4, "seconds": 10.0},
                                                        {"epoch": 1, "loss": 0.3, "seconds": 12.0}])
    p = run_progress(run)
    s1, s3, s4, s5 = p["stages"][:4]
    assert (s1["status"], s1["epochs_done"]) == ("done", 0)  # an S1 copied in without its records is still done
    assert s3["status"] == "done"
    assert (s4["status"], s4["epochs_done"], s4["last"]["loss"], s4["eta_s"]) == ("started", 2, 0.3, 11.0)
    assert s5["status"] == "pending"
    table = format_progress(p).splitlines()
    assert "<- next" in table[3] and "loss 0.300" in table[3]
    assert sum("<- next" in line for line in table) == 1


def test_a_finished_pipeline_shows_its_evaluations_the_skipped_rounds_and_what_it_ships(tmp_path):
    run = _pipeline_dir(tmp_path)
    (run / "s1").mkdir()
    (run / "s1" / "backbone.safetensors").write_bytes(b"")
    r1 = run / "round1"
    r1.mkdir()
    for name in ("labels", "gated", "model"):
        (r1 / f"{name}.safetensors").write_bytes(b"")
    (r1 / "eval-gated.json").write_text(json.dumps({"top1": 0.61, "flops_ratio": 0.59}))
    (r1 / "eval.json").write_text(json.dumps({"top1": 0.83, "flops_ratio": 0.594}))
    summary = {"rounds": [{"round": 1}], "targets_met": True, "best_round": 1, "best_stage": "S5",
               "final": str(r1 / "model.safetensors"), "backbone_top1": 0.835}
    (run / "summary.json").write_text(json.dumps(summary))
    p = run_progress(run)
    assert [s["status"] for s in p["stages"]] == ["done"] * 4 + ["skipped"] * 3  # targets met in round 1
    assert p["stages"][2]["eval"]["top1"] == 0.61 and p["stages"][3]["eval"]["top1"] == 0.83
    assert p["summary"] == summary
    table = format_progress(p)
    assert "output: top-1 0.8300 at 0.594 of the FLOPs" in table and "<- next" not in table
    assert "targets met; ships round 1 S5" in table


def test_a_stage_commands_run_directory(tmp_path):
    run = tmp_path / "s5"
    run.mkdir()
    (run / "finetune-config.json").write_text(json.dumps({"epochs": 2, "lr": 0.01}))
    _records(run / "metrics.jsonl", "finetune", [{"epoch": 0, "train_loss": 0.9, "seconds": 5.0}])
    (s5,) = run_progress(run)["stages"]
    assert (s5["stage"], s5["what"], s5["status"], s5["epochs_done"], s5["eta_s"]) == ("S5", "finetune", "started", 1, 5.0)
    _records(run / "metrics.jsonl", "finetune", [{"epoch": 1, "train_loss": 0.8, "seconds": 5.0}])
    (s5,) = run_progress(run)["stages"]
    assert (s5["status"], s5["eta_s"]) == ("done", None)


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
                (d / "metrics.jsonl").write_text('{"stage": "gate", "epoch": 0}\n{"stage": "gate", "ep')),
     "metrics.jsonl: line 2 is not JSON"),
    (lambda d: (d.mkdir(), (d / "gate-config.json").write_text('{"epochs": 2}'),
                (d / "metrics.jsonl").write_text('{"stage": "gate", "loss": 1}\n')),
     "metrics.jsonl: line 1 is not an epoch record"),
    (lambda d: (d.mkdir(), (d / "recipe.yaml").write_text("rounds: [1\n")), "recipe.yaml: not valid YAML"),
    (lambda d: (d.mkdir(), (d / "recipe.yaml").write_text("rounds: 1\n"), (d / "summary.json").write_text("{")),
     "summary.json: not valid JSON"),
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
    proc = subprocess.Popen([sys.executable, "-m", "skipserve", "progress", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the child has imported enough to write
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and b"Traceback" not in err, err.decode()
