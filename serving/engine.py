"""The replica's inference core, without Ray or HTTP: batches of requests in, per-image results out.

A batch may mix requests with different knobs (``budget``, ``alpha``, a cap). Requests that share a
policy (equal ``Policy.key``) are concatenated and run as one gated pass, in which every image
still follows its own path through the executor; so a batch costs about the sum of its images'
executed units.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from gating.model import GatedModel
from gating.policies import Policy, make_policy
from gating.preprocess import normalize
from gating.runtime import keep_activations_on_heap
from serving.images import RequestError


@dataclass
class Request:
    images: torch.Tensor  # (N, 3, H, W) float32, normalised, at the model's input size
    policy: Policy  # the rule and knob these images run under


@dataclass
class Result:
    probabilities: torch.Tensor  # (N, C) float32
    units_executed: torch.Tensor  # (N,) int
    keep: torch.Tensor  # (N, n) bool: which units each image ran
    flops: torch.Tensor  # (N,) FLOPs executed per image, gate included


class Engine:
    """A loaded gated model ready to serve: BN folded, eval mode, its own thread budget."""

    def __init__(self, checkpoint: str | os.PathLike, *, threads: Optional[int] = None):
        if threads:
            torch.set_num_threads(threads)
        keep_activations_on_heap()
        self.model = GatedModel.load(checkpoint).for_inference()
        card = self.model.card
        self.class_names: list[str] = list(card.class_names)
        self.input_size: tuple[int, int] = tuple(card.input_size[1:])
        self.mean, self.std = tuple(card.mean), tuple(card.std)
        self.default_policy: Policy = self.model.policy
        self.full_flops = float(self.model.flops.reference)  # the uncut backbone
        self.compute_s = 0.0  # seconds spent running batches, all told: the model's busy time
        self.clock = time.perf_counter  # what compute_s is counted in (the model process: its CPU time)

    @property
    def num_units(self) -> int:
        return self.model.num_units

    def policy_for(self, *, budget: Optional[float] = None, policy: Optional[str] = None,
                   alpha: Optional[float] = None) -> Policy:
        """The policy a request asks for; ``RequestError`` (400) for a bad combination or knob."""
        if budget is not None and (policy is not None or alpha is not None):
            raise RequestError("give either 'budget' or 'policy'/'alpha', not both")
        if budget is None and policy is None and alpha is None:
            return self.default_policy
        name = "budget" if budget is not None else policy or self.default_policy.name
        try:
            policy_ = make_policy(name, budget if budget is not None else alpha)
        except (ValueError, KeyError) as err:
            raise RequestError(str(err).strip('"')) from None
        if policy_.needs_scores and self.model.gate is None:
            raise RequestError(f"policy {name!r} needs a gate, and model has none")
        try:  # a knob only deciding shows wrong (greedy k above the unit count): refuse it here, not
            # inside the batch, where it would fail every request batched with this one
            policy_.decide(torch.zeros(1, self.num_units), self.model.flops)
        except ValueError as err:
            raise RequestError(str(err)) from None
        return policy_

    def pixels_to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) at the model's size -> normalised float input."""
        return normalize(pixels, self.mean, self.std)

    def run(self, requests: Sequence[Request]) -> list[Result]:
        t0 = self.clock()
        try:
            return self._run(requests)
        finally:
            self.compute_s += self.clock() - t0

    @torch.inference_mode()
    def _run(self, requests: Sequence[Request]) -> list[Result]:
        results: list[Optional[Result]] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.policy.key, []).append(i)
        for members in groups.values():
            x = torch.cat([requests[i].images for i in members])  # (sum N, 3, H, W)
            out = self.model(x, requests[members[0]].policy)
            probs = torch.softmax(out.logits.float(), dim=1)
            start = 0
            for i in members:
                n = requests[i].images.shape[0]
                part = slice(start, start + n)
                results[i] = Result(probs[part], out.keep[part].sum(1), out.keep[part], out.flops[part].float())
                start += n
        return results  # type: ignore[return-value]
