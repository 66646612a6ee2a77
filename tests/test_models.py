"""The model zoo: registry, parameter counts, the property each family's paper states, and
that every family learns on digits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from study import data as sdata
from study.models import build, build_for_cell, list_models, match_width, n_params
from study.models.merge_and_run import merge_matrix
from study.train import evaluate, train_epoch

COMMON = dict(kernel=3, activation="relu", batch_norm=False)
# The stem and head every family shares; 8x8 inputs as in digits.
SKELETON = dict(head="flatten", pool=2, image_size=(8, 8))
STEMS_AND_HEADS = [(h, p) for h in ("flatten", "gap") for p in (1, 2, 4)]
VARIANTS = [("sequential", {}), ("parallel", {}), ("plain", {}),
            *[("highway", {"gate": g}) for g in ("full", "coupled", "c_only", "t_only")],
            ("merge_and_run", {}), ("deeply_fused", {}), ("deeply_fused", {"shallow": "identity"}),
            ("learned_connectivity", {"branches": 4, "active_inputs": 2})]


def _net(name, layers=3, filters=4, in_channels=1, seed=0, **extra):
    torch.manual_seed(seed)
    return build(name, in_channels=in_channels, n_classes=10, layers=layers, filters=filters,
                 **COMMON, **{**SKELETON, **extra})


def _x(n=5, c=1, hw=8, seed=1):
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


# -- registry -------------------------------------------------------------------------------
def test_every_architecture_is_registered():
    from sweep.params import ARCHITECTURES
    assert set(list_models()) == set(ARCHITECTURES)


def test_unknown_name_raises_keyerror_listing_known():
    with pytest.raises(KeyError) as e:
        build("resnet", in_channels=1, n_classes=10, layers=1, filters=4, **COMMON, **SKELETON)
    for name in list_models():
        assert name in str(e.value)


@pytest.mark.parametrize("name,extra", VARIANTS)
def test_blocks_and_order(name, extra):
    m = _net(name, layers=4, **extra).eval()
    assert isinstance(m.blocks, torch.nn.ModuleList) and len(m.blocks) >= 1
    x = _x()
    out = m(x)
    assert out.shape == (5, 10)
    assert torch.equal(m(x, list(range(len(m.blocks)))), out)


# -- residual twins ---------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2, 5])
def test_sequential_and_parallel_have_identical_n_params(layers):
    assert n_params(_net("sequential", layers)) == n_params(_net("parallel", layers))


@pytest.mark.parametrize("head,pool", STEMS_AND_HEADS)
def test_sequential_and_parallel_coincide_at_one_layer(head, pool):
    x = _x(hw=28)
    kw = dict(head=head, pool=pool, image_size=(28, 28))
    deep, shallow = _net("sequential", 1, seed=3, **kw), _net("parallel", 1, seed=3, **kw)
    for a, b in zip(deep.state_dict().values(), shallow.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(deep(x), shallow(x))


@pytest.mark.parametrize("head,pool", STEMS_AND_HEADS)
@pytest.mark.parametrize("name,extra", VARIANTS)
def test_every_family_shares_stem_and_head(name, extra, head, pool):
    # Same stem and classifier in every family, so n_params differs only by the body.
    kw = dict(head=head, pool=pool, image_size=(28, 28), filters=4)
    net, ref = _net(name, **extra, **kw), _net("sequential", **kw)
    assert n_params(net.stem) == n_params(ref.stem) and n_params(net.head) == n_params(ref.head)
    side = 28 // pool
    assert net.head.in_features == (4 * side * side if head == "flatten" else 4)
    assert net(_x(hw=28)).shape == (5, 10)


def test_pool_and_head_validation():
    with pytest.raises(ValueError, match="unknown head 'avg'; known: flatten, gap"):
        _net("sequential", head="avg")
    with pytest.raises(ValueError, match="image_size"):
        _net("sequential", image_size=None)
    with pytest.raises(ValueError, match="smaller pool"):
        _net("sequential", pool=4, image_size=(2, 2))


# -- highway ----------------------------------------------------------------------------------
@pytest.mark.parametrize("head,pool", STEMS_AND_HEADS)
def test_highway_residual_gate_is_the_residual_layer(head, pool):
    kw = dict(head=head, pool=pool)
    seq, hw = _net("sequential", 3, seed=5, **kw), _net("highway", 3, seed=5, gate="residual", **kw)
    assert n_params(hw) == n_params(seq)
    hw.stem.load_state_dict(seq.stem.state_dict())
    hw.head.load_state_dict(seq.head.state_dict())
    for h, f in zip(hw.blocks, seq.blocks):
        h.H.load_state_dict(f.state_dict())
    x = _x()
    assert torch.equal(hw(x), seq(x))


def test_highway_full_gates_saturated_open_compute_the_residual_layer():
    # The gated code path itself: T = C = sigmoid(50) == 1.0 exactly in float32.
    seq, hw = _net("sequential", 2, seed=6), _net("highway", 2, seed=6, gate="full")
    hw.stem.load_state_dict(seq.stem.state_dict())
    hw.head.load_state_dict(seq.head.state_dict())
    with torch.no_grad():
        for h, f in zip(hw.blocks, seq.blocks):
            h.H.load_state_dict(f.state_dict())
            for g in (h.T, h.C):
                g.weight.zero_()
                g.bias.fill_(50.0)
    x = _x()
    assert torch.equal(hw(x), seq(x))


@pytest.mark.parametrize("gate", ["full", "coupled", "c_only", "t_only"])
def test_highway_gates_start_near_copying(gate):
    m = _net("highway", 1, gate=gate, gate_bias=-2.0)
    layer = m.blocks[0]
    h = torch.randn(3, 4, 8, 8)
    t, c = layer.gates(h)
    if gate == "c_only":
        assert t == 1.0
    else:
        assert t.mean() < 0.3  # sigmoid(-2) = 0.12 plus the random weights' spread
    if gate == "t_only":
        assert c == 1.0
    elif gate == "coupled":
        assert torch.equal(c, 1.0 - t)
    else:
        assert c.mean() > 0.7
    extra = {"full": 2, "coupled": 1, "c_only": 1, "t_only": 1}[gate]
    assert n_params(m) == n_params(_net("sequential", 1)) + extra * (4 * 4 + 4)


# -- merge and run ----------------------------------------------------------------------------
def test_merge_matrix_is_idempotent():
    for k in (2, 3, 4):
        m = merge_matrix(k, 5)
        assert torch.allclose(m @ m, m, atol=1e-7)


@pytest.mark.parametrize("head,pool", STEMS_AND_HEADS)
def test_merge_and_run_block_with_zero_branches_is_the_idempotent_merge(head, pool):
    k = 3
    kw = dict(head=head, pool=pool)
    net = _net("merge_and_run", layers=6, branches=k, **kw)
    assert len(net.blocks) == 2 and n_params(net) == n_params(_net("sequential", 6, **kw))
    block = net.blocks[0]
    with torch.no_grad():
        for p in block.branches.parameters():
            p.zero_()  # H = relu(conv with zero weights and bias) = 0: only the linear part is left
    streams = [torch.randn(2, 4, 3, 3) for _ in range(k)]
    once = block(streams)
    for a, b in zip(once, block(once)):  # M (M s) = M s
        assert torch.allclose(a, b, atol=1e-6)
    # The module's map is M applied to the stacked, flattened streams.
    flat = torch.cat([s.reshape(-1) for s in streams])
    got = torch.cat([o.reshape(-1) for o in once])
    assert torch.allclose(merge_matrix(k, streams[0].numel()) @ flat, got, atol=1e-6)
    # With every branch zero the whole body is the merge applied again and again: K copies
    # of the stem output, summed.
    with torch.no_grad():
        for p in net.blocks.parameters():
            p.zero_()
    x = _x()
    assert torch.allclose(net.body(net.stem(x)), k * net.stem(x), atol=1e-6)


def test_merge_and_run_uneven_layers_keep_sequential_budget():
    net = _net("merge_and_run", layers=5, branches=2)
    assert [len(b.branches) for b in net.blocks] == [2, 2, 1]
    assert n_params(net) == n_params(_net("sequential", 5))


# -- deeply fused -----------------------------------------------------------------------------
@pytest.mark.parametrize("shallow", ["identity", "conv"])
def test_deeply_fused_is_a_residual_net_with_long_branches(shallow):
    net = _net("deeply_fused", layers=5, fuse_every=2, shallow=shallow)
    assert [len(b.deep) for b in net.blocks] == [2, 2, 1]
    x = _x()
    h = net.stem(x)
    for block in net.blocks:
        branch = h
        for f in block.deep:
            branch = f(branch)
        h = branch + (h if shallow == "identity" else block.shallow(h))
    expect = net.head(net.features(h))
    assert torch.allclose(net(x), expect, atol=1e-6)
    if shallow == "identity":
        assert n_params(net) == n_params(_net("sequential", 5))


# -- learned connectivity ----------------------------------------------------------------------
def _resnext(net, x):
    h = net.stem(x)
    for block in net.blocks:
        h = h + sum(f(h) for f in block.branches)
    return net.head(net.features(h))


@pytest.mark.parametrize("training", [True, False])
def test_learned_connectivity_with_k_equal_c_is_all_connected(training):
    net = _net("learned_connectivity", layers=3, branches=3, active_inputs=3).train(training)
    x = _x()
    assert torch.allclose(net(x), _resnext(net, x), atol=1e-5)
    assert net.pruned_branches == 0


def test_learned_connectivity_masks_sample_k_and_learn():
    net = _net("learned_connectivity", layers=3, branches=4, active_inputs=2).train()
    block = net.blocks[1]
    hard = net.binary_mask(block)
    assert torch.equal(hard.detach().sum(1), torch.full((4,), 2.0))
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    # Straight-through: the loss reaches the real-valued masks.
    F.cross_entropy(net(_x()), torch.arange(5)).backward()
    assert net.blocks[1].mask.grad is not None and net.blocks[1].mask.grad.abs().sum() > 0
    with torch.no_grad():
        block.mask.add_(torch.tensor([[2.0, -1.0, 0.5, 0.0]]))
    net.after_step()
    assert torch.allclose(block.mask.sum(1), torch.ones(4)) and block.mask.min() >= 0
    # Top-K: every row prefers outputs 0 and 1, so branches 2 and 3 feed nothing and are pruned.
    with torch.no_grad():
        for b in net.blocks[1:]:
            b.mask.copy_(torch.tensor([[0.4, 0.4, 0.1, 0.1]]).expand(4, 4))
    assert net.pruned_branches == 2 * 2  # branches 2 and 3 of blocks 0 and 1
    net.eval()
    assert torch.equal(net(_x()), net(_x()))


def test_learned_connectivity_freezes_for_the_last_quarter():
    net = _net("learned_connectivity", layers=2, branches=4)
    assert net.active_inputs == 2
    frozen = []
    for epoch in range(1, 9):
        net.on_epoch_start(epoch, 8)
        frozen.append(net.frozen)
    assert frozen == [False] * 6 + [True] * 2
    net.on_epoch_start(1, 1)
    assert not net.frozen
    net.train()
    net.on_epoch_start(8, 8)
    a = net.binary_mask(net.blocks[1])
    assert torch.equal(a, net.binary_mask(net.blocks[1]))  # frozen: deterministic top-K


def test_learned_connectivity_rejects_k_above_c():
    with pytest.raises(ValueError, match="active_inputs"):
        _net("learned_connectivity", branches=2, active_inputs=3)


# -- match_params -----------------------------------------------------------------------------
def _matched(base, name, extra, in_channels=3):
    config = {"architecture": name, **base, **extra, "match_params": True}
    model, width = build_for_cell(config, in_channels, 10, image_size=(8, 8))
    assert model.stem[0].out_channels == width
    return model, width


@pytest.mark.parametrize("name,extra", VARIANTS[1:])
def test_match_params_within_one_percent(name, extra):
    # At width 128 an integer width step is fine enough for 1 % in every family (GAP head:
    # learned_connectivity's matched width ~64 with a flattened head steps by ~1.2 %).
    base = dict(layers=4, filters=128, **COMMON, **{**SKELETON, "head": "gap"})
    target = n_params(build("sequential", in_channels=3, n_classes=10, **base))
    model, width = _matched(base, name, extra)
    assert abs(n_params(model) - target) <= 0.01 * target, width


@pytest.mark.parametrize("layers,filters", [(2, 8), (4, 16)])
@pytest.mark.parametrize("name,extra", VARIANTS[1:])
def test_match_params_picks_the_closest_width(name, extra, layers, filters):
    # Narrow nets cannot always reach 1 %: then the closest integer width is the answer.
    base = dict(layers=layers, filters=filters, **COMMON, **SKELETON)
    target = n_params(build("sequential", in_channels=3, n_classes=10, **base))
    model, width = _matched(base, name, extra)
    err = abs(n_params(model) - target)
    for w in (width - 1, width + 1):
        if w >= 1:
            other = build(name, in_channels=3, n_classes=10, **{**base, **extra, "filters": w})
            assert abs(n_params(other) - target) >= err


def test_match_params_off_keeps_the_width():
    config = {"architecture": "highway", "layers": 2, "filters": 8, **COMMON, "gate": "full",
              "gate_bias": -2.0, "gate_kernel": 1, "match_params": False, "dataset": "digits"}
    model, width = build_for_cell(config, 1, 10)  # image size: digits' known 8x8
    assert width == 8 and model.head.in_features == 8 * 4 * 4  # default pool 2, flattened
    assert match_width("parallel", {"layers": 2, "filters": 8, **COMMON, **SKELETON}, 1, 10) == 8


def test_match_params_search_leaves_the_seeded_init_alone():
    # The width search builds on the meta device (no RNG draws) and is cached: a seeded
    # build gives the same weights whether or not the search ran before in this process.
    config = {"architecture": "deeply_fused", "layers": 3, "filters": 24, **COMMON,
              "fuse_every": 2, "shallow": "conv", "match_params": True, "dataset": "digits"}
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_for_cell(config, 1, 10)[0].state_dict())
    torch.manual_seed(0)
    plain = build("deeply_fused", in_channels=1, n_classes=10,
                  **{**{k: v for k, v in config.items()
                        if k not in ("architecture", "match_params", "dataset")},
                     "image_size": (8, 8), "filters": models[0]["stem.0.weight"].shape[0]})
    for sd in models[1:] + [plain.state_dict()]:
        assert all(torch.equal(models[0][k], sd[k]) for k in sd)


# -- every family learns ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    # One thread: the test machines share their cores; threads contending cost more than they give.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield sdata.load("digits", val_fraction=0.2)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name,extra", VARIANTS)
def test_trains_on_digits_above_chance(digits, name, extra):
    # Short training must beat chance (0.1) clearly: with the default stem and head (max-pool
    # 2, flattened features) two epochs at lr 3e-3, batch 32 (~90 steps) are plenty.
    torch.manual_seed(0)
    model = build(name, in_channels=1, n_classes=10, layers=2, filters=8, **COMMON, **SKELETON,
                  **extra)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in (1, 2):  # the tool's own epoch and evaluation (study.train)
        train_epoch(model, opt, digits.train_x, digits.train_y, 32, seed=0, epoch=epoch, epochs=2)
    _, acc = evaluate(model, digits.val_x, digits.val_y)
    assert acc > 0.7, f"{name} {extra}: val acc {acc:.3f}"


@pytest.mark.parametrize("head,pool", STEMS_AND_HEADS)
@pytest.mark.parametrize("name,extra", VARIANTS)
def test_count_params_equals_the_built_model(name, extra, head, pool):
    # study plan counts body and skeleton apart (see count_params): same total as a real build.
    from study.models import count_params

    kw = dict(layers=3, filters=5, **COMMON, **extra, head=head, pool=pool, image_size=(28, 28))
    assert count_params(name, kw, 3, 10) == n_params(build(name, in_channels=3, n_classes=10, **kw))
