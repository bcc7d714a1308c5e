"""Training stages on tiny models and data: real behaviour, seconds each."""
import contextlib
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import training.backbone as backbone_stage
from gating.backbones import BACKBONES
from gating.checkpoint import CheckpointError
from gating.executor import execute
from gating.gates import GATES, build_gate
from gating.model import GatedModel
from gating.policies import make_policy
from tests.conftest import make_backbone
from training.backbone import COMPILE_MODES, BackboneConfig, train_backbone
from training.data import DataError, ImageSet, cutout, load_image_folder, split_train_val
from training.gate import GateConfig, train_gate
from training.labels import importance_cached, importance_naive, label_dataset, load_labels, save_labels
from training.progress import run_progress

from tests.conftest import CLASSES


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPSERVE_CACHE", str(tmp_path / "cache"))


def test_directory_and_archive_load_the_same(image_dir, image_tar):
    a = load_image_folder(image_dir)
    b = load_image_folder(image_tar)
    assert a.classes == b.classes == CLASSES
    assert a.images.shape == (60, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    again = load_image_folder(image_tar)  # from the uint8 cache
    assert torch.equal(again.images, b.images)


def test_split_is_stratified_and_seeded(image_dir):
    data = load_image_folder(image_dir)
    train, val = split_train_val(data, val_fraction=0.25, seed=3)
    assert len(val) == 15 and torch.bincount(val.labels).tolist() == [5, 5, 5]
    train2, val2 = split_train_val(data, val_fraction=0.25, seed=3)
    assert torch.equal(val.images, val2.images)
    _, val3 = split_train_val(data, val_fraction=0.25, seed=4)
    assert not torch.equal(val.images, val3.images)


def test_bad_data_fails_clearly(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty")
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="x.jpg: cannot decode"):
        load_image_folder(tmp_path / "bad")
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="cannot read archive"):
        load_image_folder(tmp_path / "junk.tar.gz")


def test_labels_equal_the_definition():
    backbone = make_backbone("resnet20")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, 32, 32, generator=g), torch.randint(0, 10, (5,), generator=g)
    cached, naive = importance_cached(backbone, x, y), importance_naive(backbone, x, y)
    with torch.no_grad():
        base = F.cross_entropy(backbone(x), y, reduction="none")
        for i in range(backbone.num_units):
            keep = torch.ones(5, backbone.num_units, dtype=torch.bool)
            keep[:, i] = False  # M - Block[i]
            expected = F.cross_entropy(execute(backbone, x, keep), y, reduction="none") - base
            assert torch.allclose(cached[:, i], expected, atol=1e-5)
    assert torch.allclose(cached, naive, atol=1e-5)
    assert cached.abs().max() > 1e-3, "labels are not trivially zero"


def test_path_labels_equal_the_definition():
    """Later rounds label on each image's own path: remove unit i where it runs, add it where it does not."""
    backbone = make_backbone("resnet20")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    keep = torch.rand(6, backbone.num_units, generator=g) < 0.6  # (B, n) a different path per image
    cached, naive = importance_cached(backbone, x, y, keep), importance_naive(backbone, x, y, keep)
    with torch.no_grad():
        for b in range(6):
            xb, yb, path = x[b:b + 1], y[b:b + 1], keep[b:b + 1]
            for i in range(backbone.num_units):
                without, with_ = path.clone(), path.clone()
                without[0, i], with_[0, i] = False, True
                expected = (F.cross_entropy(execute(backbone, xb, without), yb)
                            - F.cross_entropy(execute(backbone, xb, with_), yb))
                assert torch.allclose(cached[b, i], expected, atol=1e-5), (b, i)
    assert torch.allclose(cached, naive, atol=1e-5)
    everything = torch.ones_like(keep)
    assert torch.allclose(importance_cached(backbone, x, y, everything), importance_cached(backbone, x, y), atol=1e-6)


def test_label_files_are_checked(tmp_path):
    imp = torch.randn(6, 9)
    save_labels(tmp_path / "l.safetensors", imp, source="test", num_units=9)
    assert torch.equal(load_labels(tmp_path / "l.safetensors", num_images=6, num_units=9), imp)
    with pytest.raises(CheckpointError, match="expected \\(images, units\\) = \\(7, 9\\)"):
        load_labels(tmp_path / "l.safetensors", num_images=7, num_units=9)
    data = (tmp_path / "l.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_labels(tmp_path / "t.safetensors", num_images=6, num_units=9)


def _synthetic_gate_task(n_images: int, n_units: int, seed: int):
    """Bright images need the first half of the units, dark images the second half."""
    g = torch.Generator().manual_seed(seed)
    bright = torch.rand(n_images, generator=g) < 0.5
    level = torch.where(bright, 190, 50).view(-1, 1, 1, 1)
    images = (level + torch.randint(-40, 40, (n_images, 3, 32, 32), generator=g)).clamp(0, 255).to(torch.uint8)
    first = torch.arange(n_units) < n_units // 2
    imp = torch.where(bright[:, None] == first[None, :], torch.tensor(1.0), torch.tensor(-0.2))
    return ImageSet(images, torch.zeros(n_images, dtype=torch.int64), ["x"]), imp


@pytest.mark.parametrize("kind", GATES.names())
def test_each_gate_kind_beats_a_random_gate_at_the_same_skip_rate(kind, tmp_path):
    from training.data import normalize

    backbone = make_backbone("resnet20")
    train, imp = _synthetic_gate_task(256, backbone.num_units, seed=0)
    test, test_imp = _synthetic_gate_task(128, backbone.num_units, seed=1)
    model = GatedModel(backbone)
    train_gate(model, train, imp, GateConfig(kind=kind, objective="regression", epochs=12, batch_size=64, lr=5e-3),
               tmp_path)
    policy = make_policy("budget", 0.5)
    with torch.no_grad():
        keep = model(normalize(test.images), policy).keep
    random_scores = torch.rand(test_imp.shape, generator=torch.Generator().manual_seed(2))
    random_keep = policy.decide(random_scores, model.flops)
    trained_flops, random_flops = model.flops.executed(keep).mean(), model.flops.executed(random_keep).mean()
    assert trained_flops <= random_flops + 0.03 * model.flops.full, "no more compute than the random gate"
    trained_value = (keep * test_imp).sum(1).mean()
    random_value = (random_keep * test_imp).sum(1).mean()
    assert trained_value > random_value + 1.0, f"{kind}: trained {trained_value:.2f} vs random {random_value:.2f}"


@pytest.mark.parametrize("objective", ["reward", "reinforce"])
def test_reward_objectives_learn_which_units_pay_for_themselves(objective, tmp_path):
    """sigmoid(G) as open probability: after training, threshold 0 opens exactly the units worth their price."""
    from training.data import normalize

    backbone = make_backbone("resnet20")
    train, imp = _synthetic_gate_task(256, backbone.num_units, seed=0)
    test, test_imp = _synthetic_gate_task(128, backbone.num_units, seed=1)
    model = GatedModel(backbone)
    train_gate(model, train, imp, GateConfig(kind="resnet8", objective=objective, epochs=12, batch_size=64, lr=5e-3),
               tmp_path)
    with torch.no_grad():
        keep = model(normalize(test.images), make_policy("threshold", 0.0)).keep
    worth = test_imp > 0
    assert (keep == worth).float().mean() > 0.9
    random_keep = torch.rand(keep.shape, generator=torch.Generator().manual_seed(2)).argsort(1) < keep.sum(1, keepdim=True)
    assert (keep * test_imp).sum(1).mean() > (random_keep * test_imp).sum(1).mean() + 1.0


@contextlib.contextmanager
def killed_mid_epoch_two(monkeypatch, stage_module, batch: int = 5):
    """The stage's ``augment`` raises KeyboardInterrupt at its ``batch``-th call (3 batches an epoch)."""
    real_augment, calls = stage_module.augment, {"n": 0}

    def dying_augment(images, g, pad=4):
        calls["n"] += 1
        if calls["n"] == batch:
            raise KeyboardInterrupt("killed")
        return real_augment(images, g, pad)

    monkeypatch.setattr(stage_module, "augment", dying_augment)
    try:
        yield
    finally:
        monkeypatch.setattr(stage_module, "augment", real_augment)


def _tiny_s1(image_dir, **kw):
    return BackboneConfig(**{"arch": "resnet20", "data": str(image_dir), "val_fraction": 0.25, "epochs": 2,
                             "batch_size": 16, "channels_last": False, **kw})


@pytest.mark.parametrize("fields", [{}, {"restarts": [1]}, {"schedule": "constant", "average_from": 0}],
                         ids=["one-cycle", "warm-restart", "weight-averaging"])
def test_killed_backbone_stage_resumes_to_the_same_weights(image_dir, tmp_path, monkeypatch, fields):
    cfg = _tiny_s1(image_dir, **fields)
    reference = train_backbone(cfg, tmp_path / "straight")

    with pytest.raises(KeyboardInterrupt), killed_mid_epoch_two(monkeypatch, backbone_stage):
        train_backbone(cfg, tmp_path / "killed")
    resumed = train_backbone(cfg, tmp_path / "killed")
    a, b = GatedModel.load(reference).backbone.state_dict(), GatedModel.load(resumed).backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(l)["epoch"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


def test_a_record_without_its_state_is_dropped_on_resume(image_dir, tmp_path):
    from training.run import RunDir

    RunDir(tmp_path, "backbone").log({"epoch": 0, "val_top1": 0.0})  # killed after logging, before saving
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "backbone", "epoch": 1, "val_t')  # and a record torn by a kill mid-write
    train_backbone(_tiny_s1(image_dir), tmp_path)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and "train_loss" in records[0]


def test_warm_restarts_restart_the_cosine_schedule():
    cfg = BackboneConfig(epochs=10, restarts=[4], lr=0.1, warmup_epochs=1.0)
    lr = [backbone_stage.lr_at(cfg, step, 10) for step in range(100)]
    assert lr[0] == pytest.approx(0.01) and lr[9] == pytest.approx(0.1)  # warm-up
    assert lr[39] < 0.01 and lr[40] == pytest.approx(0.01) and lr[49] == pytest.approx(0.1)  # again at 4
    assert lr[99] < 0.001 and max(lr[50:]) <= 0.1 + 1e-12
    assert lr[:40] == [backbone_stage.lr_at(BackboneConfig(epochs=4, lr=0.1), s, 10) for s in range(40)]
    with pytest.raises(ValueError, match="restarts \\[10\\] must be whole epochs inside"):
        train_backbone(BackboneConfig(epochs=10, restarts=[10], data="unused"), "unused")
    with pytest.raises(ValueError, match="restarts \\[4.5\\] must be whole epochs"):  # momentum resets at epoch starts
        train_backbone(BackboneConfig(epochs=10, restarts=[4.5], data="unused"), "unused")


def test_weight_averaging_ships_the_mean_of_the_epochs_weights_with_bn_reestimated(image_dir, tmp_path):
    # a constant learning rate: epoch 1 of a 2-epoch run is the whole of a 1-epoch one
    after = [GatedModel.load(train_backbone(_tiny_s1(image_dir, schedule="constant", epochs=e), tmp_path / f"e{e}"))
             .backbone.state_dict() for e in (1, 2)]
    out = train_backbone(_tiny_s1(image_dir, schedule="constant", average_from=0, average_bn_images=24), tmp_path / "swa")
    got = GatedModel.load(out).backbone.state_dict()
    for name, value in got.items():
        if name.endswith(("running_mean", "running_var")):  # re-estimated for the averaged weights
            assert not torch.allclose(value, after[1][name]), name
        elif not name.endswith("num_batches_tracked"):
            assert torch.allclose(value, (after[0][name] + after[1][name]) / 2, atol=1e-6), name
    records = [json.loads(l) for l in (tmp_path / "swa" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["average_val_top1"] <= 1 for r in records) and len(records) == 2
    assert backbone_stage.lr_at(BackboneConfig(schedule="constant", lr=0.02), 1234, 10) == 0.02


def test_resuming_with_another_config_is_refused(image_dir, tmp_path):
    from training.run import RunError

    train_backbone(_tiny_s1(image_dir), tmp_path)
    with pytest.raises(RunError, match="config differs in \\['lr'\\]"):
        train_backbone(_tiny_s1(image_dir, lr=0.5), tmp_path)


def test_a_finished_run_extended_by_a_warm_restart_goes_on_as_if_trained_so_from_scratch(image_dir, tmp_path):
    from training.run import RunError

    straight = train_backbone(_tiny_s1(image_dir, epochs=2, restarts=[1]), tmp_path / "straight")
    train_backbone(_tiny_s1(image_dir, epochs=1), tmp_path / "extended")
    with pytest.raises(RunError, match="config differs in \\['epochs'\\]"):  # epoch 0's lr would have been another
        train_backbone(_tiny_s1(image_dir, epochs=2), tmp_path / "extended")
    with pytest.raises(RunError, match="config differs in \\['epochs', 'lr', 'restarts'\\]"):
        train_backbone(_tiny_s1(image_dir, epochs=2, restarts=[1], lr=0.5), tmp_path / "extended")
    first = (tmp_path / "extended" / "metrics.jsonl").read_text()
    extended = train_backbone(_tiny_s1(image_dir, epochs=2, restarts=[1]), tmp_path / "extended")
    a, b = GatedModel.load(straight).backbone.state_dict(), GatedModel.load(extended).backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "extended" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1] and lines[0] == first.strip()  # epoch 0 not rerun
    assert (tmp_path / "extended" / "backbone-1ep.safetensors").exists()  # the 1-epoch output, kept aside
    assert json.loads((tmp_path / "extended" / "backbone-summary.json").read_text())["epochs"] == 2


def test_a_run_started_before_a_config_field_existed_resumes_at_its_default(tmp_path):
    from training.run import RunDir, RunError

    run = RunDir(tmp_path, "backbone")
    old = {k: v for k, v in dataclasses.asdict(BackboneConfig()).items() if k not in ("cutout", "restarts")}
    (tmp_path / "backbone-config.json").write_text(json.dumps(old))
    run.save_state({"epoch": 1})
    run.check_config(BackboneConfig())  # the fields it lacks are at their defaults: same run
    with pytest.raises(RunError, match="config differs in \\['cutout'\\]"):
        run.check_config(BackboneConfig(cutout=16))


def test_distillation_loss_mixes_hinton_and_cross_entropy():
    from training.finetune import train_on_own_paths

    torch.manual_seed(0)
    backbone = make_backbone("resnet20")
    model = GatedModel(backbone, build_gate("resnet8", backbone), make_policy("budget", 0.6))
    teacher = make_backbone("resnet20", seed=1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plain = train_on_own_paths(model, x, y)
    keep = model.decide(x)
    model.backbone.train()
    logits = execute(model.backbone, x, keep)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    kl = F.kl_div(F.log_softmax(logits / 2, 1), F.softmax(teacher(x) / 2, 1), reduction="batchmean")
    mixed = train_on_own_paths(model, x, y, teacher=teacher, distill=0.25, temperature=2.0)
    assert mixed.item() == pytest.approx((0.75 * F.cross_entropy(logits, y) + 0.25 * 4 * kl).item(), rel=1e-4)
    only_teacher = [train_on_own_paths(model, x, labels, teacher=teacher, distill=1.0).item()
                    for labels in (y, (y + 1) % 10)]
    assert only_teacher[0] == pytest.approx(only_teacher[1])  # labels no longer matter


def test_s1_distillation_pulls_the_student_towards_its_teacher(image_dir, tmp_path):
    from gating.backbones import ArchSpec, build_backbone
    from tests.conftest import randomize_bn
    from training.backbone import distillation, load_split
    from training.data import normalize

    start = train_backbone(_tiny_s1(image_dir, epochs=1), tmp_path / "start")
    torch.manual_seed(7)  # a teacher that disagrees with the labels: random weights
    t = randomize_bn(build_backbone(ArchSpec("resnet20", num_classes=len(CLASSES))), 7).eval()
    teacher = tmp_path / "teacher.safetensors"
    GatedModel(t, card=GatedModel.load(start).card).save(teacher)
    train, _ = load_split(_tiny_s1(image_dir))
    x = normalize(train.images)

    def gap(path):
        with torch.no_grad():
            return distillation(GatedModel.load(path).backbone.eval()(x), t, x, 4.0).item()

    common = dict(init=str(start), epochs=3, lr=0.01, warmup_epochs=0.0)
    plain = train_backbone(_tiny_s1(image_dir, **common), tmp_path / "plain")
    taught = train_backbone(_tiny_s1(image_dir, teacher=str(teacher), distill=1.0, **common), tmp_path / "taught")
    assert gap(taught) < 0.5 * gap(plain)
    with torch.no_grad():
        assert distillation(t(x), t, x, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="distill must be in \\[0, 1\\]"):
        train_backbone(_tiny_s1(image_dir, teacher=str(teacher), distill=1.5), tmp_path / "bad")


@pytest.mark.parametrize("fields", [{}, {"schedule": "constant", "average_from": 0}], ids=["cosine", "weight-averaging"])
def test_killed_finetune_resumes_to_the_same_weights(image_dir, gated_checkpoint, tmp_path, monkeypatch, fields):
    import training.finetune as finetune_stage
    from training.finetune import FinetuneConfig, finetune

    train, _ = split_train_val(load_image_folder(image_dir), val_fraction=0.25, seed=0)
    path = gated_checkpoint
    cfg = FinetuneConfig(epochs=2, batch_size=16, distill=0.5, recalibration_images=45, **fields)
    reference = finetune(GatedModel.load(path), train, cfg, tmp_path / "straight")

    with pytest.raises(KeyboardInterrupt), killed_mid_epoch_two(monkeypatch, finetune_stage):
        finetune(GatedModel.load(path), train, cfg, tmp_path / "killed")
    resumed = finetune(GatedModel.load(path), train, cfg, tmp_path / "killed")
    a, b = reference.backbone.state_dict(), resumed.backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stem.0.weight"], GatedModel.load(path).backbone.state_dict()["stem.0.weight"])


def test_s5_weight_averaging_ships_the_mean_of_the_epochs_weights(image_dir, gated_checkpoint, tmp_path):
    from training.finetune import FinetuneConfig, check_config, finetune

    train, _ = split_train_val(load_image_folder(image_dir), val_fraction=0.25, seed=0)
    cfg = FinetuneConfig(batch_size=16, recalibration_images=45, schedule="constant")  # epoch 1 the same in both
    after = [finetune(GatedModel.load(gated_checkpoint), train, dataclasses.replace(cfg, epochs=e), tmp_path / f"e{e}")
             .backbone.state_dict() for e in (1, 2)]
    got = finetune(GatedModel.load(gated_checkpoint), train, dataclasses.replace(cfg, epochs=2, average_from=0),
                   tmp_path / "swa").backbone.state_dict()
    stats = [name for name in got if name.endswith(("running_mean", "running_var"))]
    # recalibrated for the averaged weights (a unit no image runs keeps its reset statistics in both)
    assert sum(not torch.allclose(got[name], after[1][name]) for name in stats) > len(stats) // 2
    for name, value in got.items():
        if value.is_floating_point() and name not in stats:
            assert torch.allclose(value, (after[0][name] + after[1][name]) / 2, atol=1e-6), name
    for fields, match in [({"average_from": 2}, "average_from must be an epoch in \\[0, 2\\)"),
                          ({"schedule": "step"}, "schedule must be 'cosine' or 'constant'")]:
        with pytest.raises(ValueError, match=match):
            check_config(dataclasses.replace(cfg, epochs=2, **fields))


def _toy_loop_run(run_dir, *, epochs=4, average_from=None, restarts=(), die_at_step=None):
    """A linear model fitted through the shared loop (3 steps an epoch); returns what the run saw."""
    from training.loop import Loop, train_epochs
    from training.run import RunDir

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = {"steps": [], "fresh_momentum": [], "after_epoch": [], "averaged": []}

    def schedule(step):
        seen["steps"].append(step)
        return {"lr": 0.05 / (1 + step)}

    def batch(idx, g):
        if len(seen["steps"]) == die_at_step:
            raise KeyboardInterrupt("killed")
        seen["fresh_momentum"].append(len(opt.state) == 0)
        noise = 0.1 * torch.randn(len(idx), 1, generator=g)  # from the epoch's generator, as augmentation is
        out = model(x[idx])
        return F.mse_loss(out, y[idx] + noise), {"small": (out - y[idx]).abs().lt(1).sum()}

    def end_of_epoch(epoch, average):
        seen["after_epoch"].append({k: v.clone() for k, v in model.state_dict().items()})
        seen["averaged"].append(average is not None)
        return {"lr": opt.param_groups[0]["lr"]}

    loop = Loop(name="toy", epochs=epochs, batch_size=16, seed=3, state_key="model", average_from=average_from,
                restarts=restarts)
    seen["average"] = train_epochs(loop, RunDir(run_dir, "toy"), model, opt, len(x), batch=batch, schedule=schedule,
                                   end_of_epoch=end_of_epoch)
    seen["model"] = model
    return seen


def test_the_shared_loop_resumes_a_killed_run_to_the_same_weights_average_and_schedule(tmp_path):
    straight = _toy_loop_run(tmp_path / "straight", average_from=1, restarts=(2,))
    with pytest.raises(KeyboardInterrupt):  # killed at the second step of epoch 2: epochs 0 and 1 saved
        _toy_loop_run(tmp_path / "killed", average_from=1, restarts=(2,), die_at_step=8)
    resumed = _toy_loop_run(tmp_path / "killed", average_from=1, restarts=(2,))
    assert resumed["steps"] == list(range(6, 12)), "the schedule goes on at the saved epoch's first step"
    assert torch.equal(straight["model"].weight, resumed["model"].weight)
    assert torch.equal(straight["average"].module.weight, resumed["average"].module.weight)
    assert straight["fresh_momentum"] == [True, False, False, False, False, False, True, False, False, False, False, False]
    assert resumed["fresh_momentum"][:4] == [True, False, False, False]  # the restart at epoch 2 clears the momentum
    lines = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3] and [list(r) for r in lines] == [list(r) for r in reference]
    assert list(lines[0]) == ["stage", "epoch", "train_loss", "small", "lr", "seconds"]
    assert [{k: r[k] for k in ("train_loss", "small", "lr")} for r in lines] == \
        [{k: r[k] for k in ("train_loss", "small", "lr")} for r in reference]
    assert all(0 <= r["small"] <= 1 for r in lines)  # a sum over the epoch's images, divided by their count


def test_the_shared_loop_averages_the_weights_from_average_from_on(tmp_path):
    from training.run import RunDir

    run = _toy_loop_run(tmp_path, epochs=4, average_from=2)
    assert run["averaged"] == [False, False, True, True]
    mean = (run["after_epoch"][2]["weight"] + run["after_epoch"][3]["weight"]) / 2
    assert torch.allclose(run["average"].module.weight, mean, atol=1e-7)
    assert int(run["average"].n_averaged) == 2
    state = RunDir(tmp_path, "toy").load_state()
    assert state["epoch"] == 4 and set(state) == {"model", "optimizer", "epoch", "average"}
    assert _toy_loop_run(tmp_path / "off", epochs=2)["average"] is None


def test_one_cycle_is_torchs_onecycle_lr_step_for_step():
    from training.gate import one_cycle

    for total in (1, 3, 11, 57):
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total, pct_start=0.1)
        for step in range(total):
            assert one_cycle(step, total, 2e-3) == {"lr": opt.param_groups[0]["lr"], "betas": opt.param_groups[0]["betas"]}
            opt.step()
            sched.step()
    assert one_cycle(0, 10, 2e-3) == {"lr": 2e-3, "betas": (0.85, 0.999)}  # no rise (OneCycleLR divides by zero)


def test_killed_gate_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import training.gate as gate_stage
    from training.run import RunError

    backbone = make_backbone("resnet20")
    train, imp = _synthetic_gate_task(40, backbone.num_units, seed=0)
    cfg = GateConfig(kind="mlp", epochs=3, batch_size=16)
    straight = train_gate(GatedModel(copy.deepcopy(backbone)), train, imp, cfg, tmp_path / "straight").gate
    real, calls = gate_stage.objective_loss, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the second step of epoch 1
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(gate_stage, "objective_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train_gate(GatedModel(copy.deepcopy(backbone)), train, imp, cfg, tmp_path / "killed")
    monkeypatch.setattr(gate_stage, "objective_loss", real)
    resumed = train_gate(GatedModel(copy.deepcopy(backbone)), train, imp, cfg, tmp_path / "killed").gate
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] and all(set(r) == {"stage", "epoch", "loss", "seconds"}
                                                              for r in records)


@pytest.mark.parametrize("policy", ["threshold", "softmax"])
def test_a_flops_target_sets_the_served_knob_to_spend_it_on_training_images(image_dir, gated_checkpoint, tmp_path,
                                                                            policy):
    from training.data import normalize
    from training.finetune import FinetuneConfig, finetune, served_policy

    train, _ = split_train_val(load_image_folder(image_dir), val_fraction=0.25, seed=0)
    cfg = FinetuneConfig(policy=policy, flops_target=0.7, epochs=0, recalibration_images=40)
    model = GatedModel.load(gated_checkpoint)
    rule = served_policy(model, train, cfg)
    assert rule.name == policy
    with torch.no_grad():
        out = model(normalize(train.images, model.card.mean, model.card.std), rule)
    spent = float(out.flops.mean()) / model.flops.full  # gate counted
    unit = max(model.flops.saving()) / model.flops.full / len(train)  # one (image, unit) more or less
    assert 0.7 - 2 * unit < spent <= 0.7 + 1e-9
    assert not out.keep.all() and out.keep.any()
    # S5 serves that knob, set before it trains (epochs=0: recalibration only)
    tuned = finetune(GatedModel.load(gated_checkpoint), train, cfg, tmp_path / "run")
    assert tuned.policy.to_dict() == rule.to_dict()
    with pytest.raises(ValueError, match="flops_target must be in \\(0, 1\\]"):
        finetune(GatedModel.load(gated_checkpoint), train, dataclasses.replace(cfg, flops_target=0.0), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_s5_serves_the_checkpoints_own_rule_unless_told_another_with_its_knob(image_dir, gated_checkpoint):
    from training.finetune import FinetuneConfig, served_policy

    train, _ = split_train_val(load_image_folder(image_dir), val_fraction=0.25, seed=0)
    model = GatedModel.load(gated_checkpoint)  # served with budget 0.5
    assert served_policy(model, train, FinetuneConfig()).to_dict() == {"name": "budget", "knob": 0.5}
    assert served_policy(model, train, FinetuneConfig(knob=0.7)).to_dict() == {"name": "budget", "knob": 0.7}
    assert served_policy(model, train, FinetuneConfig(policy="threshold", knob=-0.1)).knob == -0.1
    with pytest.raises(ValueError, match="policy 'threshold' needs a knob or a flops_target"):
        served_policy(model, train, FinetuneConfig(policy="threshold"))
    with pytest.raises(ValueError, match="not of 'budget'"):
        served_policy(model, train, FinetuneConfig(flops_target=0.6))  # the checkpoint's rule is budget
    with pytest.raises(ValueError, match="budget must be in"):
        served_policy(model, train, FinetuneConfig(knob=1.5))
    with pytest.raises(ValueError, match="policy 'full' runs every unit"):
        served_policy(model, train, FinetuneConfig(policy="full"))


@pytest.mark.parametrize("cutout_size", [0, 8])
def test_recalibration_estimates_bn_statistics_on_augmented_images(image_dir, gated_checkpoint, cutout_size):
    from training.data import augment, normalize
    from training.finetune import recalibrate_bn

    train, _ = split_train_val(load_image_folder(image_dir), val_fraction=0.25, seed=0)
    model = GatedModel.load(gated_checkpoint)
    recalibrate_bn(model, train, images=40, batch_size=40, seed=3, cutout_size=cutout_size)
    assert not model.training and model.backbone.stem[1].momentum == 0.1

    stem = GatedModel.load(gated_checkpoint).backbone.stem[0]  # the stem conv, before its BN

    def stem_mean(x):
        with torch.no_grad():
            return stem(x).mean((0, 2, 3))

    g = torch.Generator().manual_seed(3)  # the draws recalibrate_bn makes: order, crops and flips, squares
    idx = torch.randperm(len(train), generator=g)[:40]
    x = normalize(augment(train.images[idx], g))
    if cutout_size:
        x = cutout(x, cutout_size, g)
    got = model.backbone.stem[1].running_mean
    assert torch.allclose(got, stem_mean(x), atol=1e-4)
    assert not torch.allclose(got, stem_mean(normalize(train.images[idx])), atol=1e-2)  # clean images differ
    # no images: refused, with the statistics left as they were (a reset without data would zero them)
    before = model.backbone.stem[1].running_mean.clone()
    with pytest.raises(ValueError, match="BN recalibration needs images: asked for 0 of"):
        recalibrate_bn(model, train, images=0)
    assert torch.equal(model.backbone.stem[1].running_mean, before)


def test_finetune_with_cutout_trains_and_recalibrates_on_cut_images(image_dir, gated_checkpoint, tmp_path,
                                                                    monkeypatch):
    import training.finetune as finetune_stage
    from training.finetune import FinetuneConfig, finetune

    train, _ = split_train_val(load_image_folder(image_dir), val_fraction=0.25, seed=0)
    cfg = FinetuneConfig(epochs=1, batch_size=16, recalibration_images=40)
    plain = finetune(GatedModel.load(gated_checkpoint), train, cfg, tmp_path / "plain").backbone.state_dict()
    sizes = []

    def spy(x, size, g):
        sizes.append((len(x), size))
        return cutout(x, size, g)

    monkeypatch.setattr(finetune_stage, "cutout", spy)  # S5's training images
    monkeypatch.setattr(backbone_stage, "cutout", spy)  # the recalibration's (BN re-estimation lives with S1)
    cut = finetune(GatedModel.load(gated_checkpoint), train, dataclasses.replace(cfg, cutout=8),
                   tmp_path / "cut").backbone.state_dict()
    assert sum(n for n, _ in sizes) == len(train) + min(40, len(train))  # every training image, then recalibration's
    assert {size for _, size in sizes} == {8}
    assert any(not torch.equal(plain[k], cut[k]) for k in plain if plain[k].is_floating_point())
    with pytest.raises(ValueError, match="cutout is a square's side"):
        finetune(GatedModel.load(gated_checkpoint), train, dataclasses.replace(cfg, cutout=-1), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("device, message", [("tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
                                             ("cuda:0", "has no CUDA device")])
def test_finetune_refuses_a_bad_device_before_any_work(image_dir, gated_checkpoint, tmp_path, device, message):
    from training.finetune import FinetuneConfig, finetune

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    train, _ = split_train_val(load_image_folder(image_dir), val_fraction=0.25, seed=0)
    with pytest.raises(ValueError, match=message):
        finetune(GatedModel.load(gated_checkpoint), train, FinetuneConfig(device=device), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_gate_hyper_parameter_the_gate_does_not_take_fails_clearly(gated_checkpoint, image_dir, tmp_path):
    model = GatedModel.load(gated_checkpoint)
    train, _ = split_train_val(load_image_folder(image_dir), val_fraction=0.25, seed=0)
    imp = torch.zeros(len(train), model.num_units)
    with pytest.raises(ValueError, match="gate hyper .*'depth'.* does not fit a resnet8 gate"):
        train_gate(model, train, imp, GateConfig(hyper={"depth": 3}), tmp_path / "gate")


def test_cutout_zeroes_one_clipped_square_per_image():
    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, 16, torch.Generator().manual_seed(0))
    holes = out[:, 0] == 0  # (B, H, W)
    assert torch.equal(holes[:, None].expand_as(out), out == 0)  # every channel, nothing else changed
    rows, cols = holes.any(2), holes.any(1)  # (B, H), (B, W)
    assert torch.equal(holes.sum((1, 2)), rows.sum(1) * cols.sum(1))  # a rectangle: rows x cols
    assert (rows.sum(1) <= 16).all() and (rows.sum(1) >= 8).all() and (cols.sum(1) >= 8).all()
    assert (rows.sum(1) < 16).any()  # some squares clipped at a border
    assert torch.equal(out, cutout(x, 16, torch.Generator().manual_seed(0)))


def test_s1_with_cutout_trains_on_other_inputs(image_dir, tmp_path):
    cfg = BackboneConfig(arch="resnet20", data=str(image_dir), epochs=1, batch_size=32, compile=False)
    plain = GatedModel.load(train_backbone(cfg, tmp_path / "plain")).backbone.state_dict()
    cut = GatedModel.load(train_backbone(dataclasses.replace(cfg, cutout=8), tmp_path / "cut")).backbone.state_dict()
    assert set(plain) == set(cut)
    assert any(not torch.equal(plain[k], cut[k]) for k in plain if plain[k].is_floating_point())


def test_magnitude_retraining_holds_the_zeros(image_dir, tmp_path):
    from training.pruning.run import prune_checkpoint

    from dataclasses import replace

    s1 = train_backbone(replace(_tiny_s1(image_dir), epochs=1), tmp_path / "s1")
    report = prune_checkpoint("magnitude", 0.6, str(s1), str(image_dir), str(tmp_path / "m.safetensors"),
                              finetune_epochs=3, sample_images=32)
    assert report["retrain_steps"] == 3 and "top1_after_finetune" in report
    pruned = GatedModel.load(tmp_path / "m.safetensors").backbone
    weights = [p for p in pruned.parameters() if p.ndim > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.02), "retraining kept the pruned weights at zero"
    original = GatedModel.load(s1).backbone
    assert not torch.equal(pruned.units[0].conv1.weight, original.units[0].conv1.weight), "the rest was retrained"
    with pytest.raises(ValueError, match="keep_zeros needs init"):
        train_backbone(_tiny_s1(image_dir, keep_zeros=True), tmp_path / "bad")


def test_amp_setting_accepts_yaml_on_off_and_refuses_others():
    import yaml

    from training.run import use_bf16

    cpu = torch.device("cpu")
    assert use_bf16(cpu, yaml.safe_load("off")) is False  # YAML 1.1: a bare off is the boolean False
    assert use_bf16(cpu, yaml.safe_load("on")) is True
    assert use_bf16(cpu, "off") is False
    with pytest.raises(ValueError, match="amp must be 'auto', 'on' or 'off', not 'bf16'"):
        use_bf16(cpu, "bf16")


def test_stochastic_depth_runs_each_image_on_its_drawn_path():
    from training.backbone import draw_paths

    backbone = make_backbone("resnet20").eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = execute(backbone, x, draw_paths(8, backbone.num_units, 0.6, torch.Generator().manual_seed(5)),
                      execution="mask")
        n = backbone.num_units  # the same draw, replayed through the executor
        drops = torch.rand(8, n, generator=torch.Generator().manual_seed(5)) < 0.6 * torch.arange(1, n + 1) / n
        assert drops.any() and not drops.all()
        assert torch.allclose(out, execute(backbone, x, ~drops), atol=1e-5)
        everything = draw_paths(8, n, 0.0, torch.Generator())
        assert torch.allclose(execute(backbone, x, everything, execution="mask"), backbone(x), atol=1e-6)


def test_stochastic_depth_traces_as_one_graph_for_torch_compile():
    from training.backbone import draw_paths

    backbone = make_backbone("resnet20").eval()
    x, n = torch.randn(4, 3, 32, 32), backbone.num_units
    keep = draw_paths(4, n, 0.6, torch.Generator().manual_seed(1))
    assert keep.any() and not keep.all()
    traced = torch.compile(lambda x, keep: execute(backbone, x, keep, execution="mask"), backend="eager",
                           fullgraph=True)
    with torch.no_grad():  # fullgraph: a graph break (a mask read back as Python values) raises
        assert torch.allclose(traced(x, keep), execute(backbone, x, keep), atol=1e-5)


def test_stochastic_depth_trains_under_torch_compile(image_dir, tmp_path, monkeypatch):
    traced = []
    compile_ = torch.compile

    def one_graph(fn, mode=None):  # the eager backend: traced whole (fullgraph), without codegen's minute
        traced.append(fn)
        return compile_(fn, backend="eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", one_graph)
    out = train_backbone(_tiny_s1(image_dir, epochs=1, compile=True, drop_units=0.3), tmp_path)
    assert len(traced) == 1 and traced[0].__name__ == "paths_forward" and GatedModel.load(out).num_units == 9


@pytest.mark.parametrize("fields,match", [({"drop_units": 1.0}, "drop_units must be in"),
                                          ({"compile_mode": "fast"}, "compile_mode must be one of"),
                                          ({"cutout": -1}, "cutout is a square's side"),
                                          ({"average_from": 1}, "average_from must be an epoch in \\[0, 1\\)"),
                                          ({"average_from": 0, "average_bn_images": 0}, "average_bn_images >= 1")])
def test_bad_backbone_settings_fail_before_training(tmp_path, image_dir, fields, match):
    with pytest.raises(ValueError, match=match):
        train_backbone(BackboneConfig(arch="resnet20", data=str(image_dir), epochs=1, **fields), tmp_path / "s1")
