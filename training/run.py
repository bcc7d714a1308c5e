"""Run directories: config, metrics.jsonl, resumable state, summary.

Every stage writes its state atomically at the end of each epoch, so a killed
stage resumes from its last finished epoch. Randomness is drawn from generators
seeded by (seed, epoch), never from global state, so a resumed run retraces the
uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gating.checkpoint import CheckpointError, atomic_write, atomic_write_text


class RunError(ValueError):
    """A run directory that cannot be used as asked."""


class RunDir:
    def __init__(self, path: os.PathLike | str, stage: str):
        self.path = Path(path)
        self.stage = stage  # "backbone", "gate", "finetune", ...
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.path / f"{self.stage}-state.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def check_config(self, config: Any, inputs: Optional[dict[str, str]] = None,
                     continues: Optional[Callable[[dict, dict], bool]] = None) -> Optional[dict]:
        """Write the stage config, or refuse to resume a run that was started with another one.

        ``inputs``: digests of the weights the stage starts from (``weights_digest``), recorded beside the
        config: a file rewritten under the same path (a pruned model under the same ``--out``) is another
        start, and its run is not resumed from the old one's state. ``continues(old, new)``: whether a
        changed config still goes on from the recorded run (S1 extended by another warm-restart cycle);
        then the recorded config is returned (None otherwise)."""
        target = self.path / f"{self.stage}-config.json"
        text = json.dumps({**dataclasses.asdict(config), **(inputs or {})}, indent=2, sort_keys=True)
        continued = None
        if target.exists() and self.state_path.exists():
            old = {**_defaults(config), **json.loads(target.read_text())}  # a field added since: its default
            new = json.loads(text)
            for key in inputs or {}:  # a run recorded before its inputs were: nothing to compare with
                old.setdefault(key, new[key])
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed and not (continues is not None and continues(old, new)):
                raise RunError(f"{self.path}: cannot resume {self.stage}: config differs in {changed}; "
                               "use a new run directory")
            continued = old if changed else None
        atomic_write_text(target, text + "\n")
        return continued

    def save_state(self, state: dict) -> None:
        atomic_write(self.state_path, lambda tmp: torch.save(state, tmp))

    def load_state(self) -> Optional[dict]:
        if not self.state_path.exists():
            return None
        try:
            return torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, corrupt, or carrying pickled objects
            raise CheckpointError(self.state_path, f"cannot load run state ({err})") from err

    def resume(self) -> Optional[dict]:
        """The saved state (None: start afresh), with the records of epochs that will run again dropped."""
        state = self.load_state()
        self.trim_metrics(int(state["epoch"]) if state is not None else 0)
        return state

    def end_epoch(self, state: dict, record: dict) -> None:
        """Save the state, then log the epoch: a kill in between must not leave a record the state lacks."""
        self.save_state(state)
        self.log(record)

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": self.stage, **record}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def trim_metrics(self, keep_before_epoch: int) -> None:
        """Drop this stage's records of epochs that will be re-run after a resume, and any line a kill
        tore in half while it was written (the saved state, not the log, says where the run is)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("stage") == self.stage and rec.get("epoch", -1) >= keep_before_epoch:
                continue
            kept.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.path / f"{self.stage}-summary.json", json.dumps(summary, indent=2) + "\n")


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and values; not a file's metadata)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _defaults(config: Any) -> dict:
    """A config dataclass's default field values, as JSON would hold them."""
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out))


def pick_device(name: str = "auto") -> torch.device:
    """A stage's ``device`` field: "auto" (the accelerator when present), "cpu", "cuda" or "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device; use 'auto' or 'cpu'")
    return device


def use_bf16(device: torch.device, amp: "str | bool" = "auto") -> bool:
    """Whether to train under bf16 autocast: "auto" means where the hardware computes bf16 natively
    (CUDA, or a CPU with AVX512-BF16/AMX, where oneDNN has fast bf16 convolutions)."""
    if isinstance(amp, bool):  # YAML 1.1 reads a bare on/off (a recipe's `amp: off`, `--set amp=off`) as a bool
        amp = "on" if amp else "off"
    if amp not in ("auto", "on", "off"):
        raise ValueError(f"amp must be 'auto', 'on' or 'off', not {amp!r}")
    if amp != "auto":
        return amp == "on"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def record_stage(model, stage: str, source: str, **details) -> None:
    """Write on ``model``'s card which stage made it, from what, and append that to the card's
    history: a model built stage by stage (the pipeline, or stage commands chained by hand) keeps
    the whole chain, oldest first."""
    info = model.card.info
    step = {"stage": stage, "from": f"{source} ({info.get('stage', 'stage unknown')})", **details}
    model.card.info = {**info, "stage": stage, "from": step["from"], **details,
                       "history": [*info.get("history", []), step]}
