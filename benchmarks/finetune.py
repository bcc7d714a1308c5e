"""``skipserve bench finetune``: where an S5 step's time goes, in each memory layout.

An S5 step asks the gate for decisions, runs forward and backward on each image's own
path, and (with distillation) runs the full backbone as teacher. Each part is timed on
its own, and whole steps in NCHW and channels-last, interleaved, on random images.
``decide_ms`` is the model's own decision (``GatedModel.decide``: no backbone pass for an
up-front gate); ``decide_by_forward_ms`` is one taken the way an inline gate must, by a
backbone pass that reads the units' inputs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians, machine_info
from gating.executor import execute
from gating.model import GatedModel
from gating.policies import make_policy
from gating.zoo import resolve_checkpoint
from training.finetune import train_on_own_paths
from training.run import use_bf16

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass
class FinetuneBenchConfig:
    checkpoint: str = "default"  # gated model whose backbone S5 trains
    teacher: str = "default-backbone"  # the full-path teacher of distillation
    policy: str = "budget"  # rule and knob that decide the paths
    knob: float = 0.6
    batch: int = 128  # S5's batch size
    distill: float = 0.7
    threads: int = 2  # torch intra-op threads, fixed for the run
    repeats: int = 12
    seed: int = 0


def run(cfg: FinetuneBenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    base = GatedModel.load(resolve_checkpoint(cfg.checkpoint))
    if base.gate is None:
        raise ValueError(f"{cfg.checkpoint}: S5 needs a gated model, and this checkpoint has no gate")
    base.policy = make_policy(cfg.policy, cfg.knob)
    base.gate.requires_grad_(False)
    base_teacher = GatedModel.load(resolve_checkpoint(cfg.teacher)).backbone.eval().requires_grad_(False)
    x = torch.randn(cfg.batch, *base.backbone.input_size, generator=g)  # (B, C, H, W)
    y = torch.randint(0, base.backbone.spec.num_classes, (cfg.batch,), generator=g)
    amp = use_bf16(torch.device("cpu"), "auto")

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)

    parts, steps = {}, {}
    for name, fmt in LAYOUTS.items():
        model, teacher = copy.deepcopy(base), copy.deepcopy(base_teacher)
        model.backbone.to(memory_format=fmt)
        teacher.to(memory_format=fmt)
        xl = x.contiguous(memory_format=fmt)
        keep = model.decide(xl)
        opt = torch.optim.SGD(model.backbone.parameters(), lr=1e-4, momentum=0.9)

        def step(model=model, teacher=teacher, xl=xl, opt=opt):
            with autocast():
                loss = train_on_own_paths(model, xl, y, teacher=teacher, distill=cfg.distill)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def path_forward_backward(model=model, xl=xl, keep=keep):
            model.backbone.train()
            with autocast():
                loss = F.cross_entropy(execute(model.backbone, xl, keep), y)
            loss.backward()

        def teacher_forward(teacher=teacher, xl=xl):
            with torch.no_grad(), autocast():
                teacher(xl)

        def decide_by_forward(model=model, xl=xl):
            with torch.no_grad():
                model.eval()(xl).keep

        steps[name] = step
        parts[name] = {"decide": lambda model=model, xl=xl: model.decide(xl),
                       "decide_by_forward": decide_by_forward,
                       "path_forward_backward": path_forward_backward, "teacher_forward": teacher_forward}
    step_ms = interleaved_medians(steps, warmup=2, repeats=cfg.repeats)
    layouts = {}
    for name in LAYOUTS:
        ms = interleaved_medians(parts[name], warmup=1, repeats=cfg.repeats)
        layouts[name] = {"step_ms": round(step_ms[name], 2), **{f"{k}_ms": round(v, 2) for k, v in ms.items()}}
    return {"benchmark": "finetune", "checkpoint": cfg.checkpoint, "teacher": cfg.teacher,
            "policy": {"name": cfg.policy, "knob": cfg.knob}, "batch": cfg.batch, "distill": cfg.distill,
            "bf16": amp, "layouts": layouts,
            "channels_last_speedup": round(step_ms["nchw"] / step_ms["channels_last"], 3),
            "machine": machine_info()}
