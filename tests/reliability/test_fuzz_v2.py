"""Property-based fuzzing of the Open Inference parser: any JSON value is a parse or a 4xx, nothing else."""
import pytest
import torch

from serving.images import Limits, RequestError
from serving.v2 import parse_infer_request

pytestmark = pytest.mark.reliability
LIMITS = Limits()

hypothesis = pytest.importorskip("hypothesis", reason="property-based fuzzing of the v2 parser")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

scalars = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=True),
                    st.text(max_size=8))
shapes = st.one_of(st.lists(st.integers(-2, 40), max_size=5), scalars)
tensors = st.fixed_dictionaries(
    {"name": st.text(max_size=5), "datatype": st.sampled_from(["FP32", "UINT8", "BYTES", "INT64", "", 3]),
     "shape": shapes, "data": st.one_of(st.lists(scalars, max_size=40), scalars)})
bodies = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.fixed_dictionaries({"inputs": st.one_of(st.lists(tensors, max_size=2), scalars)},
                                         optional={"parameters": st.one_of(
                                             st.dictionaries(st.sampled_from(["budget", "alpha", "x"]), scalars,
                                                             max_size=2), scalars),
                                             "id": scalars}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_v2_parser_never_fails_any_other_way(body):
    try:
        req = parse_infer_request(body, limits=LIMITS, size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    except RequestError as err:
        assert 400 <= err.status < 500 and str(err)
        return
    assert req.images.shape[1:] == (3, 32, 32) and torch.isfinite(req.images).all()
