"""Static pruners on tiny models: channel counts, shapes, and each method's own property."""
import pytest
import torch

from gating.flops import profile_backbone
from gating.model import GatedModel
from training.pruning.criteria import CRITERIA, Genetic, Lasso, _contributions, inner_activation
from training.pruning.magnitude import CSR, magnitude_prune
from training.pruning.pruner import ChannelPruner, _knapsack
from training.pruning.surgery import prune_inner_channels, prune_stage_channels, stream_readers
from training.pruning.surgery import stages as stages_of
from tests.conftest import make_backbone

SAMPLE = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", CRITERIA.names())
@pytest.mark.parametrize("ratio,stages", [(0.3, False), (0.5, False), (0.5, True)])
def test_every_channel_method_meets_the_ratio_with_smaller_tensors(method, ratio, stages):
    backbone = make_backbone("resnet20")
    full = profile_backbone(backbone).full
    pruned = ChannelPruner(CRITERIA.get(method)(), ratio, stages=stages).prune(backbone, SAMPLE)
    removed = 1 - profile_backbone(pruned).full / full
    assert removed == pytest.approx(ratio, abs=0.03)
    for unit, width in zip(pruned.units, pruned.spec.inner_widths):
        assert unit.conv1.weight.shape[0] == unit.bn1.num_features == unit.conv2.weight.shape[1] == width >= 1
    expected = tuple(round((1 - ratio) ** 0.5 * w) if stages else w for w in (16, 32, 64))
    assert (pruned.spec.stage_widths or (16, 32, 64)) == expected
    for s, group in enumerate(stages_of(pruned)):
        assert all(pruned.units[i].conv2.out_channels == expected[s] for i in group)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in backbone.parameters())
    with torch.no_grad():
        assert pruned(SAMPLE).shape == (32, 10)
    model = GatedModel(pruned)  # a pruned backbone is an ordinary gated-model backbone
    keep = torch.rand(32, model.num_units, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        from gating.executor import execute
        assert torch.allclose(execute(pruned, SAMPLE, keep), execute(pruned, SAMPLE, keep, "mask"), atol=1e-5)


def _spread_bn(backbone):
    """Non-trivial BN statistics, so that a wrong channel index changes outputs."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return backbone.eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_stage_surgery_equals_zeroing_those_stream_channels_everywhere(channels_last):
    backbone = _spread_bn(make_backbone("resnet20"))
    g = torch.Generator().manual_seed(3)
    keep = [torch.randperm(w, generator=g)[: w * 2 // 3] for w in (16, 32, 64)]
    dropped = [torch.ones(w, dtype=torch.bool) for w in (16, 32, 64)]
    for d, k in zip(dropped, keep):
        d[k] = False
    stage_of = {i: s for s, group in enumerate(stages_of(backbone)) for i in group}

    def zeroed(x):  # the unpruned network with every writer's output zero on the dropped channels
        h = backbone.stem(x).clone()
        h[:, dropped[0]] = 0
        for i, unit in enumerate(backbone.units):
            h = unit(h).clone()
            h[:, dropped[stage_of[i]]] = 0
        return backbone.head(h)

    pruned = prune_stage_channels(backbone, keep)
    assert pruned.spec.stage_widths == (10, 21, 42)
    assert all(u.sources is None for u in pruned.units), "channels ordered so shortcuts slice, not gather"
    assert pruned.spec.inner_widths == tuple(u.conv1.out_channels for u in backbone.units)
    x = SAMPLE
    if channels_last:
        pruned, x = pruned.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(pruned(x), zeroed(SAMPLE), atol=1e-4)
    # the spec alone rebuilds it (the shortcut index maps travel in the spec, not the weights)
    from gating.backbones import ArchSpec, build_backbone
    rebuilt = build_backbone(ArchSpec.from_dict(pruned.spec.to_dict()))
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(SAMPLE), zeroed(SAMPLE), atol=1e-4)


def test_a_shortcut_that_needs_a_gather_copies_the_named_channels_in_both_layouts():
    from gating.backbones import ArchSpec, build_backbone
    first = (5, -1, 0, 3, -1, 15) + (-1,) * 26  # not a slice: scattered, out of order
    model = build_backbone(ArchSpec("resnet20", stage_widths=(16, 32, 64),
                                    shortcut_sources=(first, tuple(range(32)) + (-1,) * 32))).eval()
    unit = model.units[3]
    assert unit.sources is not None and model.units[6].sources is None  # the second one is a slice
    x = torch.randn(2, 16, 8, 8)
    for y in (unit.shortcut(x), unit.shortcut(x.contiguous(memory_format=torch.channels_last))):
        for j, c in enumerate(first):
            expected = x[:, c, ::2, ::2] if c >= 0 else torch.zeros(2, 4, 4)
            assert torch.equal(y[:, j], expected)
    assert unit.shortcut(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)


def test_bad_shortcut_sources_are_refused():
    from gating.backbones import ArchSpec, build_backbone
    with pytest.raises(ValueError, match="shortcut sources must be 32 channel indices"):
        build_backbone(ArchSpec("resnet20", stage_widths=(16, 32, 64), shortcut_sources=((16,) * 32, (-1,) * 64)))
    with pytest.raises(ValueError, match="cannot narrow"):
        build_backbone(ArchSpec("resnet20", stage_widths=(16, 12, 64)))
    with pytest.raises(ValueError, match="stage 1: invalid channel indices"):
        prune_stage_channels(make_backbone("resnet20"), [torch.arange(4), torch.tensor([1, 1]), torch.arange(8)])


def test_stream_readers_are_the_convolutions_fed_by_each_stage():
    backbone = make_backbone("resnet20")
    assert stages_of(backbone) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert stream_readers(backbone) == [[0, 1, 2, 3], [4, 5, 6], [7, 8]]
    widths = [16, 32, 64]
    for s, readers in enumerate(stream_readers(backbone)):
        assert all(backbone.units[i].conv1.in_channels == widths[s] for i in readers)


def test_lasso_stream_refit_beats_the_same_stream_channels_without_it():
    import copy
    backbone = _spread_bn(make_backbone("resnet20"))
    counts = ChannelPruner(Lasso(), 0.5, stages=True).stage_keep_counts(backbone)
    keep = [s.topk(k).indices for s, k in zip(Lasso().stream_scores(backbone, SAMPLE, counts), counts)]
    inputs = backbone.unit_inputs(SAMPLE)[0]

    def error(model):  # every reader's conv1 output on the unpruned inputs, the dropped channels zeroed
        total = 0.0
        with torch.no_grad():
            for k, readers in zip(keep, stream_readers(backbone)):
                for i in readers:
                    x = inputs[i]
                    mask = torch.zeros(x.shape[1])
                    mask[k] = 1
                    ref = backbone.units[i].conv1(x)
                    total += float((model.units[i].conv1(x * mask.view(1, -1, 1, 1)) - ref).pow(2).mean())
        return total

    refit = copy.deepcopy(backbone)
    Lasso().reconstruct_stream(refit, keep, SAMPLE)
    assert error(refit) < error(backbone)


@pytest.mark.parametrize("method", CRITERIA.names())
def test_every_method_scores_every_stream_channel(method):
    backbone = _spread_bn(make_backbone("resnet20"))
    scores = CRITERIA.get(method)().stream_scores(backbone, SAMPLE, [11, 23, 45])
    assert [s.shape for s in scores] == [(16,), (32,), (64,)]
    assert all(torch.isfinite(s).all() for s in scores)
    if method == "genetic":  # a mask search: exactly the requested channels marked
        assert [int((s >= 1).sum()) for s in scores] == [11, 23, 45]


@pytest.mark.parametrize("method", CRITERIA.names())
def test_sensitivity_allocation_meets_the_ratio_with_aligned_widths_and_removed_units(method):
    backbone = make_backbone("resnet20")
    full = profile_backbone(backbone).full
    pruner = ChannelPruner(CRITERIA.get(method)(), 0.5, allocation="sensitivity", align=16)
    pruned = pruner.prune(backbone, SAMPLE)
    assert 0.5 <= 1 - profile_backbone(pruned).full / full < 0.6
    widths = pruned.spec.inner_widths
    assert len(widths) == 9 and all(w % 16 == 0 for w in widths)
    assert widths[3] >= 16 and widths[6] >= 16  # down-sampling units change the shape: never removed
    assert pruned.num_units == sum(w > 0 for w in widths)
    assert [u.conv1.out_channels for u in pruned.units] == [w for w in widths if w]
    with torch.no_grad():
        assert pruned(SAMPLE).shape == (32, 10)
    from gating.backbones import build_backbone
    rebuilt = build_backbone(pruned.spec)  # the spec alone rebuilds it (removed units included)
    rebuilt.load_state_dict(pruned.state_dict())


def test_removing_a_unit_equals_skipping_it_and_partial_cuts_equal_zeroed_channels():
    from gating.executor import execute

    backbone = make_backbone("resnet20")
    keep = [torch.arange(u.conv1.out_channels) for u in backbone.units]
    keep[1], keep[4], keep[7] = torch.tensor([], dtype=torch.long), torch.tensor([0, 5, 9]), keep[7][::2]
    pruned = prune_inner_channels(backbone, keep)
    assert pruned.spec.inner_widths == (16, 0, 16, 32, 3, 32, 64, 32, 64) and pruned.num_units == 8
    zeroed = _zero_inner(backbone, {4: keep[4], 7: keep[7]})
    skip_1 = torch.ones(32, 9, dtype=torch.bool)
    skip_1[:, 1] = False
    with torch.no_grad():
        assert torch.allclose(pruned(SAMPLE), execute(zeroed, SAMPLE, skip_1), atol=1e-5)
        again = prune_inner_channels(pruned, [torch.arange(u.conv1.out_channels) for u in pruned.units])
        assert again.spec.inner_widths == pruned.spec.inner_widths  # positions survive a second cut
        assert torch.allclose(again(SAMPLE), pruned(SAMPLE), atol=1e-5)
        keep_some = torch.rand(32, pruned.num_units, generator=torch.Generator().manual_seed(1)) < 0.5
        assert torch.allclose(execute(pruned, SAMPLE, keep_some), execute(pruned, SAMPLE, keep_some, "mask"), atol=1e-5)
    assert GatedModel(pruned).flops.full < GatedModel(backbone).flops.full  # recounted without the removed unit
    with pytest.raises(ValueError, match="unit 3 changes the shape"):
        prune_inner_channels(backbone, [torch.tensor([], dtype=torch.long) if i == 3 else k
                                        for i, k in enumerate(keep)])


def _zero_inner(backbone, keep: dict):
    """A copy whose unit i outputs zero on inner channels outside keep[i] (conv1 and bn1 zeroed there)."""
    import copy

    out = copy.deepcopy(backbone)
    with torch.no_grad():
        for i, k in keep.items():
            drop = torch.ones(out.units[i].conv1.out_channels, dtype=torch.bool)
            drop[k] = False
            out.units[i].conv1.weight[drop] = 0
            out.units[i].bn1.bias[drop] = 0
            out.units[i].bn1.running_mean[drop] = 0
    return out


def test_sensitivity_removes_the_unit_whose_residual_is_dead_first():
    backbone = make_backbone("resnet20")
    with torch.no_grad():  # unit 7's residual branch outputs exactly zero: removing it changes nothing
        backbone.units[7].bn2.weight.zero_()
        backbone.units[7].bn2.bias.zero_()
    profile = profile_backbone(backbone)
    ratio = 0.9 * profile.unit_run[7] / profile.full  # less than one unit 7: one removal is enough
    pruned = ChannelPruner(CRITERIA.get("l1")(), ratio, allocation="sensitivity", align=8).prune(backbone, SAMPLE)
    assert pruned.spec.inner_widths == (16, 16, 16, 32, 32, 32, 64, 0, 64)
    with torch.no_grad():
        assert torch.allclose(pruned(SAMPLE), backbone(SAMPLE), atol=1e-5)


def test_knapsack_is_optimal_against_brute_force():
    import itertools

    g = torch.Generator().manual_seed(3)
    costs = [sorted(torch.rand(3, generator=g).tolist(), reverse=True) for _ in range(5)]
    flops = [[0.0, 1.0 + i * 0.3, 2.0 + i * 0.5] for i in range(5)]
    for i in range(5):
        costs[i][2] = 0.0  # the full width changes nothing
    budget = 5.0
    best = min((sum(costs[i][j] for i, j in enumerate(pick)), pick)
               for pick in itertools.product(range(3), repeat=5)
               if sum(flops[i][j] for i, j in enumerate(pick)) <= budget)
    pick = _knapsack(costs, flops, budget)
    assert sum(flops[i][j] for i, j in enumerate(pick)) <= budget
    assert sum(costs[i][j] for i, j in enumerate(pick)) == pytest.approx(best[0])
    assert _knapsack(costs, [[9.0] * 3] * 5, budget) is None
    # a network no unit matters to (every cost 0): keep as much as the budget allows, do not over-prune
    flat = _knapsack([[0.0] * 3] * 5, flops, budget)
    assert sum(flops[i][j] for i, j in enumerate(flat)) > budget - 1.0


def test_uniform_allocation_counts():
    backbone = make_backbone("resnet20")
    counts = ChannelPruner(CRITERIA.get("l1")(), 0.5).keep_counts(backbone)
    assert counts == [8, 8, 8, 16, 16, 16, 32, 32, 32]


def test_surgery_keeping_every_channel_is_exact_and_l1_keeps_the_largest_filters():
    backbone = make_backbone("resnet20")
    same = prune_inner_channels(backbone, [torch.arange(u.conv1.out_channels).flip(0) for u in backbone.units])
    with torch.no_grad():
        assert torch.allclose(same(SAMPLE), backbone(SAMPLE), atol=1e-5)
    keep = ChannelPruner(CRITERIA.get("l1")(), 0.5).select(backbone, None)
    norms = backbone.units[0].conv1.weight.abs().sum((1, 2, 3))
    assert set(keep[0].tolist()) == set(norms.topk(8).indices.tolist())


def test_slimming_removes_zero_gamma_channels_without_changing_outputs():
    backbone = make_backbone("resnet20")
    with torch.no_grad():
        for unit in backbone.units:  # a network-slimming-trained model: a quarter of gammas driven to 0
            c = unit.bn1.num_features
            unit.bn1.weight[: c // 4] = 0
            unit.bn1.bias[: c // 4] = -1.0  # relu(beta) = 0: those channels contribute nothing
        before = backbone(SAMPLE)
    from training.pruning.surgery import inner_flops_per_channel
    profile = profile_backbone(backbone)
    zero_cost = sum(c * (u.bn1.num_features // 4) for c, u in zip(inner_flops_per_channel(backbone, profile),
                                                                  backbone.units))
    keep = ChannelPruner(CRITERIA.get("slimming")(), zero_cost / profile.full - 1e-6).select(backbone, None)
    for unit, k in zip(backbone.units, keep):  # exactly the zero-gamma channels are gone
        c = unit.bn1.num_features
        assert k.tolist() == list(range(c // 4, c))
    with torch.no_grad():
        exact = prune_inner_channels(backbone, keep)(SAMPLE)
    assert torch.allclose(exact, before, atol=1e-4)


def test_hrank_scores_are_feature_map_ranks():
    backbone = make_backbone("resnet20")
    scores = CRITERIA.get("hrank")().scores(backbone, SAMPLE, [8] * 9)
    assert all(((s >= 0) & (s < 33)).all() for s in scores)
    with torch.no_grad():
        a = inner_activation(backbone.units[0], backbone.stem(SAMPLE))
    rank = torch.linalg.matrix_rank(a.double()).float().mean(0)
    extra = scores[0] - rank  # the L1 tie-break: under half the gap between mean ranks over 32 images
    assert ((extra >= 0) & (extra <= 0.5 / 32 + 1e-5)).all()
    w = backbone.units[0].conv1.weight.abs().sum((1, 2, 3))
    tied = rank == rank.max()
    assert tied.sum() > 1
    assert torch.equal(scores[0][tied].argsort(), w[tied].argsort())


def test_lasso_on_a_unit_that_contributes_nothing_scores_without_nan():
    c = 8
    scores = Lasso()._select_gram(torch.zeros(c, c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64),
                                  3, torch.zeros(c))
    assert torch.isfinite(scores).all()
    scores = Lasso()._select_gram(torch.zeros(c, c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64),
                                  3, torch.arange(c, dtype=torch.float32))
    assert scores.topk(3).indices.sort().values.tolist() == [5, 6, 7]


def test_lasso_least_squares_beats_the_same_channels_without_it():
    backbone = make_backbone("resnet20")
    unit = backbone.units[4]
    with torch.no_grad():
        x = backbone.unit_inputs(SAMPLE)[0][4]
        keep = CRITERIA.get("lasso")().scores(backbone, SAMPLE, [8] * 3 + [8] * 3 + [16] * 3)[4].topk(8).indices
        reference = unit.bn2(unit.conv2(inner_activation(unit, x)))

        def error(u):
            a = inner_activation(u, x)
            mask = torch.zeros(a.shape[1])
            mask[keep] = 1
            return (u.bn2(u.conv2(a * mask.view(1, -1, 1, 1))) - reference).pow(2).mean()

        plain = error(unit)
        import copy
        rebuilt = copy.deepcopy(unit)
        Lasso().reconstruct(rebuilt, keep, x)
        assert error(rebuilt) < plain


def test_genetic_search_is_no_worse_than_its_l1_seed():
    backbone = make_backbone("resnet20")
    unit = backbone.units[1]
    with torch.no_grad():
        x = backbone.unit_inputs(SAMPLE)[0][1]
        g = torch.Generator().manual_seed(0)
        best = Genetic()._search(unit, x, 8, g)
        z, _ = _contributions(unit, x, Genetic.positions, torch.Generator().manual_seed(0))
    scale = unit.bn2.weight / (unit.bn2.running_var + unit.bn2.eps).sqrt()
    z = (z.view(16, -1, 16) * scale).reshape(16, -1).double()

    def err(keep):
        d = torch.ones(16, dtype=torch.double)
        d[keep] = 0
        return float(d @ (z @ z.T).detach() @ d)

    l1 = unit.conv1.weight.abs().sum((1, 2, 3)).topk(8).indices
    assert len(best) == 8 and err(best) <= err(l1) + 1e-9


def test_magnitude_sparsity_and_csr_round_trip():
    backbone = make_backbone("resnet20")
    y = torch.randint(0, 10, (32,))
    result = magnitude_prune(backbone, 0.6, SAMPLE, y)
    assert result["sparsity"] == pytest.approx(0.6, abs=0.01)
    for name, layer in backbone.named_modules():
        if name in result["csr"]:
            csr = result["csr"][name]
            assert torch.equal(csr.to_dense(), layer.weight)
            a, n = int((layer.weight != 0).sum()), layer.weight.shape[0]
            assert csr.numbers == 2 * a + n + 1
    assert result["csr_numbers"] < result["dense_numbers"]


def test_magnitude_pruning_again_keeps_earlier_zeros_and_meets_its_target():
    """Iterative pruning holds every zero: a second step must build on them, not re-allocate
    from scratch (which left layers sparser than planned and the total over target)."""
    backbone = make_backbone("resnet20")
    y = torch.randint(0, 10, (32,))
    first = magnitude_prune(backbone, 0.3, SAMPLE, y)
    layers = dict(backbone.named_modules())
    layers["units.4.conv1"].weight.data[:, :8] = 0  # half a layer gone, as an earlier step may leave it
    held = {n: layers[n].weight == 0 for n in first["csr"]}
    second = magnitude_prune(backbone, 0.6, SAMPLE, y)
    assert second["sparsity"] == pytest.approx(0.6, abs=0.01)
    for name, zero in held.items():
        assert (layers[name].weight[zero] == 0).all()
        assert second["layer_sparsity"][name] >= float(zero.float().mean()) - 1e-9


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_the_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="ratio must be in \\(0, 1\\)"):
        ChannelPruner(CRITERIA.get("l1")(), ratio)


def test_prune_command_refuses_bad_input_before_work(tmp_path):
    from gating.checkpoint import ModelCard
    from gating.gates import build_gate
    from training.pruning.run import validate

    card = ModelCard(arch={}, class_names=["a"] * 10, input_size=(3, 32, 32), mean=(0,) * 3, std=(1,) * 3)
    backbone = make_backbone("resnet20")
    GatedModel(backbone, card=card).save(tmp_path / "b.safetensors")
    GatedModel(backbone, build_gate("mlp", backbone), card=card).save(tmp_path / "g.safetensors")
    GatedModel(make_backbone("resnet18"), card=card).save(tmp_path / "tv.safetensors")
    validate("l1", 0.5, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="unknown pruning method 'l2'"):
        validate("l2", 0.5, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="--ratio must be in"):
        validate("l1", 1.0, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="--align must be >= 1, got 0"):
        validate("l1", 0.5, tmp_path / "b.safetensors", align=0)
    with pytest.raises(ValueError, match="unknown --allocation 'even'"):
        validate("l1", 0.5, tmp_path / "b.safetensors", allocation="even")
    with pytest.raises(ValueError, match="is a gated model"):
        validate("l1", 0.5, tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match="not a CIFAR ResNet"):
        validate("hrank", 0.5, tmp_path / "tv.safetensors")


def test_ista_removal_absorbs_beta_of_zero_gamma_channels():
    from training.pruning.ista import remove_zero_gamma

    backbone = make_backbone("resnet20")
    with torch.no_grad():
        for unit in backbone.units:
            c = unit.bn1.num_features
            unit.bn1.weight[: c // 4] = 0  # selected gammas at zero
            unit.bn1.bias[: c // 4] = torch.linspace(-0.5, 1.0, c // 4)  # some with relu(beta) > 0
        x = backbone.unit_inputs(SAMPLE)[0]
        before = [u.bn2(u.conv2(torch.relu(u.bn1(u.conv1(h))))) for u, h in zip(backbone.units, x)]
        out_before = backbone(SAMPLE)
    pruned = remove_zero_gamma(backbone)
    assert pruned.spec.inner_widths == tuple(3 * u.bn1.num_features // 4 for u in backbone.units)
    with torch.no_grad():
        for u, h, ref in zip(pruned.units, x, before):
            after = u.residual(h)
            assert torch.allclose(after[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-4), "interior exact"
        # with beta <= 0 the removed channels contribute nothing, so the whole network is unchanged
        for unit in backbone.units:
            unit.bn1.bias[: unit.bn1.num_features // 4] = -0.3
        out_before = backbone(SAMPLE)
        assert torch.allclose(remove_zero_gamma(backbone)(SAMPLE), out_before, atol=1e-4)


def test_ista_removal_leaves_its_input_alone_and_keeps_a_dead_unit_s_bn2_shift():
    from training.pruning.ista import remove_zero_gamma

    backbone = make_backbone("resnet20")
    with torch.no_grad():
        unit = backbone.units[1]  # an identity unit whose every gamma is zero: its branch is bn2's shift alone
        unit.bn1.weight.zero_()
        unit.bn1.bias.fill_(-0.3)
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        out_before = backbone(SAMPLE)
    pruned = remove_zero_gamma(backbone)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items()), "the input is not changed"
    assert pruned.spec.inner_widths[1] == 1, "one channel kept, so bn2 still adds the branch's constant"
    with torch.no_grad():
        assert torch.allclose(pruned(SAMPLE), out_before, atol=1e-4)


@pytest.mark.parametrize("allocation,ratio", [("uniform", 0.97), ("sensitivity", 0.99)])
def test_a_ratio_out_of_reach_is_refused_not_missed(allocation, ratio):
    pruner = ChannelPruner(CRITERIA.get("l1")(), ratio, allocation=allocation)
    with pytest.raises(ValueError, match=f"ratio {ratio} is out of reach: .* at most 0\\.[0-9]+ of this backbone"):
        pruner.prune(make_backbone("resnet20"), SAMPLE)


def test_magnitude_sparsity_above_the_per_layer_cap_is_refused():
    with pytest.raises(ValueError, match="sparsity target must be in \\(0, 0.98\\]"):
        magnitude_prune(make_backbone("resnet20"), 0.99, SAMPLE, torch.zeros(32, dtype=torch.long))


def test_ista_training_drives_whole_channels_to_exactly_zero():
    from training.data import ImageSet
    from training.pruning.ista import IstaConfig, ista_train

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (64,), generator=g), [str(i) for i in range(10)])
    backbone = make_backbone("resnet20").train()
    total = sum(u.bn1.num_features for u in backbone.units)
    ista_train(backbone, data, IstaConfig(rho=4.0, epochs=2, batch_size=32, lr=0.05))
    zeros = sum(int((u.bn1.weight == 0).sum()) for u in backbone.units)
    assert 0 < zeros < total, "the proximal step yields exact zeros, not a dead network"
