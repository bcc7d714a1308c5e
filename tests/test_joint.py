"""The joint stage (gate and backbone trained together through the decisions) on tiny models and data."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

import training.joint as joint_stage
from gating.model import GatedModel
from tests.conftest import make_backbone
from training.backbone import distillation
from training.data import load_image_folder, normalize, split_train_val
from training.finetune import FinetuneConfig, serve_new_gate
from training.gate import GateConfig, train_gate
from training.joint import JointConfig, joint_loss, train_joint
from training.labels import label_dataset
from training.pipeline import RecipeError, run_pipeline


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPSERVE_CACHE", str(tmp_path / "cache"))


def _train(image_dir):
    train, _ = split_train_val(load_image_folder(image_dir), val_fraction=0.25, seed=0)
    return train  # 45 images, 3 batches of 16


def _cfg(**fields) -> JointConfig:
    return JointConfig(**{"epochs": 2, "batch_size": 16, "recalibration_images": 45, "device": "cpu",
                          "channels_last": False, "target": 0.6, **fields})


def _served_objective(model: GatedModel, train, teacher, distill: float, temperature: float = 4.0) -> float:
    """The joint objective's accuracy part, (1 - distill) * CE + distill * T^2 KL, on the served paths
    (the model's own rule, eval mode) of the clean training images."""
    x = normalize(train.images, model.card.mean, model.card.std)
    with torch.no_grad():
        logits = model.eval()(x).logits
        ce = F.cross_entropy(logits, train.labels)
        return float((1 - distill) * ce + distill * distillation(logits, teacher.eval(), x, temperature))


def _flops_ratio(model: GatedModel, train) -> float:
    """Mean FLOPs ratio of the served rule on the clean training images, gate counted."""
    with torch.no_grad():
        out = model.eval()(normalize(train.images, model.card.mean, model.card.std))
    return float(out.flops.mean()) / model.flops.reference


# ------------------------------------------------------------------ 1. gradients reach the gate
@pytest.mark.parametrize("fields", [{"distill": 0.0, "flops_weight": 0.0}, {"distill": 0.5, "cap_paths": True},
                                    {"flops_weight": 10.0, "distill": 0.0}],
                         ids=["through-the-backbone-alone", "distilled-under-a-cap", "with-the-flops-term"])
def test_one_backward_of_the_joint_loss_reaches_every_gate_and_backbone_parameter(image_dir, gated_checkpoint, fields):
    train = _train(image_dir)
    model = GatedModel.load(gated_checkpoint)
    teacher = copy.deepcopy(model.backbone).requires_grad_(False)
    model.train()
    x = normalize(train.images[:32])
    loss, parts = joint_loss(model, x, train.labels[:32], 0.6, _cfg(**fields), torch.Generator().manual_seed(0),
                             teacher=teacher)
    loss.backward()
    for part in ("gate", "backbone"):
        for name, p in getattr(model, part).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{part}.{name} got no gradient"
    # the hard decisions are what the backbone ran: some units skipped, some run
    assert 0 < float(parts["flops_ratio"]) < 1


def test_the_decisions_are_hard_forward_and_capped_as_the_autopilot_caps(gated_checkpoint):
    from gating.policies import capped, make_policy

    model = GatedModel.load(gated_checkpoint).train()
    x = torch.randn(64, 3, 32, 32)
    cfg = _cfg(cap_paths=True)
    d = joint_stage.decide_soft(model, x, 0.5, cfg, torch.Generator().manual_seed(1))
    assert set(d.rule.unique().tolist()) <= {0.0, 1.0} and set(d.path.unique().tolist()) <= {0.0, 1.0}
    assert (d.path <= d.rule).all() and (d.path < d.rule).any(), "the cap drops units the rule kept"
    # the same noise again: the path is the threshold rule at 0 under a 0.5 cap, on the noisy scores
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z = model.gate(x) + joint_stage.logistic_noise((64, model.num_units), g)
    assert torch.equal(d.path.bool(), capped(make_policy("threshold", 0.0), 0.5).decide(z, model.flops))
    assert (model.flops.executed(d.path.bool()) <= 0.5 * model.flops.reference + 1e-6).all()


# ------------------------------------------------------------------ 2. better than the S4 gate at the same FLOPs
def test_at_a_fixed_target_it_lowers_the_training_objective_below_the_s4_gates(image_dir, gated_checkpoint, tmp_path):
    train, target, distill = _train(image_dir), 0.6, 0.5
    teacher = GatedModel.load(gated_checkpoint).backbone  # the full backbone, as the S4 output's BN was before
    s4 = GatedModel.load(gated_checkpoint)
    imp = label_dataset(s4.backbone, train)
    train_gate(s4, train, imp, GateConfig(epochs=3, batch_size=16), tmp_path / "s4")
    s4 = serve_new_gate(s4, train, FinetuneConfig(policy="threshold", flops_target=target), cutout_size=0)
    before = _served_objective(s4, train, teacher, distill)
    assert abs(_flops_ratio(s4, train) - target) < 0.03

    cfg = _cfg(epochs=4, lr=0.05, distill=distill)
    joint = train_joint(copy.deepcopy(s4), train, cfg, tmp_path / "joint", teacher=teacher)
    after = _served_objective(joint, train, teacher, distill)
    assert after < 0.8 * before, f"joint {after:.3f} vs S4 {before:.3f}"
    assert joint.policy.name == "threshold" and not joint.training and next(joint.parameters()).device.type == "cpu"
    served = _flops_ratio(joint, train)
    assert target - 0.03 < served <= target + 1e-9, served
    # while it trained, the FLOPs term held the gate's hard decisions near the target
    records = [json.loads(line) for line in (tmp_path / "joint" / "metrics.jsonl").read_text().splitlines()]
    assert abs(records[-1]["flops_ratio"] - target) < 0.1, records[-1]
    # the gate itself was trained: not the S4 gate
    assert not torch.equal(joint.gate.fc.weight, s4.gate.fc.weight)


def test_init_gate_false_starts_from_a_seeded_random_gate(image_dir, gated_checkpoint, tmp_path):
    train = _train(image_dir)
    model = GatedModel.load(gated_checkpoint)
    kept, fresh = copy.deepcopy(model), copy.deepcopy(model)
    joint_stage.start_gate(kept, train, _cfg())
    joint_stage.start_gate(fresh, train, _cfg(init_gate=False))
    again = copy.deepcopy(model)
    joint_stage.start_gate(again, train, _cfg(init_gate=False))
    trunk = "stem.0.weight"
    assert torch.equal(kept.gate.state_dict()[trunk], model.gate.state_dict()[trunk])
    assert not torch.equal(fresh.gate.state_dict()[trunk], model.gate.state_dict()[trunk])
    assert all(torch.equal(a, b) for a, b in zip(fresh.gate.state_dict().values(), again.gate.state_dict().values()))
    # either way, the start spends the target at zero noise, with scores on the noise's scale
    for m in (kept, fresh):
        with torch.no_grad():
            scores = m.gate.eval()(normalize(train.images, m.card.mean, m.card.std))
        keep = scores >= 0
        ratio = float((m.flops.executed(keep) + m.gate_flops).mean()) / m.flops.reference
        assert abs(ratio - 0.6) < 0.03 and float(scores.std()) == pytest.approx(1.0, rel=0.05)


# ------------------------------------------------------------------ 3. resume
@pytest.mark.parametrize("fields", [{"target_range": [0.4, 0.8], "cap_paths": True},
                                    {"schedule": "constant", "average_from": 0}],
                         ids=["range-and-cap", "weight-averaging"])
def test_a_killed_joint_run_resumes_to_the_same_weights(image_dir, gated_checkpoint, tmp_path, monkeypatch, fields):
    train = _train(image_dir)
    cfg = _cfg(**fields)
    teacher = GatedModel.load(gated_checkpoint).backbone
    straight = train_joint(GatedModel.load(gated_checkpoint), train, cfg, tmp_path / "straight", teacher=teacher)

    real, calls = joint_stage.augment, {"n": 0}

    def dying(images, g, pad=4):
        calls["n"] += 1
        if calls["n"] == 5:  # the second batch of epoch 2 (3 batches an epoch)
            raise KeyboardInterrupt("killed")
        return real(images, g, pad)

    monkeypatch.setattr(joint_stage, "augment", dying)
    with pytest.raises(KeyboardInterrupt):
        train_joint(GatedModel.load(gated_checkpoint), train, cfg, tmp_path / "killed", teacher=teacher)
    monkeypatch.setattr(joint_stage, "augment", real)
    log = tmp_path / "killed" / "metrics.jsonl"
    epochs = lambda: [json.loads(line)["epoch"] for line in log.read_text().splitlines()]  # noqa: E731
    assert epochs() == [0]
    resumed = train_joint(GatedModel.load(gated_checkpoint), train, cfg, tmp_path / "killed", teacher=teacher)
    assert epochs() == [0, 1]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.policy.to_dict() == resumed.policy.to_dict()
    start = GatedModel.load(gated_checkpoint).state_dict()
    assert not torch.equal(a["backbone.stem.0.weight"], start["backbone.stem.0.weight"])
    assert not torch.equal(a["gate.stem.0.weight"], start["gate.stem.0.weight"])


# ------------------------------------------------------------------ 4. refusals
@pytest.mark.parametrize("fields, match", [
    ({"target": 0.0}, r"target must be a FLOPs ratio in \(0, 1\]"),
    ({"target": 1.2}, r"target must be a FLOPs ratio in \(0, 1\]"),
    ({"target_range": [0.8, 0.5]}, r"target_range must be \[lo, hi\] with lo <= hi"),
    ({"target_range": [0.0, 0.7]}, r"target_range must lie in \(0, 1\]"),
    ({"target_range": [0.5]}, r"target_range must be \[lo, hi\]"),
    ({"target_range": [0.7, 0.9]}, r"target 0.6 \(the served point\) must lie in target_range"),
    ({"flops_weight": -1.0}, r"flops_weight must be >= 0"),
    ({"gumbel_temperature": 0.0}, r"gumbel_temperature must be > 0"),
    ({"gumbel_temperature": -1.0}, r"gumbel_temperature must be > 0"),
    ({"temperature": 0.0}, r"temperature \(distillation's\) must be > 0"),
    ({"distill": 1.5}, r"distill must be in \[0, 1\]"),
    ({"average_from": 2}, r"average_from must be an epoch in \[0, 2\)"),
    ({"schedule": "step"}, r"schedule must be 'cosine' or 'constant'"),
    ({"gate_lr": -1e-3}, r"lr and gate_lr must be >= 0"),
    ({"target": 0.05}, r"below what skipping every unit costs"),
])
def test_bad_configs_are_refused_before_any_work(image_dir, gated_checkpoint, tmp_path, fields, match):
    train = _train(image_dir)
    with pytest.raises(ValueError, match=match):
        train_joint(GatedModel.load(gated_checkpoint), train, _cfg(**fields), tmp_path / "run", teacher=None)
    assert not (tmp_path / "run").exists()


def test_a_model_without_an_upfront_gate_is_refused_before_any_work(image_dir, tmp_path):
    from gating.gates import build_gate

    train = _train(image_dir)
    backbone = make_backbone("resnet20")
    for model, match in [(GatedModel(backbone), "needs a gate"),
                         (GatedModel(backbone, build_gate("lstm", backbone)), "up-front resnet8 gate, not 'lstm'")]:
        with pytest.raises(ValueError, match=match):
            train_joint(model, train, _cfg(), tmp_path / "run", teacher=None)
    assert not (tmp_path / "run").exists()




# ------------------------------------------------------------------ 5. in a recipe
def test_a_recipe_with_a_joint_stage_runs_end_to_end(image_dir, tmp_path):
    recipe = {
        "data": {"path": str(image_dir), "val_fraction": 0.25, "split_seed": 0},
        "stages": {
            "s1": {"kind": "backbone", "arch": "resnet20", "epochs": 1, "batch_size": 16, "channels_last": False,
                   "compile": False},
            "labels": {"kind": "label", "model": "s1", "batch_size": 50},
            "gate": {"kind": "gate", "model": "s1", "labels": "labels", "epochs": 1, "batch_size": 16,
                     "policy": "threshold", "flops_target": 0.7},
            "joint": {"kind": "joint", "model": "gate", "teacher": "s1", "epochs": 1, "batch_size": 16,
                      "recalibration_images": 45, "target": 0.7, "target_range": [0.5, 0.9], "cap_paths": True,
                      "channels_last": False},
        },
        "ship": {"default": "joint", "default-backbone": "s1"},
    }
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = tmp_path / "run"
    summary = run_pipeline(path, run)
    shipped = GatedModel.load(run / "ship" / "default.safetensors")
    assert shipped.card.info["stage"] == "joint" and shipped.policy.name == "threshold"
    assert json.loads((run / "joint" / "stage.json").read_text())["kind"] == "joint"
    assert [json.loads(l)["epoch"] for l in (run / "joint" / "metrics.jsonl").read_text().splitlines()] == [0]
    assert 0 < summary["ship"]["default"]["flops_ratio"] < 1
    # the joint stage trained the gate and the backbone of its input
    before = GatedModel.load(run / "gate" / "model.safetensors").state_dict()
    after = shipped.state_dict()
    assert not torch.equal(before["gate.fc.weight"], after["gate.fc.weight"])
    assert not torch.equal(before["backbone.stem.0.weight"], after["backbone.stem.0.weight"])
    # a rerun skips it; a changed joint stage is refused, naming the field
    assert run_pipeline(path, run)["ship"]["default"] == summary["ship"]["default"]
    recipe["stages"]["joint"]["flops_weight"] = 1.0
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(RecipeError, match=r"\[stages.joint\]: \['flops_weight'\] differ from the run"):
        run_pipeline(path, run)
