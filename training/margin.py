"""A fixed cut with a per-image margin: static unit pruning, then a gate that decides per image only at
the cut's edge.

On ResNet-32 at 40% of the FLOPs saved, one set of weights serving a few hundred per-image paths
scored 0.6-1.3 pp under the same network trained for one fixed 9-unit path (docs/training-log.md).
So the margin route fixes most decisions:

- ``fix_path``: a gated checkpoint whose gate is made constant, skipping the same units for every
  image (threshold at alpha 0 on scores of +-1); S5 then trains the backbone for that one path.
- ``margin_gate``: a gate trained (S4) on labels measured on that path (``skipserve label
  --on-paths``) decides two units per image: the kept unit whose removal costs least is dropped for
  the easiest ``easy`` share of images, and the skipped unit whose return gains most is run for the
  hardest share, sized so the mean FLOPs (gate counted) land at ``flops_target``. Every other unit
  keeps the fixed path's decision: at most four paths. Without ``flops_target`` no unit is added (two
  paths: the fixed one, and one unit fewer for easy images). A short S5 then fits the weights to them.

Both need an up-front, unordered ResNet-8 gate: the fixed decisions are folded into its output
layer's bias, so the checkpoint stays an ordinary gated model that every tool loads and serves.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from gating.gates import Gate, ResNet8Gate
from gating.model import GatedModel
from gating.policies import make_policy
from training.data import ImageSet, normalize

# Fixed units' scores are moved this far from 0, so the threshold rule never flips them, while the
# rules that rank scores (greedy, softmax, budget) still order them per image.
OFFSET = 10.0


def _resnet8_gate(model: GatedModel, what: str) -> ResNet8Gate:
    gate = model.gate
    if not isinstance(gate, ResNet8Gate) or gate.ordered:
        kind = "no gate" if gate is None else f"a {gate.kind}{' ordered' if gate.ordered else ''} gate"
        raise ValueError(f"{what} has {kind}; the margin route folds decisions into the output layer of an "
                         "unordered resnet8 gate (train one with `skipserve train-gate --gate resnet8`)")
    return gate


def fix_path(model: GatedModel, skip: Sequence[int]) -> GatedModel:
    """``model`` with its gate made constant: units ``skip`` skipped, the rest run, for every image."""
    gate = _resnet8_gate(model, "it")
    n = model.num_units
    skip = sorted(set(int(i) for i in skip))
    bad = [i for i in skip if not 0 <= i < n]
    if bad:
        raise ValueError(f"units {bad} out of range: the backbone has units 0..{n - 1}")
    if not skip or len(skip) == n:
        raise ValueError(f"skip between 1 and {n - 1} of the {n} units (got {len(skip)})")
    with torch.no_grad():
        gate.fc.weight.zero_()
        gate.fc.bias.copy_(torch.tensor([-1.0 if i in skip else 1.0 for i in range(n)]))
    model.policy = make_policy("threshold", 0.0)
    return model


@torch.no_grad()
def _scores(gate: Gate, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate(b) for b in x.split(500)])  # (N, n)


@torch.no_grad()
def margin_gate(static: GatedModel, trained: GatedModel, imp: torch.Tensor, train: ImageSet, *,
                easy: float = 0.3, flops_target: Optional[float] = None, sample: int = 10_000,
                seed: int = 0) -> tuple[GatedModel, dict]:
    """A gated model on ``static``'s backbone and fixed path, with ``trained``'s gate deciding the margin.

    ``imp`` (N, n): importance labels on the fixed path for the N images of ``train``; ``trained``: S4's
    output on those labels; ``flops_target`` None: drop only, no unit added. Shares are set on a seeded
    ``sample`` of the training images. Returns the model (threshold at alpha 0) and what was chosen
    (units, shares, the fixed path's FLOPs ratio; ``add_unit`` None when nothing is added).
    """
    if not 0 < easy < 1:
        raise ValueError(f"easy is the share of images that skip one more unit, in (0, 1); got {easy}")
    _resnet8_gate(static, "the fixed-path checkpoint")
    gate = _resnet8_gate(trained, "the gate checkpoint")
    n = static.num_units
    if trained.num_units != n:
        raise ValueError(f"the gate scores {trained.num_units} units, the fixed-path model has {n}")
    if tuple(imp.shape) != (len(train), n):
        raise ValueError(f"labels of shape {tuple(imp.shape)} for {len(train)} images and {n} units")
    data = train.sample(min(sample, len(train)), seed=seed)
    x = normalize(data.images, static.card.mean, static.card.std)  # (N, 3, H, W)
    paths = static.decide(x)  # (N, n)
    keep = paths[0]
    if not (paths == keep).all():
        raise ValueError("the checkpoint's gate does not keep one fixed path for every image "
                         "(make it constant first: `skipserve fix-path`)")
    mean_imp = imp.double().mean(0)  # (n,)
    units = torch.arange(n)
    drop = units[keep][mean_imp[keep].argmin()].item()

    gate.eval()
    s = _scores(gate, x).double()  # (N, n) predicted importance
    saving = static.flops.saving().tolist()  # (n,) FLOPs a skip saves
    static_ratio = ((static.flops.executed(keep[None])[0] + static.gate_flops) / static.flops.full).item()
    shift = torch.where(keep, OFFSET, -OFFSET).to(gate.fc.bias.dtype)
    shift[drop] = -torch.quantile(s[:, drop], easy).item()
    others = units != drop  # the units that keep the fixed path's decision
    add, hard = None, 0.0
    if flops_target is not None:  # the skipped unit that gains most, run for the hardest share
        add = units[~keep][mean_imp[~keep].argmax()].item()
        hard = (easy * saving[drop] + (flops_target - static_ratio) * static.flops.full) / saving[add]
        if not 0 < hard < 1:
            raise ValueError(f"easy share {easy} and FLOPs target {flops_target} leave a hard share of {hard:.3f} "
                             f"(the fixed path runs at {static_ratio:.4f} of the FLOPs); it must be in (0, 1)")
        shift[add] = -torch.quantile(s[:, add], 1 - hard).item()
        others &= units != add
    gate.fc.bias.add_(shift)  # threshold at alpha 0 keeps unit i when its score >= 0
    if not ((_scores(gate, x)[:, others] >= 0) == keep[others]).all():
        raise ValueError(f"a fixed unit's score crossed 0 after a shift of {OFFSET}: the gate's scores "
                         "spread too far for this route")
    model = GatedModel(static.backbone, gate, make_policy("threshold", 0.0), static.card)
    return model, {"drop_unit": drop, "add_unit": add, "easy_share": easy, "hard_share": round(hard, 4),
                   "flops_target": flops_target, "fixed_path_flops_ratio": round(static_ratio, 4),
                   "mean_importance": [round(v, 4) for v in mean_imp.tolist()]}
