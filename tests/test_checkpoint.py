"""One checkpoint format: round trips for every gate kind, clear errors, no pickle, atomic writes."""
import os
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from gating.checkpoint import CheckpointError, ModelCard, atomic_write, load_tensors, save_tensors
from gating.gates import GATES, build_gate
from gating.model import GatedModel
from gating.policies import make_policy
from gating.zoo import resolve_checkpoint
from tests.conftest import make_backbone, randomize_bn

CARD = ModelCard(arch={}, class_names=[f"c{i}" for i in range(10)], input_size=(3, 32, 32),
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def model_with(kind, policy=("threshold", 0.1)):
    backbone = make_backbone("resnet20")
    gate = None if kind is None else randomize_bn(build_gate(kind, backbone)).eval()
    return GatedModel(backbone, gate, make_policy(*policy), CARD).eval()


@pytest.mark.parametrize("kind", [None] + GATES.names())
def test_round_trip_gives_identical_outputs(tmp_path, kind):
    model = model_with(kind, ("full", None) if kind is None else ("threshold", 0.1))
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = GatedModel.load(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.keep, b.keep)
    assert loaded.policy.to_dict() == model.policy.to_dict()
    assert loaded.card.class_names == CARD.class_names and loaded.card.unit_flops == list(model.flops.unit_run)


def test_a_capped_rule_keeps_its_cap_through_save_and_load(tmp_path):
    from gating.policies import capped

    model = model_with("mlp")
    model.policy = capped(make_policy("threshold", 0.1), 0.5)
    model.save(tmp_path / "capped.safetensors")
    loaded = GatedModel.load(tmp_path / "capped.safetensors")
    assert loaded.policy.to_dict() == {"name": "threshold", "knob": 0.1, "cap": 0.5}
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        keep = loaded(x).keep
        assert torch.equal(keep, model(x).keep)
        assert not torch.equal(keep, loaded(x, make_policy("threshold", 0.1)).keep)  # the cap is in force


@pytest.mark.parametrize("change, message", [
    (lambda card: replace(card, gate="resnet8"), "field 'gate' must be a mapping"),
    (lambda card: replace(card, policy="greedy"), "field 'policy' must be a mapping"),
    (lambda card: replace(card, gate=None), "tensors no part of the card's model claims"),
    (lambda card: replace(card, policy={"name": "greedy", "knob": float("inf")}), "bad policy"),
])
def test_a_malformed_card_is_a_checkpoint_error(tmp_path, change, message):
    model = model_with("mlp")
    tensors = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    tensors.update({f"gate.{k}": v for k, v in model.gate.state_dict().items()})
    save_tensors(tmp_path / "bad.safetensors", tensors, change(model.make_card()))
    with pytest.raises(CheckpointError, match=message):
        GatedModel.load(tmp_path / "bad.safetensors")


def test_a_card_that_is_not_an_object_is_a_checkpoint_error(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "list.safetensors", metadata={"skipserve": "[1]"})
    with pytest.raises(CheckpointError, match="not a skipserve.gated/1 checkpoint"):
        GatedModel.load(tmp_path / "list.safetensors")


def test_missing_empty_truncated_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        GatedModel.load(tmp_path / "nope.safetensors")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        GatedModel.load(tmp_path / "empty")
    good = tmp_path / "good.safetensors"
    model_with("mlp").save(good)
    data = good.read_bytes()
    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.*truncated or corrupt"):
        GatedModel.load(tmp_path / "trunc")
    (tmp_path / "garbage").write_bytes(b"\x07" * 64 + data[64:])
    with pytest.raises(CheckpointError, match="garbage"):
        GatedModel.load(tmp_path / "garbage")


def test_plain_safetensors_without_card_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no skipserve model card"):
        GatedModel.load(tmp_path / "plain.safetensors")


def test_mismatched_architecture_names_the_problem(tmp_path):
    model = model_with("mlp")
    tensors = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    tensors.update({f"gate.{k}": v for k, v in model.gate.state_dict().items()})
    card = model.make_card()
    save_tensors(tmp_path / "wrong.safetensors", tensors, replace(card, arch={**card.arch, "name": "resnet32"}))
    with pytest.raises(CheckpointError, match="backbone weights do not match the architecture: missing"):
        GatedModel.load(tmp_path / "wrong.safetensors")
    save_tensors(tmp_path / "flops.safetensors", tensors, replace(card, unit_flops=[1] * 9))
    with pytest.raises(CheckpointError, match="per-unit FLOPs"):
        GatedModel.load(tmp_path / "flops.safetensors")
    save_tensors(tmp_path / "arch.safetensors", tensors, replace(card, arch={**card.arch, "name": "vgg16"}))
    with pytest.raises(CheckpointError, match="unknown backbone 'vgg16'"):
        GatedModel.load(tmp_path / "arch.safetensors")
    save_tensors(tmp_path / "gate.safetensors", tensors, replace(card, gate={"kind": "lstm"}))
    with pytest.raises(CheckpointError, match="gate weights do not match"):
        GatedModel.load(tmp_path / "gate.safetensors")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the file


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"state": _Payload(str(marker))}))
    with pytest.raises(CheckpointError, match="only safetensors"):
        GatedModel.load(evil)
    assert not marker.exists()
    torch.save({"state": _Payload(str(marker))}, tmp_path / "evil.pt")
    assert not marker.exists()
    from training.run import RunDir
    run = RunDir(tmp_path / "run", "backbone")
    os.replace(tmp_path / "evil.pt", run.state_path)
    with pytest.raises(CheckpointError, match="cannot load run state"):
        run.load_state()
    assert not marker.exists()


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "m.safetensors"
    model_with("mlp").save(path)
    before = path.read_bytes()

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"], "no temp file left behind"
    tensors, card = load_tensors(path)
    assert card.class_names == CARD.class_names


def test_shipped_names_and_paths_resolve_with_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        resolve_checkpoint(tmp_path / "missing.safetensors")
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"x")
    assert resolve_checkpoint(p) == p


def test_sparse_weights_are_stored_as_csr_and_load_back_dense(tmp_path):
    model = model_with(None, ("full", None))
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.ndim >= 2:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) > 0.8)
    dense, sparse = tmp_path / "dense.safetensors", tmp_path / "sparse.safetensors"
    model.save(dense)
    model.save(sparse, sparse=True)
    assert os.path.getsize(sparse) < 0.6 * os.path.getsize(dense), "80% zeros: CSR is well under dense"
    loaded = GatedModel.load(sparse)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    stored, _ = load_tensors(sparse)
    assert set(stored) == set(load_tensors(dense)[0]), "load_tensors hides the storage: the same names, dense"


def test_csr_of_a_small_matrix_and_corrupt_csr_files(tmp_path):
    from gating.checkpoint import CSR

    w = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 3.0]])
    csr = CSR.from_dense(w)
    assert csr.values.tolist() == [1.0, 2.0, 3.0] and csr.columns.tolist() == [1, 0, 2]
    assert csr.row_ptr.tolist() == [0, 1, 1, 3] and csr.numbers == 2 * 3 + 3 + 1
    assert torch.equal(csr.to_dense(), w)
    model = model_with(None, ("full", None))
    with torch.no_grad():
        model.backbone.head[2].weight.zero_()[0, :3] = 1.0  # 3 non-zeros of 640
    path = tmp_path / "s.safetensors"
    model.save(path, sparse=True)
    tensors, _ = load_tensors(path)  # decoded; now write the CSR parts back broken
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = next(k for k in raw if k.endswith(".csr_columns")).removesuffix(".csr_columns")
    broken = dict(raw)
    broken[f"{name}.csr_row_ptr"] = broken[f"{name}.csr_row_ptr"] + 1
    save_file(broken, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=f"CSR weight '{name}' is corrupt: row pointers"):
        GatedModel.load(tmp_path / "bad.safetensors")
    del broken[f"{name}.csr_values"]
    save_file(broken, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="lacks"):
        GatedModel.load(tmp_path / "missing.safetensors")


def test_a_gate_of_some_units_keeps_them_through_save_and_load(tmp_path):
    backbone = make_backbone("resnet20")
    gate = randomize_bn(build_gate("resnet8", backbone, resolution=16, units=[2, 5])).eval()
    model = GatedModel(backbone, gate, make_policy("threshold", 0.0), CARD).eval()
    model.save(tmp_path / "some.safetensors")
    loaded = GatedModel.load(tmp_path / "some.safetensors")
    assert loaded.gate.config() == {"kind": "resnet8", "widths": [16, 32, 64], "resolution": 16, "units": [2, 5]}
    assert loaded.gate.fc.out_features == 9  # every unit keeps its own score, for a cap to rank by
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.gate(x), loaded.gate(x))
        assert torch.isinf(model.gate(x)[:, [0, 1, 3, 4, 6, 7, 8]]).all()  # the rule keeps those


def test_a_cap_below_the_always_run_units_cuts_them_by_their_own_scores():
    # regression: the units a gate's rule does not decide were scored +inf and tied, so a cap below
    # their cost dropped them in unit order (cap 0.5 of the shipped default: top-1 0.145, not 0.80)
    from gating.policies import capped

    backbone = make_backbone("resnet20")
    gate = randomize_bn(build_gate("resnet8", backbone, units=[4])).eval()
    model = GatedModel(backbone, gate, make_policy("threshold", 0.0), CARD).eval()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        real = gate.score_all(x)
        keep = model(x, capped(model.policy, 0.6)).keep
    assert not (keep & ~model.decide(x)).any()  # no unit the rule skips
    assert not keep.all(1).any() and (model.flops.executed(keep) <= 0.6 * model.flops.reference + 1e-6).all()
    lowest = real.masked_fill(~model.decide(x), float("inf")).argmin(1)  # the lowest-scored unit it ran
    assert (~keep.gather(1, lowest[:, None])).all()  # is the first a cap cuts
