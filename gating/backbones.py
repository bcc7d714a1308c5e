"""Residual backbones seen as an ordered list of residual units.

Every backbone is a ``ResidualBackbone``: ``stem`` -> ``units[0..n-1]`` -> ``head``.
Unit i computes ``relu(shortcut_i(x) + residual_i(x))``; skipped, it computes
``relu(shortcut_i(x))``, so a down-sampling unit still runs its shortcut and
shapes stay valid. The stem and every unit end in a ReLU, so a unit's input is
non-negative and an identity shortcut's ``relu(x)`` is ``x`` itself: skipping
such a unit costs nothing at all.

CIFAR ResNets follow He et al. 2016, section 4.2, with shortcut option A
(identity; down-sampling by stride-2 subsampling and zero-padding the new
channels), so shortcuts carry no parameters and no FLOPs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gating.registry import Registry

BACKBONES: Registry[Callable[..., "ResidualBackbone"]] = Registry("backbone")


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to rebuild a backbone's modules (weights come separately)."""

    name: str  # registered builder, e.g. "resnet32" or "resnet18"
    num_classes: int = 10
    # inner (first conv output) width of each unit; None = the standard widths.
    # Static channel pruning shrinks these and nothing else.
    inner_widths: Optional[tuple[int, ...]] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inner_widths"] = list(self.inner_widths) if self.inner_widths else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpec":
        widths = d.get("inner_widths")
        return cls(name=d["name"], num_classes=int(d["num_classes"]),
                   inner_widths=tuple(int(w) for w in widths) if widths else None)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class ResidualUnit(nn.Module):
    """Base class: subclasses define ``residual`` and ``shortcut``."""

    identity_shortcut: bool = True

    @property
    def in_channels(self) -> int:
        raise NotImplementedError

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        return F.relu(identity + self.residual(x))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity_shortcut:
            return x  # relu(x) == x: the unit's input is the output of a ReLU
        return F.relu(self.shortcut(x))


class CifarBasicBlock(ResidualUnit):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, inner: Optional[int] = None):
        super().__init__()
        inner = planes if inner is None else inner
        self.conv1 = conv3x3(in_planes, inner, stride)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = conv3x3(inner, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes  # option A: zero channels added by the shortcut
        self.identity_shortcut = stride == 1 and self.pad == 0

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity_shortcut:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class TorchvisionUnit(ResidualUnit):
    """Adapter over a torchvision ``BasicBlock`` or ``Bottleneck``; reuses its modules."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.identity_shortcut = block.downsample is None

    @property
    def in_channels(self) -> int:
        return self.block.conv1.in_channels

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        out = b.relu(b.bn1(b.conv1(x)))
        out = b.bn2(b.conv2(out))
        if hasattr(b, "conv3"):  # Bottleneck
            out = b.bn3(b.conv3(b.relu(out)))
        return out

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.block.downsample is None else self.block.downsample(x)


class ResidualBackbone(nn.Module):
    def __init__(self, spec: ArchSpec, stem: nn.Module, units: list[ResidualUnit], head: nn.Module,
                 input_size: tuple[int, int, int]):
        super().__init__()
        self.spec = spec
        self.input_size = input_size  # (C, H, W) the FLOPs profile is taken at
        self.stem = stem
        self.units = nn.ModuleList(units)
        self.head = head

    @property
    def num_units(self) -> int:
        return len(self.units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        x = self.stem(x)
        for unit in self.units:
            x = unit(x)
        return self.head(x)

    def unit_inputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Full forward pass that also returns each unit's input: ([n x (B, C_i, H_i, W_i)], logits)."""
        inputs = []
        x = self.stem(x)
        for unit in self.units:
            inputs.append(x)
            x = unit(x)
        return inputs, self.head(x)


class ClassifierHead(nn.Sequential):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_features, num_classes))


def _cifar_resnet(spec: ArchSpec, depth: int) -> ResidualBackbone:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    per_stage = (depth - 2) // 6
    widths = [16] * per_stage + [32] * per_stage + [64] * per_stage
    inner = spec.inner_widths or tuple(widths)
    if len(inner) != len(widths) or min(inner) < 1:
        raise ValueError(f"{spec.name}: inner_widths must be {len(widths)} positive ints, got {inner}")
    stem = nn.Sequential(conv3x3(3, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    units, in_planes = [], 16
    for i, planes in enumerate(widths):
        stride = 2 if planes != in_planes else 1
        units.append(CifarBasicBlock(in_planes, planes, stride, inner=inner[i]))
        in_planes = planes
    backbone = ResidualBackbone(spec, stem, units, ClassifierHead(64, spec.num_classes), (3, 32, 32))
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    for unit in units:  # zero-init the last BN so every unit starts as its shortcut
        nn.init.zeros_(unit.bn2.weight)
    return backbone


def _torchvision_resnet(spec: ArchSpec, factory: Callable[..., nn.Module]) -> ResidualBackbone:
    if spec.inner_widths is not None:
        raise ValueError(f"{spec.name}: inner_widths are only supported for CIFAR ResNets")
    net = factory(weights=None, num_classes=spec.num_classes)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    units = [TorchvisionUnit(block) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
             for block in layer]
    head = nn.Sequential(net.avgpool, nn.Flatten(1), net.fc)
    return ResidualBackbone(spec, stem, units, head, (3, 224, 224))


def _register_cifar(depth: int) -> None:
    name = f"resnet{depth}"
    BACKBONES.register(name)(lambda spec: _cifar_resnet(spec, depth))


def _register_torchvision(name: str, pick: Callable) -> None:
    def build(spec: ArchSpec) -> ResidualBackbone:
        import torchvision.models  # imported on use: keeps `skipserve --help` fast

        return _torchvision_resnet(spec, pick(torchvision.models))

    BACKBONES.register(name)(build)


for _depth in (20, 32, 44, 56, 110):
    _register_cifar(_depth)
_register_torchvision("resnet18", lambda models: models.resnet18)
_register_torchvision("resnet34", lambda models: models.resnet34)
_register_torchvision("resnet50", lambda models: models.resnet50)


def build_backbone(spec: ArchSpec | str, *, num_classes: int = 10) -> ResidualBackbone:
    """Build a registered backbone from a spec or a bare name (random weights)."""
    if isinstance(spec, str):
        spec = ArchSpec(spec, num_classes=num_classes)
    return BACKBONES.get(spec.name)(spec)

