"""Bad input without a server: every malformed image and v2 body is a RequestError (a 4xx), never a crash."""
import json

import pytest
import torch
from torchvision.io import encode_jpeg

from benchmarks.reliability import malformed_corpus, malformed_v2
from serving.images import Limits, RequestError, decode_image_bytes
from serving.v2 import parse_infer_request

pytestmark = pytest.mark.reliability
pytest.importorskip("PIL", reason="Pillow writes the corpus' CMYK, 16-bit and animated images")

LIMITS = Limits()
GOOD = encode_jpeg(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                   quality=90).numpy().tobytes()
CORPUS = malformed_corpus(GOOD)


@pytest.mark.parametrize("name,data,decodable", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_image_corpus(name, data, decodable):
    if decodable:
        out = decode_image_bytes(data, LIMITS, (32, 32))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    else:
        with pytest.raises(RequestError) as err:
            decode_image_bytes(data, LIMITS, (32, 32))
        assert 400 <= err.value.status < 500 and str(err.value)


def parse(body: bytes):
    return parse_infer_request(json.loads(body), limits=LIMITS, size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.mark.parametrize("name,route,body", [c for c in malformed_v2("m") if c[0] not in
                                             ("not json", "unknown model", "unknown output")],
                         ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else "")
def test_malformed_v2_bodies(name, route, body):
    with pytest.raises(RequestError) as err:
        parse(body)
    assert 400 <= err.value.status < 500


