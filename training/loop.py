"""The epoch loop that S1, S4 and S5 share.

A stage builds its model and optimizer, then hands the loop what differs between stages: how a batch
of image indices becomes a loss, and the optimizer's settings (learning rate ...) at each step. The
loop owns the rest:

- resuming from the run directory's state: the trained module's weights, the optimizer's state, the
  epoch to go on from, and the weight average;
- the optimizer's settings at every step, from the stage's schedule function of the step number;
- clearing the optimizer's state (momentum) at the start of a warm restart;
- the average of the weights (stochastic weight averaging), updated at every epoch end from
  ``average_from`` on;
- at each epoch end: save the state atomically, then log the epoch's metrics line, so that a kill in
  between never leaves a record whose state is missing.

Each epoch draws its batch order, and the stage its augmentation, from ``epoch_generator(seed, epoch)``,
never from global state, so a resumed run retraces the uninterrupted one exactly.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from training.data import batches
from training.run import RunDir, epoch_generator

# what a stage's batch function returns: the batch's loss, and sums over its images of other metrics
# (numbers or one-element tensors, e.g. {"train_top1": images classified right}), which the loop reads
# after the optimizer step and logs divided by the epoch's image count
BatchResult = tuple[torch.Tensor, dict[str, Any]]


@dataclass
class Loop:
    name: str  # progress-bar and log-line label, e.g. "S1 resnet32"
    epochs: int  # the run's length; a resumed run goes on from its saved epoch
    batch_size: int  # images a step; an epoch is one pass over the training images in a shuffled order
    seed: int  # epoch e shuffles (and the stage augments) with epoch_generator(seed, e)
    state_key: str  # the trained module's weights' name in the saved state: "model", "gate" or "backbone"
    loss_name: str = "train_loss"  # the epoch's mean loss's field in the metrics line
    average_from: Optional[int] = None  # average the weights at every epoch end from this epoch on (0-based); None: off
    restarts: Sequence[int] = ()  # epochs that start with the optimizer's state (momentum) cleared


def train_epochs(loop: Loop, run: RunDir, module: torch.nn.Module, opt: torch.optim.Optimizer, n_images: int, *,
                 batch: Callable[[torch.Tensor, torch.Generator], BatchResult],
                 schedule: Callable[[int], dict[str, Any]],
                 before_step: Optional[Callable[[], None]] = None,
                 after_step: Optional[Callable[[], None]] = None,
                 end_of_epoch: Optional[Callable[[int, Optional[AveragedModel]], dict]] = None,
                 ) -> Optional[AveragedModel]:
    """Train ``module`` with ``opt`` for the epochs ``run`` has not finished yet; return the weight average
    (None when ``loop.average_from`` is None).

    ``batch(indices, g)``: the loss of the training images at ``indices`` (and metric sums, see
    ``BatchResult``), augmented with ``g``. ``schedule(step)``: the settings every parameter group of ``opt``
    takes before optimizer step ``step`` (counted from the run's start), e.g. ``{"lr": 0.1}``.
    ``before_step()`` runs between the backward pass and the optimizer step (gradient edits),
    ``after_step()`` after the step (weight edits). ``end_of_epoch(epoch, average)``: metrics to log after
    the training ones, computed after the epoch's average update (``average`` is the weight average when
    it was updated this epoch, else None); what it does to the average is saved with it.
    """
    steps_per_epoch = math.ceil(n_images / loop.batch_size)
    # BN buffers are not averaged: a stage re-estimates them for the averaged weights
    average = AveragedModel(module) if loop.average_from is not None else None
    start = 0
    state = run.resume()
    if state is not None:
        module.load_state_dict(state[loop.state_key])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        if average is not None and "average" in state:
            average.load_state_dict(state["average"])

    for epoch in range(start, loop.epochs):
        if epoch in loop.restarts:
            opt.state.clear()  # a warm restart starts with fresh momentum
        module.train()
        g = epoch_generator(loop.seed, epoch)
        t0, seen, loss_sum, sums = time.perf_counter(), 0, 0.0, {}
        bar = tqdm(batches(n_images, loop.batch_size, g=g), total=steps_per_epoch, unit="batch", leave=False,
                   desc=f"{loop.name} epoch {epoch + 1}/{loop.epochs}")
        for step, idx in enumerate(bar):
            settings = schedule(epoch * steps_per_epoch + step)
            for group in opt.param_groups:
                group.update(settings)
            loss, counts = batch(idx, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step()
            opt.step()
            if after_step is not None:
                after_step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            for key, value in counts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")

        record = {"epoch": epoch, loop.loss_name: loss_sum / seen, **{k: v / seen for k, v in sums.items()}}
        state = {loop.state_key: module.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1}
        averaged = average is not None and epoch >= loop.average_from
        if averaged:
            average.update_parameters(module)
        if end_of_epoch is not None:
            record.update(end_of_epoch(epoch, average if averaged else None))
        if averaged:
            state["average"] = average.state_dict()
        record["seconds"] = time.perf_counter() - t0
        run.end_epoch(state, record)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "seconds"))
        tqdm.write(f"{loop.name} epoch {epoch + 1}/{loop.epochs}: {shown} ({record['seconds']:.0f}s)", file=sys.stderr)
    return average
