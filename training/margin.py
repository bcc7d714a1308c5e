"""A per-image margin on a static cut: the gate decides one unit, every other unit always runs.

After a ``cut`` stage the network is one fixed path. A gate trained (S4) on labels of that path ranks
every unit per image; ``margin`` keeps only its decision on the unit whose removal costs least on
average (the lowest mean importance), and sets the threshold so that the ``easy`` share of training
images, those the gate scores lowest, skip it. Two paths: the cut, and the cut less one unit.
"""
from __future__ import annotations

import torch

from gating.gates import ResNet8Gate
from gating.model import GatedModel
from gating.policies import make_policy
from training.data import ImageSet, normalize


@torch.no_grad()
def margin(model: GatedModel, imp: torch.Tensor, train: ImageSet, *, easy: float, sample: int = 10_000,
           seed: int = 0) -> tuple[GatedModel, dict]:
    """``model`` (an S4 output scoring every unit) deciding only its least important unit per image.

    ``imp`` (N, n): the importance labels ``model``'s gate was trained on, for the N images of ``train``.
    The share is set on a seeded ``sample`` of the training images. Returns the model (threshold rule)
    and what was chosen.
    """
    if not 0 < easy < 1:
        raise ValueError(f"easy is the share of images that skip the margin unit, in (0, 1); got {easy}")
    gate = model.gate
    if not isinstance(gate, ResNet8Gate) or gate.units is not None:
        raise ValueError("the margin is cut from an up-front resnet8 gate that scores every unit (an S4 output)")
    n = model.num_units
    if tuple(imp.shape) != (len(train), n):
        raise ValueError(f"labels of shape {tuple(imp.shape)} for {len(train)} images and {n} units")
    mean_imp = imp.double().mean(0)  # (n,)
    candidates = [i for i in range(n) if model.backbone.units[i].identity_shortcut]  # a skip must be free
    unit = min(candidates, key=lambda i: mean_imp[i].item())
    gate = gate.restricted_to([unit]).eval()
    data = train.sample(min(sample, len(train)), seed=seed)
    x = normalize(data.images, model.card.mean, model.card.std)  # (N, 3, H, W)
    scores = torch.cat([gate(b)[:, unit] for b in x.split(500)]).double()  # (N,)
    alpha = -torch.quantile(scores, easy).item()  # threshold keeps unit i where -score <= alpha
    out = GatedModel(model.backbone, gate, make_policy("threshold", alpha), model.card)
    return out, {"margin_unit": unit, "easy_share": easy, "mean_importance": [round(v, 4) for v in mean_imp.tolist()]}
