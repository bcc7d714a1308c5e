"""Inference-time folding of BatchNorm into the preceding convolution.

``torch.nn.utils.fusion.fuse_conv_bn_eval`` turns each conv + BN pair into one conv
with a bias, so an executed unit runs two convolutions and two ReLUs instead of
also two BN passes over its activations. FLOPs as counted by ``flop_counter`` do not
change (bias adds are element-wise); time does, most at batch 1. A fused model is
for inference only: it has no BN left to train or recalibrate.
"""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from gating.backbones import CifarBasicBlock, TorchvisionUnit


def _fuse_pair(owner: nn.Module, conv_name: str, bn_name: str) -> None:
    conv, bn = owner.get_submodule(conv_name), owner.get_submodule(bn_name)
    owner.register_module(conv_name, fuse_conv_bn_eval(conv, bn))
    owner.register_module(bn_name, nn.Identity())


def _fuse_sequential(seq: nn.Sequential) -> None:
    mods = list(seq)
    for i in range(len(mods) - 1):
        if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
            seq[i] = fuse_conv_bn_eval(mods[i], mods[i + 1])
            seq[i + 1] = nn.Identity()


def fuse_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (backbone or gate) with every conv + BN pair folded; the original is untouched."""
    fused = copy.deepcopy(module).eval()
    for m in list(fused.modules()):
        if isinstance(m, nn.Sequential):
            _fuse_sequential(m)
        elif isinstance(m, CifarBasicBlock):
            _fuse_pair(m, "conv1", "bn1")
            _fuse_pair(m, "conv2", "bn2")
        elif isinstance(m, TorchvisionUnit):
            block = m.block
            for i in (1, 2, 3):
                if hasattr(block, f"conv{i}"):
                    _fuse_pair(block, f"conv{i}", f"bn{i}")
    leftover = [name for name, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if leftover:
        raise TypeError(f"no BN folding rule for {leftover[:3]}")
    return fused
