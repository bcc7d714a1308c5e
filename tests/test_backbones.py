import pytest
import torch
import torch.nn.functional as F

from gating.backbones import BACKBONES, ArchSpec, build_backbone
from gating.registry import Registry
from tests.conftest import make_backbone

# Published parameter counts (He et al. 2016, Table 6): ResNet-20 0.27M, -32 0.46M, -56 0.85M, -110 1.7M.
PUBLISHED_PARAMS_M = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7}
UNITS = {"resnet20": 9, "resnet32": 15, "resnet44": 21, "resnet56": 27, "resnet110": 54,
         "resnet18": 8, "resnet34": 16, "resnet50": 16}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_is_a_list_of_units(name):
    b = build_backbone(name)
    assert b.num_units == UNITS[name]
    if name in PUBLISHED_PARAMS_M:
        params = sum(p.numel() for p in b.parameters()) / 1e6
        assert params == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.02)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_cifar_units_start_with_their_residual_on(name):
    """Training starts from the full network, not from the shortcuts: zero-initialised last BNs
    trained ResNet-20 to 0.7294 in 12 epochs, the same command without them to 0.7834."""
    torch.manual_seed(0)
    b = build_backbone(name).train()
    with torch.no_grad():
        inputs, _ = b.unit_inputs(torch.randn(8, 3, 32, 32))
        for unit, h in zip(b.units, inputs):
            assert unit.residual(h).abs().mean() > 0.1  # (B, C, H, W) batch-normalised, BN weight 1


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50"])
def test_unit_contract(name):
    b = make_backbone(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        inputs, _ = b.unit_inputs(x)
        for unit, h in zip(b.units, inputs):
            assert (h >= 0).all(), "a unit's input is a ReLU output"
            assert torch.allclose(unit(h), F.relu(unit.shortcut(h) + unit.residual(h)))
            assert torch.allclose(unit.skip(h), F.relu(unit.shortcut(h)))
            assert unit.skip(h).shape == unit(h).shape


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_adapter_matches_torchvision(name):
    import torchvision.models as tvm

    torch.manual_seed(0)
    reference = {"resnet18": tvm.resnet18, "resnet50": tvm.resnet50}[name](weights=None, num_classes=10)
    reference = reference.eval()
    b = build_backbone(name).eval()
    b.load_state_dict({k: v for k, v in _adapted_state(reference).items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(b(x), reference(x), atol=1e-5)


def _adapted_state(ref):
    """torchvision keys -> adapter keys (stem.0 = conv1, units.i.block = layerK.j, head.2 = fc)."""
    out, i = {}, 0
    for k, v in ref.state_dict().items():
        if k.startswith("conv1."):
            out["stem.0." + k[6:]] = v
        elif k.startswith("bn1."):
            out["stem.1." + k[4:]] = v
        elif k.startswith("fc."):
            out["head.2." + k[3:]] = v
    blocks = [blk for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4) for blk in layer]
    for i, blk in enumerate(blocks):
        for k, v in blk.state_dict().items():
            out[f"units.{i}.block.{k}"] = v
    return out


def test_inner_widths_shrink_units_and_keep_shapes():
    spec = ArchSpec("resnet20", inner_widths=(4, 8, 16, 8, 8, 8, 16, 16, 16))
    b = build_backbone(spec)
    assert b.units[0].conv1.out_channels == 4
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="inner_widths"):
        build_backbone(ArchSpec("resnet20", inner_widths=(4, 8)))
    with pytest.raises(ValueError, match="only supported for CIFAR"):
        build_backbone(ArchSpec("resnet18", inner_widths=(4,) * 8))


def test_registry_refuses_duplicates_and_names_the_known():
    r: Registry = Registry("thing")
    r.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        r.register("a")(2)
    with pytest.raises(KeyError, match="known: a"):
        r.get("b")
    with pytest.raises(ValueError, match="already registered"):
        BACKBONES.register("resnet20")(lambda spec: None)
