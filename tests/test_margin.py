"""The margin route: a fixed path (fix-path), then a gate deciding one unit fewer or one more per image."""
import pytest
import torch

from gating.gates import build_gate
from gating.model import GatedModel
from tests.conftest import randomize_bn
from training.data import load_image_folder, normalize
from training.margin import fix_path, margin_gate

SKIP = (1, 4, 7)  # of resnet20's 9 units


def _static(gated_checkpoint) -> GatedModel:
    return fix_path(GatedModel.load(gated_checkpoint), SKIP)


def _trained(gated_checkpoint, seed: int = 1) -> GatedModel:
    model = GatedModel.load(gated_checkpoint)
    torch.manual_seed(seed)
    model.gate = randomize_bn(build_gate("resnet8", model.backbone), seed).eval()
    return model


def _labels(n_images: int, n_units: int) -> torch.Tensor:
    imp = torch.rand(n_images, n_units, generator=torch.Generator().manual_seed(0))
    imp[:, 5] -= 1.0  # the kept unit that costs least to remove
    imp[:, 4] += 1.0  # the skipped unit that gains most when run
    return imp


def test_a_fixed_path_skips_the_same_units_for_every_image(gated_checkpoint):
    model = _static(gated_checkpoint)
    keep = model.decide(torch.randn(16, 3, 32, 32))
    expected = torch.tensor([i not in SKIP for i in range(model.num_units)])
    assert (keep == expected).all()
    out = model(torch.randn(4, 3, 32, 32))
    assert (out.units_executed == model.num_units - len(SKIP)).all()


@pytest.mark.parametrize("skip, message", [((0, 99), r"units \[99\] out of range"),
                                           ((), "skip between 1 and 8"),
                                           (tuple(range(9)), "skip between 1 and 8")])
def test_fix_path_refuses_units_the_backbone_lacks(gated_checkpoint, skip, message):
    with pytest.raises(ValueError, match=message):
        fix_path(GatedModel.load(gated_checkpoint), skip)


@pytest.mark.parametrize("kind", ["lstm", "mlp", "ordered"])
def test_fix_path_needs_an_unordered_resnet8_gate(gated_checkpoint, kind):
    model = GatedModel.load(gated_checkpoint)
    model.gate = build_gate("resnet8", model.backbone, ordered=True) if kind == "ordered" else \
        build_gate(kind, model.backbone)
    with pytest.raises(ValueError, match="unordered resnet8 gate"):
        fix_path(model, SKIP)


def test_the_margin_gate_decides_two_units_per_image_at_the_flops_target(gated_checkpoint, image_dir):
    train = load_image_folder(image_dir)
    static, trained = _static(gated_checkpoint), _trained(gated_checkpoint)
    imp = _labels(len(train), static.num_units)
    saving = static.flops.saving()
    keep = static.decide(torch.zeros(1, 3, 32, 32))[0]
    fixed_ratio = ((static.flops.executed(keep[None])[0] + static.gate_flops) / static.flops.full).item()
    easy, hard = 0.3, 0.4
    target = fixed_ratio + ((hard * saving[4] - easy * saving[5]) / static.flops.full).item()

    model, chosen = margin_gate(static, trained, imp, train, easy=easy, flops_target=target)

    assert (chosen["drop_unit"], chosen["add_unit"]) == (5, 4)
    assert chosen["hard_share"] == pytest.approx(hard, abs=1e-4)
    x = normalize(train.images, static.card.mean, static.card.std)
    out = model(x)
    others = [i for i in range(static.num_units) if i not in (4, 5)]
    assert (out.keep[:, others] == keep[others]).all()  # every other unit as on the fixed path
    assert len({tuple(k.tolist()) for k in out.keep}) <= 4
    n = len(train)
    assert abs((~out.keep[:, 5]).float().mean().item() - easy) <= 1.5 / n
    assert abs(out.keep[:, 4].float().mean().item() - hard) <= 1.5 / n
    step = (saving.max() / static.flops.full).item()
    assert (out.flops / static.flops.full).mean().item() == pytest.approx(target, abs=3 * step / n)
    assert not out.keep[:, 4].all() and out.keep[:, 4].any()  # per image, not one more fixed path
    # the decided units follow the gate's predicted importance: images that run unit 4 score highest on it
    scores = trained.gate(x)
    assert scores[out.keep[:, 4], 4].min() >= scores[~out.keep[:, 4], 4].max()


def test_without_a_flops_target_the_margin_only_drops_a_unit_for_easy_images(gated_checkpoint, image_dir):
    train = load_image_folder(image_dir)
    static, trained = _static(gated_checkpoint), _trained(gated_checkpoint)
    imp = _labels(len(train), static.num_units)
    keep = static.decide(torch.zeros(1, 3, 32, 32))[0]
    easy = 0.25

    model, chosen = margin_gate(static, trained, imp, train, easy=easy, flops_target=None)

    assert (chosen["drop_unit"], chosen["add_unit"], chosen["hard_share"]) == (5, None, 0.0)
    x = normalize(train.images, static.card.mean, static.card.std)
    out = model(x)
    others = [i for i in range(static.num_units) if i != 5]
    assert (out.keep[:, others] == keep[others]).all()  # unit 4 stays skipped: nothing added
    assert len({tuple(k.tolist()) for k in out.keep}) == 2
    assert abs((~out.keep[:, 5]).float().mean().item() - easy) <= 1.5 / len(train)
    # the images that drop unit 5 are those the gate predicts it matters least for
    scores = trained.gate(x)
    assert scores[~out.keep[:, 5], 5].max() <= scores[out.keep[:, 5], 5].min()
    fixed = (static.flops.executed(keep[None])[0] + static.gate_flops).item()
    assert out.flops.mean().item() == pytest.approx(fixed - easy * static.flops.saving()[5].item(), rel=0.02)


def test_the_margin_gate_refuses_what_it_cannot_build(gated_checkpoint, image_dir):
    train = load_image_folder(image_dir)
    static, trained = _static(gated_checkpoint), _trained(gated_checkpoint)
    imp = _labels(len(train), static.num_units)
    with pytest.raises(ValueError, match="hard share of"):
        margin_gate(static, trained, imp, train, easy=0.3, flops_target=0.99)
    with pytest.raises(ValueError, match=r"easy is the share .* in \(0, 1\)"):
        margin_gate(static, trained, imp, train, easy=1.0)
    with pytest.raises(ValueError, match="labels of shape"):
        margin_gate(static, trained, imp[:-1], train)
    with pytest.raises(ValueError, match="does not keep one fixed path"):
        margin_gate(_trained(gated_checkpoint, seed=2), trained, imp, train)


def test_fix_path_and_margin_gate_commands(gated_checkpoint, image_dir, tmp_path, capsys):
    from skipserve.cli import main

    fixed, labels, out = tmp_path / "fixed.safetensors", tmp_path / "labels.safetensors", tmp_path / "m.safetensors"
    assert main(["fix-path", "--checkpoint", str(gated_checkpoint), "--skip", "1,4,7", "--out", str(fixed)]) == 0
    assert main(["label", "--checkpoint", str(fixed), "--on-paths", "--data", str(image_dir),
                 "--out", str(labels)]) == 0
    model = GatedModel.load(fixed)
    keep = model.decide(torch.zeros(1, 3, 32, 32))[0]
    ratio = ((model.flops.executed(keep[None])[0] + model.gate_flops) / model.flops.full).item()
    assert main(["margin-gate", "--checkpoint", str(fixed), "--gate-from", str(gated_checkpoint),
                 "--labels", str(labels), "--data", str(image_dir), "--flops-target", f"{ratio + 0.01:.4f}",
                 "--out", str(out)]) == 0
    assert "skipped for the easiest 0.300 of images" in capsys.readouterr().out
    served = GatedModel.load(out)
    assert served.card.info["stage"] == "margin gate" and served.policy.to_dict()["name"] == "threshold"
    with pytest.raises(SystemExit):
        main(["fix-path", "--checkpoint", str(gated_checkpoint), "--skip", "1,x", "--out", str(fixed)])
