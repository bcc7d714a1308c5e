import tarfile

import pytest
import torch
from torch import nn

from gating.backbones import build_backbone


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial affine weights and running stats, so residuals are not zero."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean = torch.randn(c, generator=g) * 0.1
            m.running_var = torch.rand(c, generator=g) + 0.5
    return module



@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def make_backbone(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_bn(build_backbone(name), seed).eval()


CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """train/<class>/*.jpg with class-dependent colour, 20 images a class."""
    from torchvision.io import encode_jpeg

    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        d = root / "train" / name
        d.mkdir(parents=True)
        for i in range(20):
            img = torch.randint(0, 60, (3, 32, 32), generator=g, dtype=torch.uint8)
            img[c] += 150
            (d / f"{i:03d}.jpg").write_bytes(encode_jpeg(img, quality=95).numpy().tobytes())
    return root


@pytest.fixture(scope="session")
def image_tar(image_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tar") / "tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(image_dir / "train", arcname="train")
    return path




@pytest.fixture(scope="session")
def gated_checkpoint(tmp_path_factory):
    """A tiny gated model (ResNet-20 + ResNet-8 gate, budget 0.5) over CLASSES, saved once."""
    from gating.checkpoint import ModelCard
    from gating.gates import build_gate
    from gating.model import GatedModel
    from gating.policies import make_policy

    torch.manual_seed(0)
    backbone = randomize_bn(build_backbone("resnet20", num_classes=len(CLASSES)))
    gate = build_gate("resnet8", backbone)
    card = ModelCard(arch=backbone.spec.to_dict(), class_names=CLASSES, input_size=(3, 32, 32),
                     mean=(0.45, 0.45, 0.45), std=(0.25, 0.25, 0.25))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    GatedModel(backbone, gate, make_policy("budget", 0.5), card).save(path)
    return path
