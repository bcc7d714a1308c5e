"""The stage commands end to end on tiny data, as a user would chain them."""
import json
import subprocess
import sys

import pytest
import torch


def skipserve(*args, env_cache, check=True):
    env = {"SKIPSERVE_CACHE": str(env_cache), "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "skipserve", *map(str, args)], capture_output=True, text=True,
                         env=env)
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_train_label_gate_finetune_eval(image_dir, tmp_path):
    cache = tmp_path / "cache"
    common = ["--data", image_dir, "--val-fraction", "0.25"]
    s1 = skipserve("train-backbone", "--arch", "resnet20", "--data", image_dir, "--epochs", "1",
                   "--set", "val_fraction=0.25", "--set", "batch_size=16", "--run-dir", tmp_path / "s1",
                   env_cache=cache).stdout.strip().splitlines()[-1]
    skipserve("label", "--checkpoint", s1, "--out", tmp_path / "labels.safetensors", *common, env_cache=cache)
    skipserve("train-gate", "--checkpoint", s1, "--labels", tmp_path / "labels.safetensors", "--gate", "resnet8",
              "--epochs", "1", "--budget", "0.6", "--out", tmp_path / "gated.safetensors",
              "--run-dir", tmp_path / "gate", *common, env_cache=cache)
    skipserve("finetune", "--checkpoint", tmp_path / "gated.safetensors", "--epochs", "1",
              "--set", "recalibration_images=30", "--set", "policy=budget", "--set", "knob=0.6",
              "--out", tmp_path / "final.safetensors", "--run-dir", tmp_path / "ft", *common, env_cache=cache)
    result = json.loads(skipserve("eval", "--checkpoint", tmp_path / "final.safetensors", "--data", image_dir,
                                  "--split", "val", "--json", env_cache=cache).stdout)
    assert result["n_images"] == 15
    for key in ("top1", "top1_full", "flops_ratio", "gate_flops_ratio", "units_executed_mean", "distinct_paths",
                "per_unit_skip_rate"):
        assert key in result
    assert result["flops_ratio"] <= 0.6 + result["gate_flops_ratio"] + 1e-9
    assert len(result["per_unit_skip_rate"]) == 9
    full = json.loads(skipserve("eval", "--checkpoint", tmp_path / "final.safetensors", "--data", image_dir,
                                "--split", "val", "--json", "--policy", "full", env_cache=cache).stdout)
    assert full["flops_ratio"] == 1.0 and full["top1"] == full["top1_full"] == result["top1_full"]
    # --cap: the threshold rule's paths (every unit at this alpha) trimmed to half the FLOPs
    capped = json.loads(skipserve("eval", "--checkpoint", tmp_path / "final.safetensors", "--data", image_dir,
                                  "--split", "val", "--json", "--policy", "threshold", "--alpha=1e9", "--cap", "0.5",
                                  env_cache=cache).stdout)
    assert capped["policy"] == {"name": "threshold", "knob": 1e9, "cap": 0.5}
    assert capped["flops_ratio"] <= 0.5 + capped["gate_flops_ratio"] + 1e-9 and capped["top1_full"] == full["top1"]
    # a second round by hand: labels on the paths the finetuned model runs
    skipserve("label", "--checkpoint", tmp_path / "final.safetensors", "--on-paths", "--out", tmp_path / "l2.safetensors",
              *common, env_cache=cache)
    from safetensors.torch import load_file

    first, second = (load_file(tmp_path / f)["importance"] for f in ("labels.safetensors", "l2.safetensors"))
    assert first.shape == second.shape == (45, 9) and not torch.allclose(first, second)
    out = skipserve("label", "--checkpoint", s1, "--on-paths", "--out", tmp_path / "l3.safetensors", *common,
                    env_cache=cache, check=False)
    assert out.returncode == 2 and "--on-paths needs a gated checkpoint" in out.stderr
    # ... and its S5 distils the S1 backbone, not the round-1 model's own full path
    finetune = ["finetune", "--checkpoint", tmp_path / "final.safetensors", "--teacher", s1, "--epochs", "1",
                "--set", "recalibration_images=30", "--out", tmp_path / "round2.safetensors", *common]
    out = skipserve(*finetune, "--run-dir", tmp_path / "ft2", env_cache=cache, check=False)
    assert out.returncode == 2 and "--teacher is used only with distillation" in out.stderr
    skipserve(*finetune, "--set", "distill=0.5", "--run-dir", tmp_path / "ft2", env_cache=cache)
    assert (tmp_path / "round2.safetensors").exists()
    # --epochs 0: BN statistics re-estimated on the gate's paths, nothing else changed, and the card says so
    skipserve("finetune", "--checkpoint", tmp_path / "gated.safetensors", "--epochs", "0", "--set",
              "recalibration_images=30", "--out", tmp_path / "recal.safetensors", "--run-dir", tmp_path / "ft0",
              *common, env_cache=cache)
    from gating.model import GatedModel

    gated, recal = (GatedModel.load(tmp_path / f) for f in ("gated.safetensors", "recal.safetensors"))
    a, b = gated.state_dict(), recal.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "num_batches" not in k)
    assert not torch.equal(a["backbone.units.4.bn1.running_var"], b["backbone.units.4.bn1.running_var"])
    assert recal.card.info["stage"] == "S5 BN recalibration only"
    assert recal.card.info["from"].startswith(str(tmp_path / "gated.safetensors"))
    # the card keeps the chain of stages: S1 -> S4 -> recalibration here, S1 -> S4 -> S5 -> S5 for round 2
    assert [(h["stage"], h["from"].split(" (")[0]) for h in recal.card.info["history"]] == [
        ("S4", s1), ("S5 BN recalibration only", str(tmp_path / "gated.safetensors"))]
    assert recal.card.info["history"][0]["labels"] == str(tmp_path / "labels.safetensors")
    history = GatedModel.load(tmp_path / "round2.safetensors").card.info["history"]
    assert [h["stage"] for h in history] == ["S4", "S5", "S5"] and history[-1]["teacher"] == s1
    assert history[0]["from"] == f"{s1} (S1)" and history[-1]["finetune"]["distill"] == 0.5
    # where an S5 step's time goes, for this model: every part timed, in both layouts
    bench = json.loads(skipserve("bench", "finetune", "--checkpoint", tmp_path / "final.safetensors", "--teacher", s1,
                                 "--batch", "8", "--quick", "--json", "--threads", "1", env_cache=cache).stdout)
    assert set(bench["layouts"]) == {"nchw", "channels_last"} and bench["channels_last_speedup"] > 0
    for r in bench["layouts"].values():
        assert all(r[k] > 0 for k in ("step_ms", "decide_ms", "decide_by_forward_ms", "path_forward_backward_ms",
                                      "teacher_forward_ms"))
    out = skipserve("bench", "finetune", "--checkpoint", s1, "--teacher", s1, "--quick", env_cache=cache, check=False)
    assert out.returncode == 2 and "S5 needs a gated model" in out.stderr


def test_stage_commands_fail_clearly_on_bad_input(image_dir, tmp_path):
    cache = tmp_path / "cache"
    out = skipserve("eval", "--checkpoint", tmp_path / "none.safetensors", "--data", image_dir,
                    env_cache=cache, check=False)
    assert out.returncode == 2 and "no such checkpoint file" in out.stderr
    out = skipserve("eval", "--data", image_dir, "--checkpoint", tmp_path, env_cache=cache, check=False)
    assert out.returncode == 2 and "is a directory, not a checkpoint file" in out.stderr
    out = skipserve("eval", "--data", image_dir, "--budget", "1.5", "--checkpoint", tmp_path / "none",
                    env_cache=cache, check=False)
    assert out.returncode == 2 and "--budget: expected a number in (0, 1], got '1.5'" in out.stderr
    out = skipserve("eval", "--data", image_dir, "--cap", "0", "--checkpoint", tmp_path / "none",
                    env_cache=cache, check=False)
    assert out.returncode == 2 and "--cap: expected a number in (0, 1], got '0'" in out.stderr
    out = skipserve("eval", "--data", image_dir, "--budget", "0.5", "--cap", "0.5", "--checkpoint", tmp_path / "none",
                    env_cache=cache, check=False)
    assert out.returncode == 2 and "--budget already caps every image" in out.stderr
    out = skipserve("pipeline", "--config", tmp_path / "missing.yaml", env_cache=cache, check=False)
    assert out.returncode == 2 and "no such recipe file" in out.stderr


def test_label_and_finetune_use_their_device_flag_and_train_gate_offers_none(image_dir, gated_checkpoint, tmp_path, capsys):
    from skipserve.cli import main

    # the flag reaches S5's config (it used to be accepted and dropped) and S3's model: a bad one is
    # refused before any work
    rc = main(["finetune", "--checkpoint", str(gated_checkpoint), "--data", str(image_dir), "--device", "tpu",
               "--out", str(tmp_path / "out.safetensors"), "--run-dir", str(tmp_path / "run")])
    assert rc == 2 and "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    rc = main(["label", "--checkpoint", str(gated_checkpoint), "--data", str(image_dir), "--device", "tpu",
               "--out", str(tmp_path / "labels.safetensors")])
    assert rc == 2 and "got 'tpu'" in capsys.readouterr().err and not (tmp_path / "labels.safetensors").exists()
    with pytest.raises(SystemExit) as exit_:  # S4 always trains on the CPU
        main(["train-gate", "--checkpoint", str(gated_checkpoint), "--labels", "x", "--gate", "mlp",
              "--out", "y", "--device", "cpu"])
    assert exit_.value.code == 2 and "unrecognized arguments: --device cpu" in capsys.readouterr().err


def test_prune_then_gate_the_pruned_backbone(image_dir, tmp_path):
    cache = tmp_path / "cache"
    s1 = skipserve("train-backbone", "--arch", "resnet20", "--data", image_dir, "--epochs", "1",
                   "--set", "val_fraction=0.25", "--set", "batch_size=16", "--run-dir", tmp_path / "s1",
                   env_cache=cache).stdout.strip().splitlines()[-1]
    report = json.loads(skipserve("prune", "--method", "l1", "--ratio", "0.5", "--checkpoint", s1, "--data", image_dir,
                                  "--out", tmp_path / "pruned.safetensors", "--finetune-epochs", "1",
                                  env_cache=cache).stdout)
    assert report["flops_ratio"] == pytest.approx(0.5, abs=0.03) and "top1_after_finetune" in report
    common = ["--data", image_dir, "--val-fraction", "0.25"]
    skipserve("label", "--checkpoint", tmp_path / "pruned.safetensors", "--out", tmp_path / "l.safetensors", *common,
              env_cache=cache)
    skipserve("train-gate", "--checkpoint", tmp_path / "pruned.safetensors", "--labels", tmp_path / "l.safetensors",
              "--epochs", "1", "--budget", "0.6", "--out", tmp_path / "g.safetensors", "--run-dir", tmp_path / "g",
              *common, env_cache=cache)
    result = json.loads(skipserve("eval", "--checkpoint", tmp_path / "g.safetensors", "--data", image_dir,
                                  "--json", env_cache=cache).stdout)
    from gating.model import GatedModel
    unpruned = GatedModel.load(s1).flops.full
    gated = GatedModel.load(tmp_path / "g.safetensors")
    product = result["flops_ratio"] * gated.flops.full / unpruned  # executed / unpruned full
    assert product == pytest.approx(0.5 * result["flops_ratio"], abs=0.03)
    assert product < 0.5 * 0.6 + gated.gate_flops / unpruned + 1e-6
    thinned = json.loads(skipserve("prune", "--method", "genetic", "--ratio", "0.5", "--stages", "--checkpoint", s1,
                                   "--data", image_dir, "--out", tmp_path / "thin.safetensors", env_cache=cache).stdout)
    assert thinned["stages"] and thinned["flops_ratio"] == pytest.approx(0.5, abs=0.03)
    thin = GatedModel.load(tmp_path / "thin.safetensors")  # stream widths and shortcut maps survive the checkpoint
    assert thin.backbone.spec.stage_widths == (11, 23, 45)
    from training.pruning.surgery import stages  # the sensitivity allocation may remove an identity unit
    groups = stages(thin.backbone)
    assert len(groups) == 3 and len(thin.backbone.units) <= 9
    assert [{thin.backbone.units[i].conv2.out_channels for i in g} for g in groups] == [{11}, {23}, {45}]
    full = json.loads(skipserve("eval", "--checkpoint", tmp_path / "thin.safetensors", "--data", image_dir, "--json",
                                env_cache=cache).stdout)
    assert full["flops_ratio"] == pytest.approx(1.0) and 0 <= full["top1"] <= 1 and full["n_images"] > 0
    bench = json.loads(skipserve("bench", "prune", "--checkpoint", s1, "--data", image_dir, "--methods",
                                 "l1,magnitude,torch-pruning", "--quick", "--finetune-epochs", "1", "--json",
                                 env_cache=cache).stdout)
    by = {r["method"]: r for r in bench["results"]}
    assert set(by) == {"l1", "magnitude", "torch-pruning"}
    for method, tolerance in (("l1", 0.03), ("torch-pruning", 0.05)):  # Torch-Pruning rounds its own way
        r = by[method]
        assert r["flops_ratio"] == pytest.approx(0.5, abs=tolerance) and r["params"] < bench["unpruned"]["params"]
        assert r["speedup_b1"] > 0 and r["speedup_b64"] > 0 and 0 <= r["top1_after_finetune"] <= 1
    assert by["magnitude"]["sparsity"] == pytest.approx(0.5, abs=0.01) and "speedup_b64" not in by["magnitude"]
    assert by["magnitude"]["csr_numbers"] < 2 * by["magnitude"]["dense_numbers"]
    bad = skipserve("prune", "--method", "l1", "--ratio", "1.2", "--checkpoint", s1, "--out", tmp_path / "x",
                    env_cache=cache, check=False)
    assert bad.returncode == 2 and "--ratio: expected a number in (0, 1), got '1.2'" in bad.stderr
