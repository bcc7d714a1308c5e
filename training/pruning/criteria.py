"""Channel-importance criteria (strategy objects): higher score = keep.

Each criterion scores the inner channels of every unit (``scores``) and the stream
channels of every stage (``stream_scores``: the residual sum all units of a stage share,
see ``surgery``); ``ChannelPruner`` turns the scores and a FLOPs ratio into index sets. A
criterion may also refit the layers that read the removed channels after selection
(LASSO's least squares: ``reconstruct`` for a unit's conv2, ``reconstruct_stream`` for
the conv1 of every unit that reads a stage).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from gating.backbones import CifarBasicBlock, ResidualBackbone
from gating.registry import Registry
from training.pruning.surgery import stages, stream_readers, stream_writers

CRITERIA: Registry[type["Criterion"]] = Registry("pruning method")


class Criterion:
    name: ClassVar[str]
    needs_data: ClassVar[bool] = False
    scope: ClassVar[str] = "uniform"  # "uniform": same fraction in each unit; "global": one ranking for all

    def scores(self, backbone: ResidualBackbone, sample: torch.Tensor, keep_counts: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError

    def stream_scores(self, backbone: ResidualBackbone, sample: torch.Tensor,
                      keep_counts: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError

    def reconstruct(self, unit: CifarBasicBlock, keep: torch.Tensor, unit_input: torch.Tensor) -> None:
        """Optionally refit the unit after selection (default: nothing)."""

    def reconstruct_stream(self, backbone: ResidualBackbone, keep: list[torch.Tensor], sample: torch.Tensor) -> None:
        """Optionally refit the stream's readers after selection, in place (default: nothing)."""


def inner_activation(unit: CifarBasicBlock, x: torch.Tensor) -> torch.Tensor:
    """relu(bn1(conv1(x))): the inner feature maps (B, inner, H, W)."""
    return F.relu(unit.bn1(unit.conv1(x)))


def unit_inputs(backbone: ResidualBackbone, sample: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        inputs, _ = backbone.eval().unit_inputs(sample)
    return inputs


def _per_layer(values: list[torch.Tensor]) -> torch.Tensor:
    """Sum of per-channel values over layers, each layer normalised by its mean (so layers weigh alike)."""
    return sum(v / v.mean().clamp_min(1e-12) for v in values)


@CRITERIA.register("l1")
class L1Norm(Criterion):
    """Li et al. 2017: the L1 norm of each conv1 filter."""

    name = "l1"

    def scores(self, backbone, sample, keep_counts):
        return [u.conv1.weight.detach().abs().sum((1, 2, 3)) for u in backbone.units]

    def stream_scores(self, backbone, sample, keep_counts):
        """A stream channel's filters in every layer that writes it (stem, conv2s), summed."""
        return [_per_layer([conv.weight.detach().abs().sum((1, 2, 3)) for conv, _ in writers])
                for writers in stream_writers(backbone)]


@CRITERIA.register("slimming")
class BNScale(Criterion):
    """Liu et al. 2017: |gamma| of bn1, ranked globally (train with ``bn_l1`` > 0 first)."""

    name, scope = "slimming", "global"

    def scores(self, backbone, sample, keep_counts):
        return [u.bn1.weight.detach().abs() for u in backbone.units]

    def stream_scores(self, backbone, sample, keep_counts):
        """|gamma| of every BN that writes a stream channel (stem BN, bn2s), summed."""
        return [_per_layer([bn.weight.detach().abs() for _, bn in writers]) for writers in stream_writers(backbone)]


@CRITERIA.register("hrank")
class HRank(Criterion):
    """Lin et al. 2020: average rank of each channel's feature map over sample images."""

    name, needs_data = "hrank", True

    def scores(self, backbone, sample, keep_counts):
        out = []
        l1 = L1Norm().scores(backbone, sample, keep_counts)  # breaks ties, as in stream_scores
        with torch.no_grad():
            for unit, x, w in zip(backbone.units, unit_inputs(backbone, sample), l1):
                maps = inner_activation(unit, x)  # (B, C, H, W)
                rank = torch.linalg.matrix_rank(maps.double()).float().mean(0)
                # under half the smallest gap between mean ranks (1/B): ranks still decide
                out.append(rank + 0.5 / len(x) * w / w.max().clamp_min(1e-30))
        return out

    def stream_scores(self, backbone, sample, keep_counts):
        """Average rank of a stream channel's feature maps after every unit of its stage."""
        ranks: list[list[torch.Tensor]] = [[] for _ in stages(backbone)]
        stage_of = {i: s for s, g in enumerate(stages(backbone)) for i in g}
        with torch.no_grad():
            h = backbone.eval().stem(sample)
            for i, unit in enumerate(backbone.units):
                h = unit(h)
                ranks[stage_of[i]].append(torch.linalg.matrix_rank(h.double()).float().mean(0))
        l1 = L1Norm().stream_scores(backbone, sample, keep_counts)  # breaks the many ties of full rank
        return [torch.stack(r).mean(0) + 1e-3 * w / w.sum() for r, w in zip(ranks, l1)]


def _contributions(unit: CifarBasicBlock, x: torch.Tensor, positions: int, g: torch.Generator):
    """Per inner channel, its contribution to sampled conv2 outputs: Z (C, N*out) and the patches (N, C, 9)."""
    return _conv_contributions(unit.conv2, inner_activation(unit, x), positions, g)


def _conv_contributions(conv: torch.nn.Conv2d, a: torch.Tensor, positions: int, g: torch.Generator):
    """Per input channel of a 3x3 ``conv`` fed ``a`` (B, C, H, W), its contribution to sampled outputs:
    Z (C, N*out) with N = B * positions (Y = sum_c Z_c is the conv's output), and the patches (N, C, 9)."""
    cols = F.unfold(a, 3, padding=1, stride=conv.stride)  # (B, C*9, H'*W')
    b, _, hw = cols.shape
    pick = torch.randint(0, hw, (b, positions), generator=g)
    cols = torch.gather(cols, 2, pick[:, None, :].expand(b, cols.shape[1], positions))  # (B, C*9, P)
    c = a.shape[1]
    patches = cols.view(b, c, 9, positions).permute(0, 3, 1, 2).reshape(b * positions, c, 9)  # (N, C, 9)
    w = conv.weight.detach().view(conv.out_channels, c, 9)  # (out, C, 9)
    z = torch.einsum("nck,ock->cno", patches, w).reshape(c, -1)  # (C, N*out)
    return z, patches


def _refit(conv: torch.nn.Conv2d, a: torch.Tensor, keep: torch.Tensor, positions: int, g: torch.Generator) -> None:
    """Least squares, in place: ``conv``'s weights on input channels ``keep`` that best reproduce its output
    on all channels of ``a``, at sampled positions."""
    z, patches = _conv_contributions(conv, a, positions, g)
    target = z.sum(0).view(-1, conv.out_channels).double()  # (N, out)
    x = patches[:, keep].reshape(len(patches), -1).double()  # (N, k*9)
    w = torch.linalg.lstsq(x, target).solution  # (k*9, out)
    new = conv.weight.detach().clone()
    new[:, keep] = w.T.reshape(conv.out_channels, len(keep), 3, 3).to(new.dtype)
    conv.weight.copy_(new)


def _bn_scaled(z: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """Contributions Z (C, N*out) to a conv's outputs, scaled as the eval-mode ``bn`` after it scales them."""
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
    return (z.view(len(z), -1, len(scale)) * scale).reshape(len(z), -1).double()


def _stream_grams(backbone: ResidualBackbone, sample: torch.Tensor, positions: int, g: torch.Generator):
    """Per stage, (Z Z^T (C, C), Z Y (C,), |Z| summed (C,)) where Z stacks each stream channel's contributions
    to the sampled, BN-scaled conv1 outputs of every unit reading the stage, each reader normalised by its
    output's norm so that wide and narrow readers weigh alike."""
    inputs = unit_inputs(backbone, sample)
    out = []
    for readers in stream_readers(backbone):
        gram = zy = mag = 0
        for i in readers:
            unit = backbone.units[i]
            z, _ = _conv_contributions(unit.conv1, inputs[i], positions, g)  # (C, N*out)
            z = _bn_scaled(z, unit.bn1)
            y = z.sum(0)
            z = z / y.norm().clamp_min(1e-12)
            gram, zy, mag = gram + z @ z.T, zy + z @ (y / y.norm().clamp_min(1e-12)), mag + z.abs().sum(1)
        out.append((gram, zy, mag))
    return out


@CRITERIA.register("lasso")
class Lasso(Criterion):
    """He et al. 2017: LASSO on channel coefficients beta to select, least squares to rebuild conv2."""

    name, needs_data = "lasso", True
    positions = 10  # sampled output positions per image
    iterations = 300

    def scores(self, backbone, sample, keep_counts):
        g = torch.Generator().manual_seed(0)
        out = []
        with torch.no_grad():
            for unit, x, k in zip(backbone.units, unit_inputs(backbone, sample), keep_counts):
                z, _ = _contributions(unit, x, self.positions, g)
                out.append(self._select(z.double(), k))
        return out

    def _select(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """|beta| from the LASSO whose penalty leaves about k non-zero coefficients (bisection on lambda)."""
        return self._select_gram(z @ z.T, z @ z.sum(0), k, z.abs().sum(1))

    def _select_gram(self, gram: torch.Tensor, zy: torch.Tensor, k: int, magnitude: torch.Tensor) -> torch.Tensor:
        """The LASSO of ``_select`` from Z Z^T (C, C) and Z Y (C,); ``magnitude`` (C,) breaks ties."""
        tie = 1e-12 * (magnitude / magnitude.sum().clamp_min(1e-30)).float()
        top = float(torch.linalg.eigvalsh(gram).max())
        if top <= 0:  # no channel contributes anything on the sample: every choice is equal
            return tie
        step = 1.0 / top
        lo, hi = 0.0, float(zy.abs().max())
        beta = torch.ones(len(zy), dtype=gram.dtype)
        for _ in range(30):
            lam = (lo + hi) / 2
            b = self._ista(gram, zy, lam, step)
            if int((b.abs() > 1e-10).sum()) > k:
                lo = lam
            else:
                hi, beta = lam, b
        return beta.abs().float() + tie  # ties broken by magnitude

    def _ista(self, gram, zy, lam, step):
        beta = torch.ones(len(zy), dtype=gram.dtype)
        for _ in range(self.iterations):
            beta = beta - step * (gram @ beta - zy)
            beta = torch.sign(beta) * (beta.abs() - step * lam).clamp_min(0)
        return beta

    def stream_scores(self, backbone, sample, keep_counts):
        """The same LASSO on stream channels: coefficients on their contributions to every reader's conv1."""
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return [self._select_gram(gram, zy, k, mag)
                    for (gram, zy, mag), k in zip(_stream_grams(backbone, sample, self.positions, g), keep_counts)]

    def reconstruct_stream(self, backbone, keep, sample):
        """Least squares: each reader's conv1 weights on the kept stream channels that best reproduce its
        unpruned output (the inputs are the unpruned stream's, as in He et al.'s layer-by-layer refit)."""
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            inputs = unit_inputs(backbone, sample)
            for k, readers in zip(keep, stream_readers(backbone)):
                for i in readers:
                    _refit(backbone.units[i].conv1, inputs[i], k, self.positions, g)

    def reconstruct(self, unit, keep, unit_input):
        """Least squares: conv2 weights on the kept channels that best reproduce the unpruned conv2 output."""
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            _refit(unit.conv2, inner_activation(unit, unit_input), keep, self.positions, g)


@CRITERIA.register("genetic")
class Genetic(Criterion):
    """A genetic algorithm over binary channel masks per unit (fitness: residual-branch reconstruction)."""

    name, needs_data = "genetic", True
    population = 32
    generations = 40
    mutation = 0.1  # probability that an offspring swaps one kept channel for a dropped one

    def scores(self, backbone, sample, keep_counts):
        g = torch.Generator().manual_seed(0)
        out = []
        with torch.no_grad():
            for unit, x, k in zip(backbone.units, unit_inputs(backbone, sample), keep_counts):
                best = self._search(unit, x, k, g)
                score = torch.zeros(unit.conv1.out_channels)
                score[best] = 1.0
                out.append(score + 1e-6 * unit.conv1.weight.abs().sum((1, 2, 3)) / unit.conv1.weight.abs().sum())
        return out

    positions = 10  # sampled output positions per image for the fitness

    def stream_scores(self, backbone, sample, keep_counts):
        """The same search over stream masks; fitness: the error dropping them causes in every reader's conv1."""
        g = torch.Generator().manual_seed(0)
        l1 = L1Norm().stream_scores(backbone, sample, keep_counts)
        out = []
        with torch.no_grad():
            for (gram, _, _), k, seed in zip(_stream_grams(backbone, sample, self.positions, g), keep_counts, l1):
                score = torch.zeros(len(gram))
                score[self._search_gram(gram, k, seed, g)] = 1.0
                out.append(score + 1e-6 * seed / seed.sum())
        return out

    def _search(self, unit, x, k, g):
        z = _bn_scaled(_contributions(unit, x, self.positions, g)[0], unit.bn2)  # (C, N*out)
        gram = z @ z.T  # error of dropping channel set d: d^T G d (bn2 is affine in eval mode)
        return self._search_gram(gram, k, unit.conv1.weight.detach().abs().sum((1, 2, 3)), g)

    def _search_gram(self, gram: torch.Tensor, k: int, seed_scores: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Best k-of-C mask under error(drop d) = d^T G d; the top-k of ``seed_scores`` is one initial member."""
        c = len(gram)

        def error(m):
            d = (1 - m).double()
            return float(d @ gram @ d)

        def random_mask():
            m = torch.zeros(c)
            m[torch.randperm(c, generator=g)[:k]] = 1
            return m

        def repair(m):  # exactly k channels
            on, off = m.nonzero().squeeze(1), (m == 0).nonzero().squeeze(1)
            if len(on) > k:
                m[on[torch.randperm(len(on), generator=g)[:len(on) - k]]] = 0
            elif len(on) < k:
                m[off[torch.randperm(len(off), generator=g)[:k - len(on)]]] = 1
            return m

        seed = torch.zeros(c)
        seed[seed_scores.topk(k).indices] = 1
        pop = [seed] + [random_mask() for _ in range(self.population - 1)]
        for _ in range(self.generations):
            fitness = torch.tensor([-error(m) for m in pop])
            order = fitness.argsort(descending=True)
            parents = [pop[i] for i in order[: self.population // 2]]
            children = []
            while len(parents) + len(children) < self.population:
                i, j = torch.randint(0, len(parents), (2,), generator=g).tolist()
                cross = torch.rand(c, generator=g) < 0.5
                child = repair(torch.where(cross, parents[i], parents[j]).clone())
                if torch.rand(1, generator=g).item() < self.mutation and 0 < k < c:
                    on, off = child.nonzero().squeeze(1), (child == 0).nonzero().squeeze(1)
                    child[on[torch.randint(0, len(on), (1,), generator=g)]] = 0
                    child[off[torch.randint(0, len(off), (1,), generator=g)]] = 1
                children.append(child)
            pop = parents + children
        fitness = torch.tensor([-error(m) for m in pop])
        return pop[int(fitness.argmax())].nonzero().squeeze(1)
