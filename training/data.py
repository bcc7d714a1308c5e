"""Image-folder data: decode once, cache as uint8 tensors, split with a fixed seed.

A data source is a directory or a ``.tar``/``.tar.gz`` archive holding
``[<split>/]<class>/<image>``; classes are indexed by sorted folder name. Decoding
50,000 CIFAR JPEGs takes a while, so the decoded ``(N, 3, H, W)`` uint8 tensor is
cached next to the user's cache directory, keyed by the source's content hash.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from gating.checkpoint import atomic_write
from gating.preprocess import normalize as _normalize
from gating.preprocess import resize_uint8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataError(ValueError):
    """Bad or missing data, with the path that was wrong."""


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]  # index -> class (folder) name

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def sample(self, n: int, seed: int = 0) -> "ImageSet":
        """``n`` images drawn at random with ``seed``, kept in their order (a split is sorted by
        class, so its first ``n`` would be a few classes only)."""
        pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self.subset(pick.sort().values)


def _split_member(path: str) -> tuple[str, str]:
    """'train/cat/0001.jpg' -> ('train', 'cat'): (prefix above the class, class)."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(parts) < 2:
        raise DataError(f"{path!r} is not inside a class folder (<class>/<image>)")
    return "/".join(parts[:-2]), parts[-2]


def _iter_files(source: Path) -> Iterator[tuple[str, bytes]]:
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                yield path.relative_to(source).as_posix(), path.read_bytes()
        return
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{source}: cannot read archive ({err})") from err


def _decode(name: str, data: bytes, size: tuple[int, int] | None) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise DataError(f"{name}: cannot decode image ({err})") from err
    return img if size is None else resize_uint8(img, size)


def _fingerprint(source: Path) -> str:
    h = hashlib.sha256()
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file():
                st = path.stat()
                h.update(f"{path.relative_to(source)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SKIPSERVE_CACHE", Path.home() / ".cache" / "skipserve"))


def load_image_folder(source: str | os.PathLike, *, size: tuple[int, int] | None = (32, 32),
                      cache_dir: Path | None = None) -> ImageSet:
    """Decode every image under ``source`` (directory or archive), cached after the first call."""
    from safetensors.torch import load_file, save_file

    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or directory")
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    tag = f"{size[0]}x{size[1]}" if size else "native"
    cache = cache_dir / f"{source.name}-{_fingerprint(source)}-{tag}.safetensors"
    if cache.exists():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            classes = json.loads(f.metadata()["classes"])
        t = load_file(str(cache))
        return ImageSet(t["images"], t["labels"], classes)

    by_class: dict[str, list[tuple[str, bytes]]] = {}
    prefix = None
    for name, data in _iter_files(source):
        top, cls = _split_member(name)
        if prefix is None:
            prefix = top
        elif top != prefix:
            raise DataError(f"{source}: images under two different roots ({prefix!r} and {top!r}); "
                            "expected one [<split>/]<class>/<image> tree")
        by_class.setdefault(cls, []).append((name, data))
    if not by_class:
        raise DataError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    classes = sorted(by_class)
    images, labels = [], []
    from tqdm import tqdm

    total = sum(len(v) for v in by_class.values())
    with tqdm(total=total, desc=f"decode {source.name}", unit="img", disable=total < 2000) as bar:
        for index, cls in enumerate(classes):
            for name, data in sorted(by_class[cls]):
                images.append(_decode(name, data, size))
                labels.append(index)
                bar.update()
    if size is None and len({tuple(i.shape) for i in images}) > 1:
        raise DataError(f"{source}: images differ in size; pass size=(H, W)")
    result = ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda tmp: save_file({"images": result.images, "labels": result.labels}, tmp,
                                              metadata={"classes": json.dumps(classes)}))
    return result


def card_split(card, val_fraction: float | None = None, seed: int | None = None) -> tuple[float, int]:
    """(val_fraction, split seed) a checkpoint's backbone was trained with, from its card's S1 config
    (0.1 and 0 when it has none); a value given here wins. Every later stage and every evaluation uses
    this split, so no validation image is ever trained on."""
    info = (card.info or {}) if card is not None else {}
    s1 = info.get("split") or info.get("config") or {}  # a shipped card's split, else the S1 config's
    return (float(s1.get("val_fraction", 0.1)) if val_fraction is None else val_fraction,
            int(s1.get("split_seed", 0)) if seed is None else seed)


def split_train_val(data: ImageSet, *, val_fraction: float = 0.1, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Stratified split: the same ``val_fraction`` of every class, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(len(data.classes)):
        idx = (data.labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_fraction)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return data.subset(torch.cat(train_idx).sort().values), data.subset(torch.cat(val_idx).sort().values)


def augment(images: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 batch: random crop after zero-padding, random flip."""
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def check_cutout(size: int) -> None:
    """The one check of a ``cutout`` setting (S1, S5 and recipes): a square's side, 0 for none."""
    if size < 0:
        raise ValueError(f"cutout is a square's side in pixels (0 = off), got {size}")


def cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image at a random centre, clipped at the borders
    (DeVries & Taylor 2017); on a normalised batch, zero is the mean colour."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), generator=g)
    cx = torch.randint(0, w, (b, 1, 1), generator=g)
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(h)[None, :, None]  # (1, H, 1)
    cols = torch.arange(w)[None, None, :]  # (1, 1, W)
    hole = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)  # (B, H, W)
    return x * ~hole[:, None].to(x.device)


def normalize(images: torch.Tensor, mean=CIFAR_MEAN, std=CIFAR_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised (CIFAR statistics unless given)."""
    return _normalize(images, mean, std)


def batches(n: int, batch_size: int, *, g: torch.Generator | None = None,
            drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index batches over range(n), shuffled when a generator is given."""
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
