"""The executor really skips, and gives the masked reference's numbers, for every gate and policy."""
import pytest
import torch

from gating.executor import execute
from gating.flops import count_flops
from gating.gates import GATES, build_gate
from gating.model import GatedModel
from gating.policies import POLICIES, make_policy
from tests.conftest import make_backbone, randomize_bn

ARCHS = {"resnet20": (3, 32, 32), "resnet18": (3, 32, 32)}  # resnet18 at 32x32 keeps CI fast


def knob_for(policy: str, scores: torch.Tensor, n: int):
    """A knob that splits decisions (some units kept, some skipped) for these scores."""
    if policy == "full":
        return None
    if policy == "greedy":
        return n // 2
    if policy == "threshold":
        return float((-scores).median())
    if policy == "softmax":
        return float(torch.softmax(-scores.double(), 1).median())
    return 0.6  # budget


def gated_model(arch: str, kind: str, seed: int = 0) -> GatedModel:
    backbone = make_backbone(arch, seed)
    torch.manual_seed(seed + 1)
    gate = randomize_bn(build_gate(kind, backbone), seed).eval()
    with torch.no_grad():  # spread the scores so rules see distinct values
        for p in gate.parameters():
            p.mul_(3.0)
    return GatedModel(backbone, gate).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", GATES.names())
@pytest.mark.parametrize("policy", POLICIES.names())
@pytest.mark.parametrize("batch", [1, 6])
def test_skip_equals_masked_reference(arch, kind, policy, batch):
    model = gated_model(arch, kind)
    x = torch.randn(batch, *ARCHS[arch], generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        probe = model(x, policy=make_policy("threshold", 0.0))
        pol = make_policy(policy, knob_for(policy, probe.scores, model.num_units))
        out = model(x, policy=pol)
        ref = model(x, policy=pol, execution="mask")
    assert torch.equal(out.keep, ref.keep)
    assert torch.allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    if policy != "full":
        assert (~out.keep).any(), "the knob should make the rule skip something"


@pytest.mark.parametrize("kind", GATES.names())
@pytest.mark.parametrize("policy", POLICIES.names())
def test_decide_gives_the_forward_decisions_and_runs_the_backbone_only_when_needed(kind, policy):
    model = gated_model("resnet20", kind).train()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probe = model(x, policy=make_policy("threshold", 0.0))
    pol = make_policy(policy, knob_for(policy, probe.scores, model.num_units))
    calls = []
    hook = model.backbone.stem.register_forward_hook(lambda *_: calls.append(1))
    keep = model.decide(x, pol)
    hook.remove()
    assert model.backbone.training and model.gate.training, "decide restores the modes it found"
    assert keep.dtype == torch.bool and not keep.requires_grad
    with torch.no_grad():
        assert torch.equal(keep, model.eval()(x, policy=pol).keep)
    assert bool(calls) == (pol.needs_scores and not model.gate.upfront), "only an inline gate needs the backbone"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_mixed_batch_every_image_its_own_path(arch):
    backbone = make_backbone(arch)
    n = backbone.num_units
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(8, n, generator=g) < 0.5
    keep[0], keep[1] = True, False  # one image runs everything, one nothing
    assert len({tuple(r) for r in keep.tolist()}) == 8
    x = torch.randn(8, *ARCHS[arch], generator=g)
    with torch.no_grad():
        batched = execute(backbone, x, keep)
        assert torch.allclose(batched, execute(backbone, x, keep, execution="mask"), rtol=1e-4, atol=1e-5)
        one_by_one = torch.cat([execute(backbone, x[i:i + 1], keep[i:i + 1]) for i in range(8)])
        assert torch.allclose(batched, one_by_one, rtol=1e-4, atol=1e-5)
        assert torch.allclose(batched[:1], backbone(x[:1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_policy_full_is_the_plain_backbone_exactly(arch):
    model = gated_model(arch, "resnet8")
    x = torch.randn(3, *ARCHS[arch])
    with torch.no_grad():
        out = model(x, policy=make_policy("full"))
        assert torch.equal(out.logits, model.backbone(x))
        assert out.keep.all()
        all_kept = execute(model.backbone, x, torch.ones(3, model.num_units, dtype=torch.bool))
        assert torch.equal(all_kept, model.backbone(x))


def test_skipped_units_do_no_work():
    """Count the images each unit's first conv actually sees: exactly those that keep the unit."""
    backbone = make_backbone("resnet20")
    seen = [0] * backbone.num_units
    for i, unit in enumerate(backbone.units):
        unit.conv1.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, seen[i] + inp[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(8, backbone.num_units, generator=g) < 0.5
    keep[:, 0] = False  # a unit nobody keeps
    keep[:, 1] = True  # a unit everybody keeps
    with torch.no_grad():
        execute(backbone, torch.randn(8, 3, 32, 32), keep)
    assert seen == keep.sum(0).tolist()
    seen[:] = [0] * backbone.num_units
    with torch.no_grad():
        execute(backbone, torch.randn(8, 3, 32, 32), keep, execution="mask")
    assert seen == [8] * backbone.num_units, "masked execution computes everything (what peers do)"


def test_skip_execution_trains_through_each_images_path():
    backbone = make_backbone("resnet20").train()
    keep = torch.rand(4, backbone.num_units, generator=torch.Generator().manual_seed(1)) < 0.5
    keep[:, 2] = False
    logits = execute(backbone, torch.randn(4, 3, 32, 32), keep)
    logits.sum().backward()
    assert backbone.units[2].conv1.weight.grad is None, "a unit no image kept gets no gradient"
    kept_unit = int(keep.sum(0).argmax())
    assert backbone.units[kept_unit].conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["resnet20", "resnet56", "resnet18"])
def test_flops_full_equals_flop_counter_of_plain_backbone(arch):
    model = GatedModel(make_backbone(arch))
    x = torch.zeros(1, *model.backbone.input_size)
    assert model.flops.full == count_flops(lambda: model.backbone(x))
    out = model(x)
    assert out.flops.item() == model.flops.full


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("arch", ["resnet20", "resnet18"])
def test_executed_flops_match_counter_on_the_gated_run(arch, batch):
    model = GatedModel(make_backbone(arch))
    x = torch.zeros(batch, *model.backbone.input_size)
    keep = torch.rand(batch, model.num_units, generator=torch.Generator().manual_seed(3)) < 0.5
    if batch > 1:  # every unit kept by one image and skipped by another: each runs on a subset
        keep[0], keep[1] = True, False
    counted = count_flops(lambda: execute(model.backbone, x, keep))
    assert model.flops.executed(keep).sum().item() == counted


@pytest.mark.parametrize("kind,limit", [("resnet8", 0.05), ("lstm", 0.01), ("mlp", 0.01)])
def test_gate_flops_are_counted_and_small_on_resnet56(kind, limit):
    backbone = make_backbone("resnet56")
    model = GatedModel(backbone, build_gate(kind, backbone).eval(), make_policy("threshold", 0.0))
    assert 0 < model.gate_flops <= limit * model.flops.full
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.allclose(out.flops, model.flops.executed(out.keep) + model.gate_flops)


def test_two_pass_rules_on_inline_gates_report_their_cost():
    model = gated_model("resnet20", "mlp")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        one = model(x, policy=make_policy("threshold", 0.0))
        two = model(x, policy=make_policy("greedy", 3))
    assert one.passes == 1 and two.passes == 2
    assert torch.allclose(two.flops, model.flops.executed(two.keep) + model.gate_flops + model.flops.full)


def test_policy_needing_a_gate_is_refused_without_one():
    model = GatedModel(make_backbone("resnet20"))
    with pytest.raises(ValueError, match="needs a gate"):
        model(torch.randn(1, 3, 32, 32), policy=make_policy("threshold", 0.0))
    with pytest.raises(ValueError, match=r"keep must be \(batch, units\)"):
        execute(model.backbone, torch.randn(2, 3, 32, 32), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "resnet50"])
@pytest.mark.parametrize("kind", GATES.names())
def test_inference_copy_with_folded_bn_gives_same_outputs_and_flops(arch, kind):
    model = gated_model(arch, kind)
    model.policy = make_policy("budget", 0.6)
    fast = model.for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert fast.flops == model.flops and fast.gate_flops == model.gate_flops
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), fast(x)
    assert torch.equal(a.keep, b.keep)
    assert torch.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="folded"):
        fast.save("unused.safetensors")


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_learned_shortcut_runs_once_per_image(grad, channels_last):
    """torchvision's down-sampling units (1x1 conv + BN shortcut): the images that keep the unit run
    the shortcut inside it, the others alone, and the numbers are the masked reference's."""
    from gating.executor import mask_unit, run_unit

    backbone = randomize_bn(make_backbone("resnet18")).eval()
    unit = next(u for u in backbone.units if u.learned_shortcut)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unit = unit.to(memory_format=fmt)
    seen = []
    unit.block.downsample.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    x = torch.relu(torch.randn(5, unit.in_channels, 8, 8)).contiguous(memory_format=fmt).requires_grad_(grad)
    keep = [True, False, True, True, False]
    with torch.set_grad_enabled(grad):
        out = run_unit(unit, x, keep)
        assert sorted(seen) == [2, 3]  # 3 images through the unit, 2 through the shortcut alone
        reference = mask_unit(unit, x, torch.tensor(keep))
    assert out.is_contiguous(memory_format=fmt)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5)
    if grad:
        (g_out,) = torch.autograd.grad(out.sum(), x)
        (g_ref,) = torch.autograd.grad(reference.sum(), x)
        assert torch.allclose(g_out, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_channels_last_units_keep_their_layout_and_their_numbers(grad):
    from gating.executor import run_unit

    backbone = randomize_bn(make_backbone("resnet20")).eval()
    unit = backbone.units[3]  # the first down-sampling unit: a shortcut that pads channels
    x = torch.relu(torch.randn(5, unit.in_channels, 32, 32))
    keep = [True, False, True, True, False]
    with torch.set_grad_enabled(grad):
        reference = run_unit(unit, x.clone(), keep)
        unit_cl = unit.to(memory_format=torch.channels_last)
        out = run_unit(unit_cl, x.clone().contiguous(memory_format=torch.channels_last), keep)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_decide_and_gate_flops_leave_every_module_in_its_own_mode():
    backbone = make_backbone("resnet20").train()
    backbone.units[0].eval()  # a part the caller froze
    modes = {n: m.training for n, m in backbone.named_modules()}
    model = GatedModel(backbone, build_gate("mlp", backbone).train(), make_policy("threshold", 0.0))  # inline gate
    assert {n: m.training for n, m in backbone.named_modules()} == modes  # counting the gate's FLOPs ran the backbone
    model.training = True
    before = {n: m.training for n, m in model.named_modules()}
    model.decide(torch.randn(2, 3, 32, 32))
    assert {n: m.training for n, m in model.named_modules()} == before


def test_a_double_precision_backbone_is_profiled_in_its_own_dtype():
    assert GatedModel(make_backbone("resnet20").double()).flops == GatedModel(make_backbone("resnet20")).flops


def test_masked_execution_of_an_empty_batch():
    backbone = make_backbone("resnet20").eval()
    keep = torch.zeros(0, backbone.num_units, dtype=torch.bool)
    with torch.no_grad():
        assert execute(backbone, torch.zeros(0, 3, 32, 32), keep, execution="mask").shape == (0, 10)


def test_normalize_leaves_a_float_input_alone():
    from gating.preprocess import normalize

    pixels = torch.full((1, 3, 2, 2), 200.0)
    out = normalize(pixels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.all(pixels == 200.0) and torch.allclose(out, torch.full_like(out, (200 / 255 - 0.5) / 0.25))


@pytest.mark.parametrize("policy", ["threshold", "greedy", "softmax"])
def test_a_gate_of_some_units_decides_them_and_runs_every_other_unit(policy):
    backbone = make_backbone("resnet20")
    torch.manual_seed(0)
    gate = randomize_bn(build_gate("resnet8", backbone, units=[3, 7])).eval()
    with torch.no_grad():
        gate.fc.weight.mul_(5.0)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        scores = gate(x)  # (B, n): +inf for the units it does not decide
        assert torch.isinf(scores[:, [0, 1, 2, 4, 5, 6, 8]]).all() and torch.isfinite(scores[:, [3, 7]]).all()
        decided = scores[:, [3, 7]]
        values = (-decided if policy == "threshold" else torch.softmax(-scores.double(), 1)[:, [3, 7]]).flatten().sort().values
        mid = len(values) // 2  # halfway between two values: round-off in the BN-folded gate flips nothing
        knob = 1 if policy == "greedy" else float((values[mid - 1] + values[mid]) / 2)
        model = GatedModel(backbone, gate, make_policy(policy, knob)).eval()
        keep = model.decide(x)
        # what serving runs (BN folded) decides alike
        assert torch.equal(model.for_inference().decide(x.contiguous(memory_format=torch.channels_last)), keep)
    assert keep[:, [0, 1, 2, 4, 5, 6, 8]].all()
    assert not keep[:, [3, 7]].all() and keep[:, [3, 7]].any()
