"""Pre-training methods: registry, SPD definition, eta = 0 equivalence, losses that decrease."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from spotdiff.errors import ConfigError
from spotdiff.pretrain import METHODS, PretrainMethod, build_method, optim, spd_loss
from spotdiff.pretrain.simclr import nt_xent

TINY = {
    "simsiam": {"proj_dim": 32, "pred_dim": 8},
    "moco": {"dim": 16, "queue_size": 24, "hidden_dim": 32, "shuffle_groups": 2},
    "simclr": {"dim": 16, "hidden_dim": 32},
    "supervised": {},
}
BATCH, SIZE = 6, 32


def _build(name: str, spd: bool = False, eta: float = 0.1, seed: int = 0) -> PretrainMethod:
    torch.manual_seed(seed)
    extra = {"num_classes": 3} if name == "supervised" else {}
    if spd:  # SmoothBlend holds its stated area and smoothness at 32 px only with a larger area
        extra |= {"blend_area": (0.04, 0.08), "blend_aspect": (0.5, 2.0)}
    return build_method(name, arch="resnet18", spd=spd, eta=eta, **extra, **TINY[name])


def _views(method: PretrainMethod, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {v: torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for v in method.required_views()}


LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def test_spd_loss_definition_on_hand_made_z() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_pos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos = 1, 1
    z_neg = torch.tensor([[0.0, 1.0], [0.0, -3.0]])  # cos = 0, -1
    # mean[cos(z, z_neg) - cos(z, z_pos)] = mean[0 - 1, -1 - 1] = -1.5
    assert spd_loss(z, z_pos, z_neg).item() == pytest.approx(-1.5)
    # identical positive and negative: no signal
    assert spd_loss(z, z_pos, z_pos).item() == pytest.approx(0.0)
    # a gradient step pulls the positive towards the anchor and pushes the negative away
    cos = torch.nn.functional.cosine_similarity
    zp = torch.tensor([[1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    zn = torch.tensor([[1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    spd_loss(z, zp, zn).backward()
    with torch.no_grad():
        assert (cos(z, zp - 0.1 * zp.grad) > cos(z, zp)).all()
        assert (cos(z, zn - 0.1 * zn.grad) < cos(z, zn)).all()


def test_registry_and_recipes() -> None:
    assert METHODS == ("simsiam", "moco", "simclr", "supervised")
    m = _build("simsiam")
    assert m.recipe.optimizer == "sgd" and m.recipe.base_lr == 0.05 and m.recipe.batch_size == 512
    assert _build("moco").recipe.base_lr == 0.03
    assert _build("simclr").recipe.optimizer == "lars"
    assert isinstance(m.backbone.fc, torch.nn.Identity)
    assert "layer4.0.conv1.weight" in m.backbone.state_dict()  # torchvision keys, for export
    with pytest.raises(ConfigError, match="unknown pre-training method"):
        build_method("byol", arch="resnet18")
    with pytest.raises(ConfigError, match="queue_sz"):
        build_method("moco", arch="resnet18", queue_sz=3)
    with pytest.raises(ConfigError, match="num_classes"):
        build_method("supervised", arch="resnet18")
    with pytest.raises(ConfigError, match="eta"):
        build_method("simclr", arch="resnet18", spd=True, eta=-1.0)
    with pytest.raises(ConfigError, match="area"):
        build_method("simclr", arch="resnet18", spd=True, blend_area=(0.5, 0.1))


@pytest.mark.parametrize("name", METHODS)
def test_view_transform_returns_every_required_view(name: str) -> None:
    img = Image.new("RGB", (50, 40), (120, 30, 200))
    for spd in (False, True):
        m = _build(name, spd=spd)
        views = m.view_transform(SIZE)(img)
        assert tuple(views) == m.required_views()
        assert all(v.shape == (3, SIZE, SIZE) and v.dtype == torch.float32 for v in views.values())
        assert ("spd_neg" in views) == spd


@pytest.mark.parametrize("name", METHODS)
def test_eta_zero_reproduces_base_method(name: str) -> None:
    base, with_spd = _build(name, spd=False), _build(name, spd=True, eta=0.0)
    with_spd.load_state_dict(base.state_dict(), strict=False)
    views = _views(with_spd)
    torch.manual_seed(5)  # the same global RNG state (MoCo's key shuffle), as the loop seeds each step
    out_base = base(views, labels=LABELS)
    torch.manual_seed(5)
    out_spd = with_spd(views, labels=LABELS, generator=torch.Generator().manual_seed(0))
    assert out_base["loss_spd"].item() == 0.0
    assert out_spd["loss_spd"].item() != 0.0
    assert torch.equal(out_base["loss"], out_spd["loss"])
    out_base["loss"].backward()
    out_spd["loss"].backward()
    spd_params = dict(with_spd.named_parameters())
    compared = 0
    for pname, p in base.named_parameters():
        if p.grad is None:
            continue
        assert torch.equal(p.grad, spd_params[pname].grad), pname
        compared += 1
    assert compared > 20


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("spd", [False, True])
def test_loss_decreases_on_fixed_batch(name: str, spd: bool) -> None:
    m = _build(name, spd=spd, eta=0.5)
    views = _views(m, seed=1)
    opt = torch.optim.SGD(m.param_groups(0.05), lr=0.05, momentum=0.9)
    losses = []
    queue = m.queue.clone() if name == "moco" else None
    for _ in range(6):
        if queue is not None:  # keep MoCo's negatives fixed: with one batch its own keys would fill the queue
            m.queue.copy_(queue)
            m.queue_ptr.zero_()
        out = m(views, labels=LABELS, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.after_step()
        losses.append(out["loss"].item())
        assert torch.isfinite(out["loss"])
    assert min(losses[-2:]) < losses[0], losses


def test_spd_term_is_weighted_by_eta() -> None:
    m = _build("simclr", spd=True, eta=0.3)
    out = m(_views(m), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["loss"], out["loss_base"] + 0.3 * out["loss_spd"])
    assert -2.0 <= out["loss_spd"].item() <= 2.0


def test_supervised_spd_is_binary_cross_entropy() -> None:
    m = _build("supervised", spd=True)
    out = m(_views(m), labels=LABELS, generator=torch.Generator().manual_seed(0))
    assert out["loss_spd"].item() > 0  # BCE
    with pytest.raises(ValueError, match="labels"):
        m(_views(m), labels=None)


def test_moco_queue_and_momentum_update() -> None:
    m = _build("moco")
    queue_before = m.queue.clone()
    m(_views(m))
    assert int(m.queue_ptr) == BATCH
    assert not torch.equal(m.queue[:BATCH], queue_before[:BATCH])
    assert torch.equal(m.queue[BATCH:], queue_before[BATCH:])
    assert all(not p.requires_grad for p in m.key_backbone.parameters())
    names = {n for g in m.param_groups(0.1) for n in [id(p) for p in g["params"]]}
    assert not any(id(p) in names for p in m.key_backbone.parameters())
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    key_before = next(m.key_backbone.parameters()).clone()
    query = next(m.backbone.parameters())
    m.after_step()
    expected = 0.999 * key_before + 0.001 * query
    assert torch.allclose(next(m.key_backbone.parameters()), expected, atol=1e-6)
    for _ in range(4):  # the ring buffer wraps around without a divisibility requirement
        m(_views(m))
    assert int(m.queue_ptr) == (5 * BATCH) % 24


def test_nt_xent_matches_direct_definition() -> None:
    g = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    z = torch.cat([z1, z2])
    sim = z @ z.t() / 0.5
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        total += -(sim[i, j] - torch.logsumexp(others, 0))
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(total.item() / 8, rel=1e-5)


def test_param_groups_and_optimizers() -> None:
    simsiam = _build("simsiam")
    groups = {g["name"]: g for g in simsiam.param_groups(0.2)}
    assert groups["fixed_lr"]["fixed_lr"] and not groups["main"]["fixed_lr"]
    n_pred = sum(p.numel() for p in simsiam.predictor.parameters())
    assert sum(p.numel() for p in groups["fixed_lr"]["params"]) == n_pred

    simclr = _build("simclr")
    groups = {g["name"]: g for g in simclr.param_groups(0.3)}
    assert groups["main_no_decay"]["weight_decay"] == 0.0 and groups["main_no_decay"]["lars_exclude"]
    assert all(p.ndim <= 1 for p in groups["main_no_decay"]["params"])
    n_all = sum(p.numel() for p in simclr.parameters())
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_all


def test_recipe_optimizers_and_lars_step() -> None:
    """The loop's optimiser (spotdiff.pretrain.optim) with these methods' groups."""
    LARS = optim.LARS
    assert isinstance(optim.build_optimizer(_build("simsiam"), 0.2), torch.optim.SGD)
    assert isinstance(optim.build_optimizer(_build("simclr"), 0.3), LARS)
    w = torch.nn.Parameter(torch.full((4,), 2.0))
    b = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
        lr=1.0,
        momentum=0.9,
        weight_decay=0.5,
        trust_coefficient=0.01,
    )
    w.grad = torch.full((4,), 3.0)
    b.grad = torch.full((4,), 3.0)
    opt.step()
    d = torch.full((4,), 3.0 + 0.5 * 2.0)
    trust = 0.01 * 4.0 / torch.linalg.vector_norm(d)  # ||w|| = 4
    assert torch.allclose(w, 2.0 - trust * d)
    assert torch.allclose(b, torch.full((4,), 2.0 - 3.0))


def _nt_xent_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from spotdiff.pretrain.base import gather_no_grad

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        z1, z2 = _global_pairs()
        b = z1.shape[0] // world
        a1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        a2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss = nt_xent(a1, a2, 0.5)
        loss.backward()
        keys = gather_no_grad(torch.full((2, 3), float(rank)))
        result = {"loss": loss.detach(), "g1": a1.grad, "g2": a2.grad, "keys": keys}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _global_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    z1 = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    return z1, z2


def _run_two_ranks(worker, out_dir) -> list[dict]:
    """Run ``worker(rank, world, port, out_dir)`` on two local gloo ranks; their ``rank{r}.pt`` results."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: no re-import of torch in the children (seconds on a busy 2-core machine)
    ctx = mp.start_processes(worker, args=(2, port, str(out_dir)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("two-rank gloo workers did not finish within 120 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_nt_xent_across_two_ranks_equals_global_batch(tmp_path) -> None:
    """Under DDP each rank's NT-Xent uses every rank's projections: rank mean == single-process loss."""
    results = _run_two_ranks(_nt_xent_worker, tmp_path)
    z1, z2 = (z.clone().requires_grad_(True) for z in _global_pairs())
    full = nt_xent(z1, z2, 0.5)
    full.backward()
    assert torch.allclose((results[0]["loss"] + results[1]["loss"]) / 2, full.detach(), atol=1e-6)
    # all_gather's backward sums the ranks' gradients: local grad = world * d(global loss)/d(local z);
    # DDP's gradient averaging then yields exactly the global-batch gradient.
    for r in range(2):
        assert torch.allclose(results[r]["g1"], 2 * z1.grad[3 * r : 3 * r + 3], atol=1e-6)
        assert torch.allclose(results[r]["g2"], 2 * z2.grad[3 * r : 3 * r + 3], atol=1e-6)
        assert torch.equal(results[r]["keys"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))


@pytest.mark.parametrize("name", ["simsiam", "moco", "simclr"])
def test_spd_gradient_reaches_anchor_and_positive(name: str) -> None:
    m = _build(name, spd=True)
    views = {k: v.requires_grad_(True) for k, v in _views(m).items()}
    out = m(views, generator=torch.Generator().manual_seed(0))
    g_anchor, g_pos, g_other = torch.autograd.grad(
        out["loss_spd"], [views["view1"], views["spd_pos"], views["view2"]], allow_unused=True
    )
    assert g_anchor is not None and g_anchor.abs().sum() > 0  # anchor = view1's projection
    assert g_pos is not None and g_pos.abs().sum() > 0
    if name != "simclr":  # SimCLR's BN runs over both views at once, coupling view2 to z1
        assert g_other is None or g_other.abs().sum() == 0  # view2 is not part of SPD


# ----------------------------------------------------------------------------- MoCo shuffling BN
def _bn_batch_means(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    """Record ``(inputs, per-channel batch mean)`` of every training call of the BN layer ``module``."""
    return module.register_forward_hook(
        lambda mod, args, out: calls.append((args[0].detach(), args[0].detach().mean(dim=(0, 2, 3))))
    )


def test_moco_query_and_its_key_are_normalised_with_different_statistics() -> None:
    """One process: shuffled BN sub-batches; without them the pair would share batch statistics."""
    m = _build("moco")  # shuffle_groups=2; the key encoder starts as an exact copy of the query encoder
    images = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    query_calls, key_calls = [], []
    hooks = [_bn_batch_means(m.backbone.bn1, query_calls), _bn_batch_means(m.key_backbone.bn1, key_calls)]
    torch.manual_seed(0)
    m({"view1": images, "view2": images})  # the key's image is the query's image
    for h in hooks:
        h.remove()
    assert len(query_calls) == 2 and len(key_calls) == 2  # two BN sub-batches each

    def stats_of(calls: list, row: torch.Tensor) -> torch.Tensor:
        (mean,) = [mean for x, mean in calls if any(torch.equal(row, r) for r in x)]
        return mean

    rows = torch.cat([x for x, _ in query_calls])  # bn1 inputs: identical in both encoders
    assert len(rows) == 8
    for row in rows:
        assert not torch.allclose(stats_of(query_calls, row), stats_of(key_calls, row))


def test_moco_shuffled_keys_come_back_in_order() -> None:
    """With BN on running statistics the grouping cannot matter: keys must equal the plain pass."""
    m = _build("moco")
    images = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    m.key_backbone.eval()
    torch.manual_seed(0)
    keys = m._keys(images)
    plain = torch.nn.functional.normalize(m.key_head(m.key_backbone(images)), dim=1)
    assert torch.allclose(keys, plain, atol=1e-6)


def test_moco_refuses_a_queue_the_data_cannot_fill_and_too_small_groups() -> None:
    m = _build("moco")  # queue 24
    m.check_batches(images_per_epoch=30, batch_size=6, world_size=1)
    with pytest.raises(ConfigError, match=r"queue_size=24 .*need 1 <= queue_size <= 18"):
        m.check_batches(images_per_epoch=24, batch_size=6, world_size=1)
    with pytest.raises(ConfigError, match=r"shuffle_groups=2: need batch >= 4"):
        m.check_batches(images_per_epoch=100, batch_size=3, world_size=1)
    m.check_batches(images_per_epoch=100, batch_size=4, world_size=2)  # DDP: groups are the processes
    with pytest.raises(ConfigError, match="shuffle_groups"):
        build_method("moco", arch="resnet18", shuffle_groups=1)
    # under DDP on GPU the loop must not give MoCo SyncBatchNorm (shared statistics = the leak)
    assert not m.sync_batchnorm and _build("simclr").sync_batchnorm


def _shuffle_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from spotdiff.pretrain.moco import shuffled_across_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0 if rank == 0 else 99)  # only rank 0's permutation may count
        images = torch.arange(4.0).view(4, 1) + 10 * rank  # rows 0..3 on rank 0, 10..13 on rank 1
        seen = []

        def encode(x: torch.Tensor) -> torch.Tensor:  # BN-like: the output depends on the sub-batch
            seen.append(x.clone())
            return torch.cat([x, x.mean(dim=0, keepdim=True).expand_as(x)], dim=1)

        out = shuffled_across_ranks(encode, images, rank, world)
        torch.save({"out": out, "seen": seen[0], "images": images}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_moco_ddp_shuffle_spans_ranks_and_unshuffles(tmp_path) -> None:
    """Two gloo ranks: each encodes a slice of one global permutation; keys come back in order."""
    results = _run_two_ranks(_shuffle_worker, tmp_path)
    seen = [r["seen"].flatten().tolist() for r in results]
    assert sorted(seen[0] + seen[1]) == [0, 1, 2, 3, 10, 11, 12, 13]  # one permutation, split in two
    assert set(seen[0]) != {0, 1, 2, 3}  # seed 0: the sub-batches mix the ranks' images
    for r in results:
        assert torch.equal(r["out"][:, 0], r["images"][:, 0])  # own rows, own order
        sub_batch_means = {sum(s) / 4 for s in seen}
        assert set(r["out"][:, 1].tolist()) <= sub_batch_means


def test_simsiam_random_init_zeroes_residual_branches_like_torchvision(tmp_path) -> None:
    """SimSiam's random init equals torchvision's ``zero_init_residual=True``; loaded weights stay as they are."""
    from torchvision.models import resnet18

    from spotdiff.pretrain.export import write_backbone

    torch.manual_seed(3)
    reference = resnet18(zero_init_residual=True).state_dict()
    torch.manual_seed(3)
    m = build_method("simsiam", arch="resnet18", **TINY["simsiam"])
    for key, value in m.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert m.backbone.layer1[0].bn2.weight.abs().sum() == 0
    torch.manual_seed(3)
    assert build_method("moco", arch="resnet18", **TINY["moco"]).backbone.layer1[0].bn2.weight.abs().sum() > 0
    torch.manual_seed(3)
    weights = resnet18()
    write_backbone(weights.state_dict(), "resnet18", tmp_path / "w.safetensors", {})
    loaded = build_method("simsiam", arch="resnet18", weights=tmp_path / "w.safetensors", **TINY["simsiam"])
    assert torch.equal(loaded.backbone.layer1[0].bn2.weight, weights.layer1[0].bn2.weight)
