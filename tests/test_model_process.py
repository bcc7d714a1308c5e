"""The executor in a child process: same answers as in-process, pipelined calls, and a dead child."""
import os
import signal
import threading

import time

import pytest
import torch

from gating.policies import capped, make_policy
from serving.engine import Engine, Request
from serving.images import RequestError
from serving.model_process import BatchError, ModelProcessError, ProcessEngine


@pytest.fixture()
def engines(gated_checkpoint):
    remote = ProcessEngine(gated_checkpoint, threads=1)
    yield remote, Engine(gated_checkpoint, threads=1)
    remote.close()


def _batch(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_same_answers_as_the_engine_in_this_process(engines):
    remote, local = engines
    requests = [Request(_batch(0), local.default_policy), Request(_batch(1, 3), make_policy("full", None)),
                Request(_batch(2, 2), make_policy("budget", 0.3))]
    for ours, theirs in zip(remote.run(requests), local.run(requests)):
        assert torch.equal(ours.probabilities, theirs.probabilities)
        assert torch.equal(ours.keep, theirs.keep) and torch.equal(ours.flops, theirs.flops)


def test_the_model_time_counted_is_the_childs_compute_not_the_hand_off(engines):
    # the SLO autopilot reads it as the model's busy time: the socket, pickling and the wait for
    # the child's turn are not the model's
    remote, local = engines
    requests = [Request(_batch(0, 32), local.default_policy)]
    t0 = time.perf_counter()
    remote.run(requests)
    wall = time.perf_counter() - t0
    local.run(requests)
    assert 0 < remote.compute_s < wall and local.compute_s > 0


def test_a_capped_rule_runs_as_its_own_group_here_and_in_the_child(engines):
    remote, local = engines
    x = _batch(3, 8)
    alpha = (-local.model.gate(x)).median().item()  # about half the units open, more for some images
    rule = make_policy("threshold", alpha)
    cap = capped(rule, 0.4)
    own, trimmed, budget = local.run([Request(x, rule), Request(x, cap), Request(x, make_policy("budget", 0.4))])
    assert torch.equal(trimmed.keep, own.keep & budget.keep)
    assert not torch.equal(trimmed.keep, own.keep)  # the cap binds on some image, so the groups differ
    theirs = remote.run([Request(x, rule), Request(x, cap)])
    assert torch.equal(theirs[0].keep, own.keep) and torch.equal(theirs[1].keep, trimmed.keep)
    assert torch.equal(theirs[1].probabilities, trimmed.probabilities)


def test_concurrent_callers_each_get_their_own_answers(engines):
    remote, local = engines
    policy = local.default_policy
    expected = {i: local.run([Request(_batch(i), policy)])[0].probabilities for i in range(8)}
    got, errors = {}, []

    def call(i):
        try:
            got[i] = remote.run([Request(_batch(i), policy)])[0].probabilities
        except Exception as err:  # reported below, not lost in the thread
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and all(torch.equal(got[i], expected[i]) for i in range(8))


def test_a_bad_batch_fails_alone_and_the_child_keeps_serving(engines):
    remote, local = engines
    with pytest.raises(BatchError, match="failed on a batch") as err:  # a 500, not "restarting" (503)
        remote.run([Request(torch.zeros(2, 5, 32, 32), local.default_policy)])  # wrong channel count
    assert not isinstance(err.value, ModelProcessError)
    assert remote.alive and remote.run([Request(_batch(0), local.default_policy)])[0].probabilities.shape == (6, 3)


def test_a_killed_child_fails_every_call_clearly_and_closing_leaves_no_process(engines, gated_checkpoint):
    remote, local = engines
    os.kill(remote._proc.pid, signal.SIGKILL)
    remote._proc.wait(10)
    assert not remote.alive
    for _ in range(2):  # the first call finds it gone, later ones fail at once
        with pytest.raises(ModelProcessError, match="model process exited"):
            remote.run([Request(_batch(0), local.default_policy)])
    healthy = ProcessEngine(gated_checkpoint, threads=1)
    healthy.close()  # closing the socket ends the child's loop: it exits by itself, code 0
    assert healthy._proc.returncode == 0


@pytest.mark.parametrize("value,expected", [(None, True), (False, False), ("false", False), ("yes", True)])
def test_the_app_runs_the_model_process_unless_told_not_to(value, expected):
    from serving.settings import AppArgs

    args = {} if value is None else {"model_process": value}
    assert AppArgs.parse(args).model_process is expected


def test_a_model_process_setting_that_is_no_yes_or_no_is_refused():
    from serving.settings import AppArgs

    with pytest.raises(ValueError, match="model_process: Input should be a valid boolean"):
        AppArgs.parse({"model_process": "sometimes"})


def test_a_knob_the_model_cannot_decide_by_is_refused_at_the_request(gated_checkpoint, tmp_path):
    from gating.model import GatedModel

    # refused before batching: inside a batch it would fail every request batched with it
    engine = Engine(gated_checkpoint, threads=1)
    with pytest.raises(RequestError, match=f"greedy k=1000 exceeds the model's {engine.num_units} units"):
        engine.policy_for(policy="greedy", alpha=1000)
    assert engine.policy_for(policy="greedy", alpha=2).knob == 2
    model = GatedModel.load(gated_checkpoint)
    model.gate, model.policy = None, make_policy("full", None)
    model.save(tmp_path / "plain.safetensors")
    plain = Engine(tmp_path / "plain.safetensors", threads=1)  # no gate
    with pytest.raises(RequestError, match="policy 'budget' needs a gate"):
        plain.policy_for(budget=0.5)
    assert plain.policy_for().name == "full"
