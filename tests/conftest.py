import os

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
