"""Request images -> model input, with limits enforced before any decoding work.

The declared width and height are read from the file header (PNG IHDR, JPEG SOF, WebP
VP8/VP8L/VP8X) and checked against ``max_pixels`` before the decoder sees the bytes, so
a tiny file declaring 20000 x 20000 pixels (a decompression bomb) is refused at once.
"""
from __future__ import annotations

import io
import struct
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from gating.preprocess import resize_uint8


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP code, the message says what was wrong."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Limits(BaseModel):
    """Request size limits; past one, a request is refused (413) before the work it would cost.
    Application args of their own (``serving.settings.AppArgs``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="bytes in one request body")
    max_pixels: int = Field(4096 * 4096, ge=1, description="pixels of one image, as declared in its header")
    max_images: int = Field(64, ge=1, description="images (N) in one request")
    max_request_pixels: int = Field(64 * 1024 * 1024, ge=1,
                                    description="pixels of all images of one request together, as declared")
    max_tensor_elements: int = Field(64 * 3 * 256 * 256, ge=1, description="numbers in one JSON tensor (v2)")


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise RequestError("PNG without a valid IHDR header (truncated?)")
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise RequestError("JPEG with a corrupt marker sequence")
        if data[i + 1] == 0xFF:  # a fill byte: any number may precede a marker (ITU T.81, B.1.1.2)
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                break
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    raise RequestError("JPEG without a frame header (truncated?)")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise RequestError("WebP without a valid VP8/VP8L/VP8X header (truncated?)")


def declared_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; RequestError for anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ("png", *_png_size(data))
    if data[:3] == b"\xff\xd8\xff":
        return ("jpeg", *_jpeg_size(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("webp", *_webp_size(data))
    raise RequestError("not a JPEG, PNG or WebP image (unrecognised file signature)", status=415)


def _checked_size(data: bytes, limits: Limits) -> tuple[str, int, int]:
    kind, w, h = declared_size(data)
    if w == 0 or h == 0:
        raise RequestError(f"{kind} declares an empty {w}x{h} image")
    if w * h > limits.max_pixels:
        raise RequestError(f"{kind} declares {w}x{h} pixels, over the limit of {limits.max_pixels}", status=413)
    return kind, w, h


def check_request_pixels(images: Sequence[bytes], limits: Limits, what: str = "image") -> None:
    """413 when the images of one request together declare more than ``max_request_pixels``, before
    any is decoded: each may be under ``max_pixels`` and the request still cost seconds of decoding.
    Each header is checked as ``decode_image_bytes`` checks it, naming the first bad one."""
    total = 0
    for i, data in enumerate(images):
        if not data:
            raise RequestError(f"{what} {i}: empty image body")
        try:
            _, w, h = _checked_size(data, limits)
        except RequestError as err:
            raise RequestError(f"{what} {i}: {err}", err.status) from None
        total += w * h
        if total > limits.max_request_pixels:
            raise RequestError(f"{what}s 0-{i} together declare {total} pixels, over the per-request limit of "
                               f"{limits.max_request_pixels}", status=413)


def _animated_webp(data: bytes) -> bool:
    return data[12:16] == b"VP8X" and len(data) > 20 and bool(data[20] & 0x02)


def _decode_with_pillow(data: bytes, fmt: str) -> torch.Tensor:
    """PNG, or animated WebP -> (3, H, W) uint8 (the first frame) through Pillow.

    torchvision's PNG decoder takes the whole process down (a segfault, not an exception) when
    libpng reports an error after the header, e.g. a corrupt IDAT stream
    (tests/reliability/test_bad_input.py); Pillow raises instead. torchvision refuses animated
    WebP. Still JPEG and WebP stay with torchvision.io, which survives the same fuzzing.
    """
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as im:
        im.seek(0)  # an animated image: its first frame
        if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: keep the top 8 bits
            gray = (np.asarray(im, dtype=np.uint32) >> (8 if im.mode.startswith("I;16") else 0)).clip(0, 255)
            arr = np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
        else:
            arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_image_bytes(data: bytes, limits: Limits, size: tuple[int, int]) -> torch.Tensor:
    """Encoded image -> (3, H, W) uint8 RGB at the model's ``size``."""
    from torchvision.io import ImageReadMode, decode_image

    if not data:
        raise RequestError("empty image body")
    if len(data) > limits.max_body_bytes:
        raise RequestError(f"image of {len(data)} bytes exceeds the limit of {limits.max_body_bytes}", status=413)
    kind, w, h = _checked_size(data, limits)
    try:
        if kind == "png" or (kind == "webp" and _animated_webp(data)):
            img = _decode_with_pillow(data, kind)
        else:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as err:  # every decoder failure is the image's fault: a 400 naming it
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise RequestError(f"cannot decode {kind} image: {first_line}") from None
    if tuple(img.shape[-2:]) != (h, w):
        raise RequestError(f"{kind} decoded to {tuple(img.shape[-2:])}, not the declared {h}x{w}")
    return resize_uint8(img, size)
