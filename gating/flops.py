"""FLOPs accounting from ``torch.utils.flop_counter`` on the real modules.

A FLOP here is what ``FlopCounterMode`` counts (2 per multiply-add of convolutions
and matrix products); element-wise work (BN, ReLU, adds) is not counted, by it or
by us. Every number is per image at the backbone's input size.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running ``fn()`` once, as counted by ``FlopCounterMode``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class FlopsProfile:
    stem: int  # always run
    head: int  # always run (pool + classifier)
    unit_run: tuple[int, ...]  # unit i executed: shortcut + residual
    unit_skip: tuple[int, ...]  # unit i skipped: shortcut only (0 for identity/option-A shortcuts)
    removed: int = 0  # what the units a static cut removed would cost (ArchSpec.inner_widths 0)

    @property
    def num_units(self) -> int:
        return len(self.unit_run)

    @property
    def full(self) -> int:
        """Backbone FLOPs with every unit executed."""
        return self.stem + self.head + sum(self.unit_run)

    @property
    def reference(self) -> int:
        """FLOPs of the uncut network, every unit executed: what ratios and budgets are taken against."""
        return self.full + self.removed

    @property
    def minimum(self) -> int:
        """Backbone FLOPs with every unit skipped."""
        return self.stem + self.head + sum(self.unit_skip)

    def saving(self) -> torch.Tensor:
        """(n,) FLOPs saved by skipping each unit."""
        return torch.tensor(self.unit_run, dtype=torch.float64) - torch.tensor(self.unit_skip, dtype=torch.float64)

    def executed(self, keep: torch.Tensor) -> torch.Tensor:
        """Backbone FLOPs per image for decisions ``keep`` (B, n) bool -> (B,) float64."""
        return self.minimum + keep.to(torch.float64).cpu() @ self.saving()


@contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """``modules`` in eval mode for a while, then every submodule back in its own mode (a caller's
    model may be training with some parts frozen in eval: ``train(was_training)`` would undo that)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def profile_backbone(backbone: torch.nn.Module) -> FlopsProfile:
    """Count stem, head and each unit (run and skipped) on one image of the input size."""
    param = next(backbone.parameters())
    with eval_mode(backbone):
        x = torch.zeros(1, *backbone.input_size, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            stem = count_flops(lambda: backbone.stem(x))
            h = backbone.stem(x)
            run, skip = [], []
            for unit in backbone.units:
                run.append(count_flops(lambda: unit(h)))
                skip.append(count_flops(lambda: unit.skip(h)))
                h = unit(h)
            head = count_flops(lambda: backbone.head(h))
    return FlopsProfile(stem, head, tuple(run), tuple(skip))
