"""One checkpoint format for gated models: safetensors weights + a JSON model card.

The card (stored in the safetensors metadata under ``skipserve``) says everything
needed to rebuild and serve the model: architecture, gate, policy and its knob,
class names, input size and normalisation, and the per-unit FLOPs the model was
saved with. Loading never executes pickled code, and writes are atomic
(temp file in the same directory, fsync, rename).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

FORMAT = "skipserve.gated/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, path: os.PathLike | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def atomic_write(path: os.PathLike | str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``; on failure ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


@dataclass
class ModelCard:
    """What a checkpoint is, besides its weights."""

    arch: dict  # ArchSpec.to_dict()
    class_names: list[str]
    input_size: tuple[int, int, int]  # (C, H, W) images are resized to
    mean: tuple[float, ...]  # per-channel normalisation applied after scaling to [0, 1]
    std: tuple[float, ...]
    gate: Optional[dict] = None  # {"kind": ..., **hyper-parameters}; None = no gate
    policy: dict = field(default_factory=lambda: {"name": "full"})  # {"name": ..., "knob": ...}
    unit_flops: Optional[list[int]] = None  # per-image FLOPs of each unit, checked on load
    info: dict = field(default_factory=dict)  # provenance and metrics; free-form

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return json.dumps({"format": FORMAT, **d}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str) -> "ModelCard":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointError(path, f"model card is not valid JSON ({err})") from err
        if not isinstance(d, dict) or d.pop("format", None) != FORMAT:
            raise CheckpointError(path, f"not a {FORMAT} checkpoint")
        try:
            card = cls(arch=d["arch"], class_names=list(d["class_names"]), input_size=tuple(d["input_size"]),
                       mean=tuple(d["mean"]), std=tuple(d["std"]), gate=d.get("gate"),
                       policy=d.get("policy") or {"name": "full"}, unit_flops=d.get("unit_flops"),
                       info=d.get("info") or {})
        except (KeyError, TypeError) as err:
            raise CheckpointError(path, f"model card lacks field {err}") from err
        for name, value in (("gate", card.gate), ("policy", card.policy), ("arch", card.arch)):
            if value is not None and not isinstance(value, dict):
                raise CheckpointError(path, f"model card field {name!r} must be a mapping, not {value!r}")
        return card


@dataclass
class CSR:
    """A weight as compressed sparse rows: its first dimension the rows, the rest flattened into columns."""
    values: torch.Tensor  # (a,) the non-zero weights
    columns: torch.Tensor  # (a,) int32: the column of each
    row_ptr: torch.Tensor  # (n + 1,) int32: where each row starts in values
    shape: tuple[int, ...]  # the dense weight's shape

    @property
    def numbers(self) -> int:
        return len(self.values) + len(self.columns) + len(self.row_ptr)  # 2a + n + 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.columns, self.row_ptr))

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "CSR":
        m = weight.detach().cpu().reshape(weight.shape[0], -1)  # (n, cols)
        nz = m != 0
        row_ptr = torch.zeros(m.shape[0] + 1, dtype=torch.int32)
        row_ptr[1:] = nz.sum(1).cumsum(0)
        return cls(m[nz].clone(), nz.nonzero()[:, 1].to(torch.int32), row_ptr, tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        """The dense weight; ValueError for arrays that do not describe one of ``shape``."""
        if not self.shape or any(d < 0 for d in self.shape):
            raise ValueError(f"bad dense shape {self.shape}")
        rows, cols = self.shape[0], (int(torch.tensor(self.shape[1:]).prod()) if len(self.shape) > 1 else 1)
        ptr, columns = self.row_ptr.long(), self.columns.long()
        counts = ptr.diff() if len(ptr) else ptr
        if (len(ptr) != rows + 1 or int(ptr[0]) != 0 or bool((counts < 0).any()) or int(ptr[-1]) != len(self.values)
                or len(columns) != len(self.values)):
            raise ValueError(f"row pointers do not describe {len(self.values)} values in {rows} rows")
        if len(columns) and (int(columns.min()) < 0 or int(columns.max()) >= cols):
            raise ValueError(f"a column index is outside 0..{cols - 1}")
        dense = torch.zeros(rows, cols, dtype=self.values.dtype)
        dense[torch.repeat_interleave(torch.arange(rows), counts), columns] = self.values
        return dense.reshape(self.shape)


_CSR_PARTS = ("csr_values", "csr_columns", "csr_row_ptr")


def save_tensors(path: os.PathLike | str, tensors: dict[str, torch.Tensor], card: ModelCard, *,
                 sparse: bool = False) -> None:
    """``sparse``: each floating weight of 2+ dimensions that takes fewer bytes as CSR is stored so (a
    magnitude-pruned model); ``load_tensors`` restores it dense."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"skipserve": card.to_json()}
    if sparse:
        shapes = {}
        for name, t in list(tensors.items()):
            if t.ndim >= 2 and t.numel() and t.is_floating_point():
                csr = CSR.from_dense(t)
                if csr.nbytes < t.numel() * t.element_size():
                    del tensors[name]
                    tensors.update(zip((f"{name}.{p}" for p in _CSR_PARTS), (csr.values, csr.columns, csr.row_ptr)))
                    shapes[name] = list(t.shape)
        metadata["skipserve_csr"] = json.dumps(shapes)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _dense_from_csr(path: str, tensors: dict[str, torch.Tensor], spec: str) -> None:
    try:
        shapes = json.loads(spec)
        if not isinstance(shapes, dict):
            raise ValueError("not a mapping")
    except ValueError as err:
        raise CheckpointError(path, f"bad CSR table in the metadata: {err}") from None
    for name, shape in shapes.items():
        parts = [f"{name}.{p}" for p in _CSR_PARTS]
        missing = [p for p in parts if p not in tensors]
        if missing:
            raise CheckpointError(path, f"CSR weight {name!r} lacks {missing}")
        try:
            csr = CSR(*(tensors.pop(p) for p in parts), tuple(int(d) for d in shape))
            tensors[name] = csr.to_dense()
        except (ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(path, f"CSR weight {name!r} is corrupt: {err}") from None


def load_tensors(path: os.PathLike | str) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """Read weights and card; no pickle is involved at any point."""
    from safetensors import SafetensorError, safe_open

    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(path, "file is empty")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        hint = " (is it a pickle/torch.save file? only safetensors checkpoints are accepted)" \
            if _looks_like_pickle(path) else " (truncated or corrupt?)"
        raise CheckpointError(path, f"not a readable safetensors file: {err}{hint}") from err
    if "skipserve" not in meta:
        raise CheckpointError(path, "safetensors file has no skipserve model card")
    if "skipserve_csr" in meta:
        _dense_from_csr(path, tensors, meta["skipserve_csr"])
    return tensors, ModelCard.from_json(meta["skipserve"], path)


def _looks_like_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head[:2] == b"PK"
