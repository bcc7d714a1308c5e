"""Execute a residual backbone with per-image unit decisions.

``skip`` execution runs unit i only on the images that keep it: gather that subset,
run the unit, scatter the result back; the other images take the shortcut (for an
identity shortcut: nothing at all). ``mask`` execution is what BlockDrop, SkipNet
and ConvNet-AIG do: run every unit on every image and select with the 0/1 mask. It
gives the same numbers at full cost; it is kept as the reference for tests and
benchmarks.
"""
from __future__ import annotations

from typing import Literal

import torch

from gating.backbones import ResidualBackbone, ResidualUnit

Execution = Literal["skip", "mask"]


def run_unit(unit: ResidualUnit, x: torch.Tensor, keep: torch.Tensor | list[bool]) -> torch.Tensor:
    """Apply ``unit`` to the images of ``x`` (B, C, H, W) where ``keep`` (B,) is True."""
    keep = keep.tolist() if isinstance(keep, torch.Tensor) else keep
    n_keep = sum(keep)
    if n_keep == len(keep):
        return unit(x)
    if n_keep == 0:
        return unit.skip(x)
    idx = torch.tensor([j for j, k in enumerate(keep) if k], device=x.device)
    # Gather and scatter along the batch, which is outermost in both layouts. A channels-last
    # tensor goes through its (N, H, W, C) view, so the subset keeps the layout the weights expect.
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    rows = (lambda t: t.permute(0, 2, 3, 1)) if nhwc else (lambda t: t)
    unrows = (lambda t: t.permute(0, 3, 1, 2)) if nhwc else (lambda t: t)
    y = unit(unrows(rows(x).index_select(0, idx)))  # (n_keep, C', H', W')
    if unit.learned_shortcut:
        # the unit ran its shortcut for the images that keep it: run it for the others alone
        rest = torch.tensor([j for j, k in enumerate(keep) if not k], device=x.device)
        s = unit.skip(unrows(rows(x).index_select(0, rest)))  # (B - n_keep, C', H', W')
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        out = torch.empty((len(keep), *y.shape[1:]), dtype=y.dtype, device=y.device, memory_format=fmt)
        rows(out).index_copy_(0, rest, rows(s))  # autograd allows this: `out` is a fresh tensor
        rows(out).index_copy_(0, idx, rows(y))
        return out
    out = unit.skip(x)  # free: the input itself, or option A's strided copy padded with zeros
    if torch.is_grad_enabled():
        return unrows(rows(out).index_copy(0, idx, rows(y)))
    # No autograd graph to protect: write in place. When ``out is x`` this overwrites the
    # unit's input, which only the executor holds (the stem's or a previous unit's output).
    rows(out).index_copy_(0, idx, rows(y))
    return out


def mask_unit(unit: ResidualUnit, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The research peers' execution: compute the unit for all images, then select."""
    m = keep.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(m, unit(x), unit.skip(x))


def execute(backbone: ResidualBackbone, x: torch.Tensor, keep: torch.Tensor,
            execution: Execution = "skip") -> torch.Tensor:
    """Logits of ``backbone`` on ``x`` (B, C, H, W) with decisions ``keep`` (B, n) bool."""
    if keep.shape != (x.shape[0], backbone.num_units):
        raise ValueError(f"keep must be (batch, units) = ({x.shape[0]}, {backbone.num_units}), "
                         f"got {tuple(keep.shape)}")
    h = backbone.stem(x)
    if execution == "skip":
        columns = keep.cpu().t().tolist()  # per unit: which images keep it, as plain bools
        for unit, column in zip(backbone.units, columns):
            h = run_unit(unit, h, column)
    else:  # the mask stays a tensor, so torch.compile traces the pass as one graph (S1's stochastic depth)
        for i, unit in enumerate(backbone.units):
            h = mask_unit(unit, h, keep[:, i].bool())
    return backbone.head(h)
