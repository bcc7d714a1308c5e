"""Open Inference Protocol (KServe v2) request parsing, without any server: pure and testable.

Accepted input tensors (one per request, JSON data, row-major flat or nested):
- FP32  [N, 3, H, W]: normalised images (resized to the model's size, bilinear, antialiased);
- UINT8 [N, H, W, 3]: pixels, normalised here;
- BYTES [N]: base64-encoded JPEG/PNG/WebP files.
``parameters`` may carry ``budget`` (0 < b <= 1), or ``alpha`` (the knob of the model's rule, or of
``policy``: full, greedy, threshold, softmax, budget).
"""
from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from gating.preprocess import normalize, resize_uint8
from serving.images import Limits, RequestError, check_request_pixels, decode_image_bytes

DATATYPES = ("FP32", "UINT8", "BYTES")  # the input tensor types accepted


@dataclass
class InferRequest:
    images: torch.Tensor  # (N, 3, H, W) float32, normalised, at the model's input size
    budget: Optional[float]  # per-request compute budget
    alpha: Optional[float]  # per-request knob for the model's rule
    policy: Optional[str]  # per-request rule (with alpha as its knob), e.g. "full"
    request_id: Optional[str]
    input_name: str


def _flatten(data: Any) -> list:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [v for row in data for v in _flatten(row)]
    if not isinstance(data, list):
        raise RequestError("input 'data' must be a list")
    return data


def _shape(spec: dict) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise RequestError("input 'shape' must be a list of non-negative integers")
    return shape


def _number(params: dict, key: str, low: float, high: float, low_open: bool) -> Optional[float]:
    if key not in params:
        return None
    v = params[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"parameter {key!r} must be a finite number, got {v!r}")
    if (v <= low if low_open else v < low) or v > high:
        raise RequestError(f"parameter {key!r} must be in {'(' if low_open else '['}{low}, {high}], got {v}")
    return float(v)


def parse_infer_request(body: Any, *, limits: Limits, size: tuple[int, int], mean: Sequence[float],
                        std: Sequence[float]) -> InferRequest:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError("'inputs' must be a list holding exactly one tensor")
    spec = inputs[0]
    name, datatype, shape = spec.get("name", "input"), spec.get("datatype"), _shape(spec)
    params = body.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be an object")
    budget = _number(params, "budget", 0.0, 1.0, low_open=True)
    alpha = _number(params, "alpha", -1e6, 1e6, low_open=False)
    if budget is not None and alpha is not None:
        raise RequestError("give either 'budget' or 'alpha', not both")
    policy = params.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise RequestError(f"parameter 'policy' must be a string, got {policy!r}")
    n = shape[0] if shape else 0
    if n < 1 or n > limits.max_images:
        raise RequestError(f"batch of {n} images; between 1 and {limits.max_images} are accepted",
                           status=413 if n > limits.max_images else 400)
    elements = math.prod(shape)
    if elements > limits.max_tensor_elements:
        raise RequestError(f"tensor of {elements} elements exceeds the limit of {limits.max_tensor_elements}",
                           status=413)
    data = _flatten(spec.get("data"))
    expected = n if datatype == "BYTES" else elements
    if len(data) != expected:
        raise RequestError(f"input {name!r}: shape {shape} needs {expected} values, got {len(data)}")

    if datatype == "FP32":
        if len(shape) != 4 or shape[1] != 3 or 0 in shape[2:]:
            raise RequestError(f"FP32 input must be [N, 3, H, W] with H, W >= 1, got {shape}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
            raise RequestError("FP32 data must be numbers")
        x = torch.tensor(data, dtype=torch.float32).view(shape)
        if not torch.isfinite(x).all():
            raise RequestError("FP32 data contains NaN or infinity")
        if tuple(shape[2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    elif datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3 or 0 in shape[1:3]:
            raise RequestError(f"UINT8 input must be [N, H, W, 3] pixels with H, W >= 1, got {shape}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in data):
            raise RequestError("UINT8 data must be integers in [0, 255]")
        pixels = torch.tensor(data, dtype=torch.uint8).view(shape).permute(0, 3, 1, 2)
        x = normalize(resize_uint8(pixels.contiguous(), size), mean, std)
    elif datatype == "BYTES":
        if len(shape) != 1:
            raise RequestError(f"BYTES input must be [N] encoded images, got {shape}")
        raws = []
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise RequestError(f"BYTES element {i} must be a base64 string")
            try:
                raws.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise RequestError(f"BYTES element {i} is not valid base64") from None
        check_request_pixels(raws, limits, what="BYTES element")
        images = []
        for i, raw in enumerate(raws):
            try:
                images.append(decode_image_bytes(raw, limits, size))
            except RequestError as err:
                raise RequestError(f"BYTES element {i}: {err}", err.status) from None
        x = normalize(torch.stack(images), mean, std)
    else:
        raise RequestError(f"unsupported datatype {datatype!r}; use FP32, UINT8 or BYTES")
    request_id = body.get("id")
    return InferRequest(x, budget, alpha, policy, request_id if isinstance(request_id, str) else None, str(name))
