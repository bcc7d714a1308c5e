"""Ye et al. 2018 ("rethinking the smaller-norm-less-informative assumption"): ISTA on BN gamma.

Training: every step, SGD on all weights except the inner BN scales gamma (bn1), which
take a proximal step gamma <- soft_threshold(gamma - lr * grad, lr * rho), driving whole
channels exactly to zero. The gamma-W rescaling trick multiplies gamma and beta by
``alpha`` and divides the consuming conv2 weights by ``alpha`` before training (the
function is unchanged, relu being positively homogeneous) and undoes it afterwards, so
the penalty acts on a rescaled gamma. A channel whose gamma is zero outputs the constant
relu(beta); removing it, that constant's contribution through conv2 is absorbed into
bn2's running mean. With conv2's zero padding the contribution is constant away from the
1-pixel border, so absorption is exact in the interior and exact everywhere when
beta <= 0 (then the channel contributes nothing).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gating.backbones import ResidualBackbone
from training.data import ImageSet, augment, batches, normalize
from training.pruning.surgery import check_prunable, prune_inner_channels
from training.run import epoch_generator


@dataclass
class IstaConfig:
    rho: float = 1e-3  # L1 strength on the (rescaled) inner gammas
    alpha: float = 0.5  # gamma-W rescaling factor: gamma, beta *= alpha; conv2 /= alpha
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.02  # cosine to zero
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0


@torch.no_grad()
def _rescale(backbone: ResidualBackbone, factor: float) -> None:
    for unit in backbone.units:
        unit.bn1.weight.mul_(factor)
        unit.bn1.bias.mul_(factor)
        unit.conv2.weight.div_(factor)


def ista_train(backbone: ResidualBackbone, train: ImageSet, cfg: IstaConfig) -> ResidualBackbone:
    check_prunable(backbone)
    _rescale(backbone, cfg.alpha)
    gammas = [u.bn1.weight for u in backbone.units]
    gamma_ids = {id(p) for p in gammas}
    others = [p for p in backbone.parameters() if id(p) not in gamma_ids]
    opt = torch.optim.SGD(others, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    step = 0
    backbone.train()
    for epoch in range(cfg.epochs):
        g = epoch_generator(cfg.seed, epoch)
        for idx in batches(len(train), cfg.batch_size, g=g):
            lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / max(steps, 1)))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(backbone(normalize(augment(train.images[idx], g))), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            for p in gammas:
                p.grad = None
            loss.backward()
            opt.step()
            with torch.no_grad():  # proximal step: plain gradient, then soft threshold
                for p in gammas:
                    p.sub_(lr * p.grad)
                    p.copy_(torch.sign(p) * (p.abs() - lr * cfg.rho).clamp_min(0))
            step += 1
    _rescale(backbone, 1 / cfg.alpha)
    return backbone.eval()


@torch.no_grad()
def remove_zero_gamma(backbone: ResidualBackbone, keep: list[torch.Tensor] | None = None) -> ResidualBackbone:
    """A copy of ``backbone`` without the inner channels not in ``keep`` (default: those with gamma == 0, one
    kept in a unit that has no other, whose bn2 still adds its shift), absorbing zero-gamma channels'
    constant output into bn2."""
    check_prunable(backbone)
    backbone = copy.deepcopy(backbone)
    keep = keep or [(u.bn1.weight != 0).nonzero().squeeze(1) if (u.bn1.weight != 0).any()
                    else u.bn1.weight.abs().topk(1).indices for u in backbone.units]
    for unit, k in zip(backbone.units, keep):
        dropped = torch.ones(unit.bn1.num_features, dtype=torch.bool)
        dropped[k] = False
        constant = dropped & (unit.bn1.weight == 0)
        if constant.any():
            level = F.relu(unit.bn1.bias[constant])  # the channel's output everywhere
            contribution = (unit.conv2.weight[:, constant].sum((2, 3)) * level).sum(1)  # (out,) interior value
            unit.bn2.running_mean.sub_(contribution)
    for i, (unit, k) in enumerate(zip(backbone.units, keep)):
        if len(k) == 0 and not unit.identity_shortcut:
            raise ValueError(f"ISTA zeroed every inner channel of down-sampling unit {i}; lower rho")
    return prune_inner_channels(backbone, keep)
