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

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

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
    # Static channel pruning (CIFAR ResNets only) shrinks the next three; None = standard.
    # inner (first conv output) width of each unit; None = its stage width; 0 = the unit is removed
    # (identity units only: a removed unit is its shortcut, so nothing of it is built or run)
    inner_widths: Optional[tuple[int, ...]] = None
    # residual-stream width of each stage (stem and every unit of the stage write it)
    stage_widths: Optional[tuple[int, ...]] = None
    # per down-sampling unit, for each output channel the input channel its shortcut copies
    # (-1: a zero channel); None = option A (the input's channels in the middle, zeros around)
    shortcut_sources: Optional[tuple[tuple[int, ...], ...]] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("inner_widths", "stage_widths"):
            d[key] = list(d[key]) if d[key] else None
        d["shortcut_sources"] = [list(s) for s in self.shortcut_sources] if self.shortcut_sources else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpec":
        def ints(key):
            return tuple(int(w) for w in d[key]) if d.get(key) else None

        sources = d.get("shortcut_sources")
        return cls(name=d["name"], num_classes=int(d["num_classes"]), inner_widths=ints("inner_widths"),
                   stage_widths=ints("stage_widths"),
                   shortcut_sources=tuple(tuple(int(c) for c in s) for s in sources) if sources else None)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class ResidualUnit(nn.Module):
    """Base class: subclasses define ``residual`` and ``shortcut``."""

    identity_shortcut: bool = True
    learned_shortcut: bool = False  # a shortcut with weights (torchvision's 1x1 conv + BN), not free to run twice

    @property
    def in_channels(self) -> int:
        raise NotImplementedError

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = self.residual(x)  # a fresh tensor: adding and rectifying in place saves two passes over memory
        out += identity
        return F.relu(out, inplace=True)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity_shortcut:
            return x  # relu(x) == x: the unit's input is the output of a ReLU
        return F.relu(self.shortcut(x))


def _as_run(sources: list[int]) -> Optional[tuple[int, int, int, int]]:
    """``sources`` as (start, count, before, after) when it copies consecutive input channels to
    consecutive output channels with zeros around, else None (a gather is needed)."""
    placed = [j for j, c in enumerate(sources) if c >= 0]
    if not placed:
        return 0, 0, len(sources), 0
    before, count, start = placed[0], len(placed), sources[placed[0]]
    if placed != list(range(before, before + count)):
        return None
    if sources[before:before + count] != list(range(start, start + count)):
        return None
    return start, count, before, len(sources) - before - count


class CifarBasicBlock(ResidualUnit):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, inner: Optional[int] = None,
                 sources: Optional[Sequence[int]] = None):
        super().__init__()
        inner = planes if inner is None else inner
        self.conv1 = conv3x3(in_planes, inner, stride)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = conv3x3(inner, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        pad = planes - in_planes  # option A: zero channels added by the shortcut
        self.identity_shortcut = stride == 1 and pad == 0 and sources is None
        index = None
        # option A's form, generalised: input channels [start, start + count) land at output channel
        # ``before``, zeros around; a pruned stream gets this form whenever surgery could order it so
        self.run = (0, in_planes, pad // 2, pad - pad // 2)  # (start, count, before, after)
        if sources is not None:  # a pruned stream: output channel j copies input sources[j], or is zero (-1)
            if len(sources) != planes or any(not -1 <= c < in_planes for c in sources):
                raise ValueError(f"shortcut sources must be {planes} channel indices in [-1, {in_planes}), "
                                 f"got {list(sources)[:8]}")
            self.run = _as_run(list(sources))
            if self.run is None:  # -1 indexes the zero channel appended after the input's channels
                index = torch.tensor([in_planes if c < 0 else c for c in sources], dtype=torch.long)
        elif pad < 0:
            raise ValueError(f"option-A shortcut cannot narrow {in_planes} to {planes} channels")
        self.register_buffer("sources", index, persistent=False)  # structure from the ArchSpec, not a weight

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return self.bn2(self.conv2(out))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity_shortcut:
            return x
        if self.sources is None:  # a slice and a pad keep the input's layout, channels-last included
            start, count, before, after = self.run
            return F.pad(x[:, start:start + count, :: self.stride, :: self.stride], (0, 0, 0, 0, before, after))
        if x.is_contiguous(memory_format=torch.channels_last):
            # Gathered in (N, H, W, C) order so that the result stays channels-last (gathering along
            # dim 1 would hand the next unit an NCHW tensor, and every later conv a layout change).
            nhwc = x.permute(0, 2, 3, 1)[:, :: self.stride, :: self.stride]
            return F.pad(nhwc, (0, 1)).index_select(3, self.sources).permute(0, 3, 1, 2)
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, 1)).index_select(1, self.sources)


class TorchvisionUnit(ResidualUnit):
    """Adapter over a torchvision ``BasicBlock`` or ``Bottleneck``; reuses its modules."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.identity_shortcut = block.downsample is None
        self.learned_shortcut = block.downsample is not None

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
        self.uncut_spec = spec  # the same network with any removed units back (FLOPs are reported against it)
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
    stages = spec.stage_widths or (16, 32, 64)
    if len(stages) != 3 or min(stages) < 1:
        raise ValueError(f"{spec.name}: stage_widths must be 3 positive ints, got {stages}")
    sources = spec.shortcut_sources or (None, None)
    if len(sources) != 2:
        raise ValueError(f"{spec.name}: shortcut_sources must hold 2 lists (one per down-sampling unit)")
    widths = [w for w in stages for _ in range(per_stage)]
    inner = spec.inner_widths or tuple(widths)
    down = [i for i in range(per_stage, len(widths), per_stage)]  # down-sampling units: they change the shape
    if len(inner) != len(widths) or min(inner) < 0 or min(inner[i] for i in down) < 1:
        raise ValueError(f"{spec.name}: inner_widths must be {len(widths)} ints >= 0, and >= 1 for the "
                         f"down-sampling units {down}, got {inner}")
    stem = nn.Sequential(conv3x3(3, stages[0]), nn.BatchNorm2d(stages[0]), nn.ReLU(inplace=True))
    units, in_planes = [], stages[0]
    for i, planes in enumerate(widths):
        if inner[i] == 0:
            continue  # removed: an identity unit's skip path is its input itself
        first = i > 0 and i % per_stage == 0  # first unit of stages 2 and 3: stride 2
        units.append(CifarBasicBlock(in_planes, planes, 2 if first else 1, inner=inner[i],
                                     sources=sources[i // per_stage - 1] if first else None))
        in_planes = planes
    backbone = ResidualBackbone(spec, stem, units, ClassifierHead(stages[2], spec.num_classes), (3, 32, 32))
    if 0 in inner:  # removed units come back at their stage's width
        backbone.uncut_spec = replace(spec, inner_widths=tuple(w or widths[i] for i, w in enumerate(inner)))
    # BN weights keep their default of 1: zero-initialising each unit's last BN (every unit starting as
    # its shortcut) trains this network more slowly (training/grow.py uses it to insert units instead).
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return backbone


def _torchvision_resnet(spec: ArchSpec, factory: Callable[..., nn.Module]) -> ResidualBackbone:
    if spec.inner_widths or spec.stage_widths or spec.shortcut_sources:
        raise ValueError(f"{spec.name}: pruned widths are only supported for CIFAR ResNets")
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

