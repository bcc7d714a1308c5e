"""Request decoding and limits, without Ray: every malformed image is a clear 4xx, never a crash."""
import io
import struct
import zlib

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from serving.images import Limits, RequestError, declared_size, decode_image_bytes

LIMITS = Limits()
IMG = torch.randint(0, 256, (3, 40, 24), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def jpeg(img=IMG, quality=95):
    return encode_jpeg(img, quality=quality).numpy().tobytes()


def png(img=IMG):
    return encode_png(img).numpy().tobytes()


def png_header(w, h, bit_depth=8, color=2):
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_good_images_decode_and_resize_to_the_model_size():
    for data in (jpeg(), png()):
        out = decode_image_bytes(data, LIMITS, (32, 32))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    exact = decode_image_bytes(png(IMG[:, :32, :]), LIMITS, (32, 24))
    assert torch.equal(exact, IMG[:, :32, :]), "PNG is lossless and the size already fits: untouched"
    assert declared_size(jpeg()) == ("jpeg", 24, 40) and declared_size(png()) == ("png", 24, 40)


def test_grayscale_and_16_bit_png_become_rgb():
    gray = encode_png(IMG[:1]).numpy().tobytes()
    out = decode_image_bytes(gray, LIMITS, (40, 24))
    assert out.shape == (3, 40, 24) and torch.equal(out[0], out[1])
    pil = pytest.importorskip("PIL.Image", reason="Pillow writes the 16-bit PNG fixture")
    buf = io.BytesIO()
    pil.fromarray((IMG[0].numpy().astype("uint16") * 257)).save(buf, format="PNG")
    out16 = decode_image_bytes(buf.getvalue(), LIMITS, (40, 24))
    assert out16.dtype == torch.uint8 and torch.equal(out16[0], IMG[0])


@pytest.mark.parametrize("data,status,match", [
    (b"", 400, "empty image body"),
    (b"hello, I am text", 415, "not a JPEG, PNG or WebP"),
    (jpeg()[:30], 400, "JPEG|cannot decode"),
    (jpeg()[: len(jpeg()) // 2], 400, "cannot decode jpeg|decoded to"),
    (png()[:20], 400, "PNG without a valid IHDR"),
    (png_header(20000, 20000), 413, "declares 20000x20000 pixels"),
    (png_header(0, 10), 400, "empty 0x10 image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "IHDR"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 4, 400, "WebP without a valid"),
])
def test_bad_images_get_a_clear_error(data, status, match):
    with pytest.raises(RequestError, match=match) as err:
        decode_image_bytes(data, LIMITS, (32, 32))
    assert err.value.status == status


def test_jpeg_fill_bytes_before_a_marker_are_read_past():
    data = jpeg()
    padded = data[:2] + b"\xff" * 5 + data[2:]  # fill bytes (ITU T.81, B.1.1.2) before the first segment
    assert declared_size(padded) == ("jpeg", 24, 40)
    assert torch.equal(decode_image_bytes(padded, LIMITS, (40, 24)), decode_image_bytes(data, LIMITS, (40, 24)))


def test_body_size_limit():
    with pytest.raises(RequestError, match="exceeds the limit") as err:
        decode_image_bytes(jpeg(), Limits(max_body_bytes=100), (32, 32))
    assert err.value.status == 413


# ---------------------------------------------------------------- Open Inference (v2) requests
import base64  # noqa: E402

from gating.preprocess import normalize  # noqa: E402
from serving.v2 import parse_infer_request  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def parse(body, limits=LIMITS):
    return parse_infer_request(body, limits=limits, size=(32, 32), mean=MEAN, std=STD)


def test_the_three_encodings_give_the_same_model_input():
    pixels = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    expected = normalize(pixels, MEAN, STD)
    fp32 = parse({"inputs": [{"name": "x", "shape": [2, 3, 32, 32], "datatype": "FP32",
                              "data": expected.flatten().tolist()}], "parameters": {"budget": 0.5}})
    uint8 = parse({"inputs": [{"name": "x", "shape": [2, 32, 32, 3], "datatype": "UINT8",
                               "data": pixels.permute(0, 2, 3, 1).flatten().tolist()}], "parameters": {"alpha": 0.1}})
    png_b64 = [base64.b64encode(encode_png(p).numpy().tobytes()).decode() for p in pixels]
    bytes_ = parse({"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": png_b64}], "id": "r1"})
    for req in (fp32, uint8, bytes_):
        assert torch.allclose(req.images, expected, atol=1e-5)
    assert fp32.budget == 0.5 and uint8.alpha == 0.1 and bytes_.request_id == "r1"


GOOD = {"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}


@pytest.mark.parametrize("body,status,match", [
    ("not an object", 400, "must be a JSON object"),
    ({}, 400, "exactly one tensor"),
    ({"inputs": [GOOD, GOOD]}, 400, "exactly one tensor"),
    ({"inputs": [{**GOOD, "shape": [1, 3, 32]}]}, 400, "shape \\[1, 3, 32\\] needs 96 values, got 3072"),
    ({"inputs": [{**GOOD, "shape": [1, 4, 32, 24], "data": [0.0] * 3072}]}, 400, "must be \\[N, 3, H, W\\]"),
    ({"inputs": [{**GOOD, "data": [0.0] * 3071}]}, 400, "needs 3072 values, got 3071"),
    ({"inputs": [{**GOOD, "data": [float("nan")] * 3072}]}, 400, "NaN"),
    ({"inputs": [{**GOOD, "data": ["a"] * 3072}]}, 400, "must be numbers"),
    ({"inputs": [{**GOOD, "datatype": "FP16"}]}, 400, "unsupported datatype 'FP16'"),
    ({"inputs": [{**GOOD, "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [300] * 3072}]}, 400, "\\[0, 255\\]"),
    ({"inputs": [{**GOOD, "shape": [0, 3, 32, 32], "data": []}]}, 400, "batch of 0"),
    ({"inputs": [{**GOOD, "shape": [65, 3, 32, 32], "data": []}]}, 413, "batch of 65"),
    ({"inputs": [{**GOOD, "shape": [64, 3, 2000, 2000], "data": []}]}, 413, "exceeds the limit"),
    ({"inputs": [{**GOOD, "shape": [-1, 3, 32, 32]}]}, 400, "non-negative integers"),
    ({"inputs": [{**GOOD, "shape": [1, 3, 0, 0], "data": []}]}, 400, "with H, W >= 1"),
    ({"inputs": [{**GOOD, "shape": [1, 0, 0, 3], "datatype": "UINT8", "data": []}]}, 400, "with H, W >= 1"),
    ({"inputs": [GOOD], "parameters": {"budget": -0.5}}, 400, "'budget' must be in \\(0.0, 1.0\\]"),
    ({"inputs": [GOOD], "parameters": {"budget": 1.5}}, 400, "'budget' must be in"),
    ({"inputs": [GOOD], "parameters": {"budget": "half"}}, 400, "finite number"),
    ({"inputs": [GOOD], "parameters": {"budget": 0.5, "alpha": 1}}, 400, "either 'budget' or 'alpha'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}, 400, "not valid base64"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                  "data": [base64.b64encode(b"text").decode()]}]}, 415, "element 0: not a JPEG"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                  "data": [base64.b64encode(png_header(20000, 20000)).decode()]}]}, 413, "20000x20000"),
    ({"inputs": [GOOD], "parameters": []}, 400, "'parameters' must be an object"),
    ({"inputs": [GOOD], "parameters": "budget=0.5"}, 400, "'parameters' must be an object"),
])
def test_malformed_v2_requests_get_a_clear_error(body, status, match):
    with pytest.raises(RequestError, match=match) as err:
        parse(body)
    assert err.value.status == status


def test_a_request_s_images_together_are_limited_before_any_is_decoded():
    big = base64.b64encode(png_header(3000, 3000)).decode()  # 9 Mpx each, under max_pixels; never decodable
    body = {"inputs": [{"name": "x", "shape": [8], "datatype": "BYTES", "data": [big] * 8}]}
    with pytest.raises(RequestError, match="elements 0-7 together declare 72000000 pixels") as err:
        parse(body)
    assert err.value.status == 413, "refused on the headers: decoding the first would have said 'cannot decode'"
    small = base64.b64encode(png()).decode()  # 24x40
    ok = parse({"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [small] * 2}]},
               limits=Limits(max_request_pixels=2 * 24 * 40))
    assert ok.images.shape == (2, 3, 32, 32)
    with pytest.raises(RequestError, match="elements 0-2 together declare 2880 pixels"):
        parse({"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES", "data": [small] * 3}]},
              limits=Limits(max_request_pixels=2 * 24 * 40))
