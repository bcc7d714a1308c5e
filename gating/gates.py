"""Gates G: per-unit scores G(x)_i, high = important (keep); sigmoid(G(x)_i) = P(unit i open).

Two families behind one interface:
- upfront (``ResNet8Gate``): reads the image once and scores every unit before the
  backbone runs, so any decision rule applies in one pass;
- inline (``LSTMGate``, ``MLPGate``): score unit i from a pooled feature of unit i's
  input, during the backbone's forward pass. Online rules (threshold) decide as they
  go; rules that need every score (greedy, softmax, budget) take two passes.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gating.backbones import CifarBasicBlock, ResidualBackbone, conv3x3
from gating.registry import Registry

GATES: Registry[Callable[..., "Gate"]] = Registry("gate")


class Gate(nn.Module):
    kind: ClassVar[str]
    upfront: ClassVar[bool]

    def config(self) -> dict:
        """Keyword arguments that rebuild this gate with ``build_gate``."""
        raise NotImplementedError

    # upfront gates
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, n), as the rule sees them
        return self.rule_scores(self.score_all(x))

    def score_all(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, n), every unit's own score
        raise NotImplementedError

    def rule_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores as the decision rule sees them: +inf for any unit it does not decide (always run)."""
        return scores

    # inline gates
    def begin(self, batch: int, device: torch.device) -> Any:
        return None

    def step(self, i: int, feature: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Score unit i from its input (B, C_i, H_i, W_i) -> ((B,), new state)."""
        raise NotImplementedError

    def score_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Score every unit from given unit inputs (teacher forcing) -> (B, n)."""
        state = self.begin(features[0].shape[0], features[0].device)
        scores = []
        for i, f in enumerate(features):
            s, state = self.step(i, f, state)
            scores.append(s)
        return torch.stack(scores, 1)


@GATES.register("resnet8")
class ResNet8Gate(Gate):
    """A ResNet-8 on the image, down-sampled to ``resolution`` and by a stride-2 stem.

    ``units``: the units its rule decides (indices into the backbone's units); every other unit always
    runs under a rule, scored +inf by ``forward``, yet keeps its real score in ``score_all``, by which a
    FLOPs cap ranks it. None: the rule decides every unit.
    """

    kind, upfront = "resnet8", True

    def __init__(self, num_units: int, widths: tuple[int, int, int] = (16, 32, 64), resolution: int = 32,
                 units: Optional[Sequence[int]] = None):
        super().__init__()
        self.num_units, self.widths, self.resolution = num_units, tuple(widths), resolution
        self.units = None if units is None else tuple(int(i) for i in units)
        if self.units is not None and (not self.units or len(set(self.units)) != len(self.units)
                                       or not all(0 <= i < num_units for i in self.units)):
            raise ValueError(f"units must be distinct unit indices in [0, {num_units}), got {list(units)}")
        w1, w2, w3 = self.widths
        self.stem = nn.Sequential(conv3x3(3, w1, stride=2), nn.BatchNorm2d(w1), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(CifarBasicBlock(w1, w1), CifarBasicBlock(w1, w2, 2), CifarBasicBlock(w2, w3, 2))
        self.fc = nn.Linear(w3, num_units)

    def config(self) -> dict:
        cfg = {"kind": self.kind, "widths": list(self.widths), "resolution": self.resolution}
        return cfg if self.units is None else cfg | {"units": list(self.units)}

    def score_all(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n) every unit's score, decided by the rule or not."""
        if x.shape[-1] > self.resolution or x.shape[-2] > self.resolution:
            x = F.adaptive_avg_pool2d(x, self.resolution)
        x = self.blocks(self.stem(x))  # (B, w3, r/8, r/8)
        return self.fc(x.mean((2, 3)))  # (B, n)

    def rule_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``score_all``'s (B, n) as the rule sees them: +inf for the units it does not decide."""
        if self.units is None:
            return scores
        undecided = torch.ones(self.num_units, dtype=torch.bool, device=scores.device)
        undecided[list(self.units)] = False
        return scores.masked_fill(undecided, float("inf"))

    @torch.no_grad()
    def restricted_to(self, units: Sequence[int]) -> "ResNet8Gate":
        """A copy whose rule decides only ``units`` (of a gate deciding every unit), the same weights."""
        if self.units is not None:
            raise ValueError(f"this gate already decides only units {list(self.units)}")
        gate = ResNet8Gate(self.num_units, self.widths, self.resolution, units=units)
        gate.load_state_dict(self.state_dict())
        return gate.train(self.training)


@GATES.register("lstm")
class LSTMGate(Gate):
    """One shared LSTM cell reading each unit's pooled input, projected to ``dim``."""

    kind, upfront = "lstm", False

    def __init__(self, in_channels: list[int], dim: int = 32, hidden: int = 32):
        super().__init__()
        self.in_channels, self.dim, self.hidden = list(in_channels), dim, hidden
        self.proj = nn.ModuleList(nn.Linear(c, dim) for c in in_channels)  # per unit: widths differ
        self.cell = nn.LSTMCell(dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "hidden": self.hidden}

    def begin(self, batch: int, device: torch.device) -> Any:
        z = torch.zeros(batch, self.hidden, device=device)
        return z, z

    def step(self, i, feature, state):
        h, c = self.cell(self.proj[i](feature.mean((2, 3))), state)
        return self.out(h).squeeze(1), (h, c)


@GATES.register("mlp")
class MLPGate(Gate):
    """n independent MLPs; the i-th reads unit i's pooled input."""

    kind, upfront = "mlp", False

    def __init__(self, in_channels: list[int], hidden: int = 16):
        super().__init__()
        self.in_channels, self.hidden = list(in_channels), hidden
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)) for c in in_channels)

    def config(self) -> dict:
        return {"kind": self.kind, "hidden": self.hidden}

    def step(self, i, feature, state):
        return self.mlps[i](feature.mean((2, 3))).squeeze(1), state


def build_gate(kind: str, backbone: ResidualBackbone, **hyper: Any) -> Gate:
    """Build a gate of a registered kind for ``backbone`` (random weights)."""
    cls = GATES.get(kind)
    in_channels = [u.in_channels for u in backbone.units]
    if cls.upfront:
        return cls(backbone.num_units, **hyper)
    return cls(in_channels, **hyper)
