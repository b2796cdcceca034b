"""The task-vector / sparsification methods (task_arithmetic, ties, dare_*, breadcrumbs*, della*, sce).

Each method runs through a small blockwise driver (statistics passes, then block by block) and is
compared with its definition (mergekit 0.1.5's semantics) computed here independently, whole-tensor,
in float64 from the same float32 task vectors.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from soup.errors import RecipeError
from soup.methods.base import At, TensorInput, TensorParams, uniform
from soup.methods.breadcrumbs import Breadcrumbs
from soup.methods.breadcrumbs_ties import BreadcrumbsTies
from soup.methods.dare_linear import DareLinear
from soup.methods.dare_ties import DareTies
from soup.methods.della import Della
from soup.methods.della_linear import DellaLinear
from soup.methods.sce import SCE
from soup.methods.select import ExactSums, kth_largest
from soup.methods.task_arithmetic import TaskArithmetic
from soup.methods.ties import Ties

SHAPE = (48, 64)
NAME = "model.layers.0.mlp.up_proj.weight"
WEIGHTS = (0.5, 1.0, -0.3)


# --- the driver ---------------------------------------------------------------------------------

def tensor_input(xs, base, block, shape=SHAPE, name=NAME, seen=None):
    numel = xs.shape[1]

    def blocks():
        for s in range(0, numel, block):
            e = min(s + block, numel)
            xb, bb = xs[:, s:e].clone(), base[s:e].clone()
            if seen is not None:
                seen.append((weakref.ref(xb), weakref.ref(bb), e - s))
            yield At(name, shape, s, e), xb, bb

    return TensorInput(name, shape, xs.shape[0], xs.dtype, True, blocks)


def run(method, xs, base, params, block, shape=SHAPE, name=NAME):
    numel = xs.shape[1]
    if method.whole_tensor:
        block = numel
    tensor = tensor_input(xs, base, block, shape, name)
    stats = method.statistics(tensor, params)
    out = [method.block(xb, bb, params, stats, at) for at, xb, bb in tensor.blocks()]
    return torch.cat(out)


def params_for(method, seed=0, **over):
    values, per_model = {}, {}
    for key, p in method.parameters.items():
        if p.per_model:
            per_model[key] = tuple(over.pop(key, (p.default,) * 3))
        else:
            values[key] = over.pop(key, p.default)
    assert not over, over
    return TensorParams(values=values, per_model=per_model, seed=seed)


def data(dtype=torch.float32, seed=0, numel=SHAPE[0] * SHAPE[1]):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g, dtype=torch.float64)
    scales = torch.tensor([0.01, 0.02, 0.005], dtype=torch.float64).unsqueeze(1)
    xs = base + scales * torch.randn(3, numel, generator=g, dtype=torch.float64)
    return xs.to(dtype), base.to(dtype)


# --- the definitions, whole-tensor, float64 --------------------------------------------------------

def ref_deltas(xs, base):
    return (xs - base).double()  # the same task vectors, then float64


def l1_rescale(d, masked):
    before, after = d.abs().sum().item(), masked.abs().sum().item()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def ref_topk(d, density, rescale):
    if density >= 1:
        return d
    if density <= 0:
        return torch.zeros_like(d)
    k = max(1, int(density * d.numel()))
    kth = torch.topk(d.abs(), k).values[-1]
    masked = torch.where(d.abs() >= kth, d, 0.0)
    return l1_rescale(d, masked) if rescale else masked


def ref_outliers(d, density, gamma, rescale):
    if density >= 1:
        return d
    n = d.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = torch.sort(d.abs()).indices  # ascending
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom:bottom + target]] = True
    masked = torch.where(mask, d, 0.0)
    return l1_rescale(d, masked) if rescale else masked


def ref_dare(d, density, rescale, seed, i):
    if density >= 1:
        return d
    u = uniform(seed, NAME, 0, d.numel(), stream=i)
    masked = torch.where(u < density, d, 0.0)
    return l1_rescale(d, masked) if rescale else masked


def ref_della(d, density, epsilon, rescale, seed, i, shape=SHAPE):
    if density >= 1:
        return d
    rows = d.reshape(shape) if len(shape) >= 2 else d.reshape(1, -1)
    fibers = rows.movedim(1, -1)  # rank within axis 1
    flat = fibers.reshape(-1, fibers.shape[-1])
    ranks = torch.empty(flat.shape, dtype=torch.float64)
    for r in range(flat.shape[0]):
        order = torch.sort(flat[r].abs(), stable=True).indices
        ranks[r, order] = torch.arange(flat.shape[1], dtype=torch.float64)
    ranks = ranks.reshape(fibers.shape).movedim(-1, 1)
    p = (density - epsilon) + ranks / (rows.shape[1] - 1) * 2 * epsilon
    u = uniform(seed, NAME, 0, d.numel(), stream=i).reshape(rows.shape)
    masked = torch.where(u < p, rows, 0.0).reshape(-1)
    return l1_rescale(d, masked) if rescale else masked


def ref_combine(d, base, weights, elect, normalize, lam):
    w = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
    wd = d * w
    if elect:
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(wd) == sign).double()
        merged = (wd * agree).sum(0)
        div = (w * agree).sum(0)
        div[div == 0] = 1
    else:
        merged = wd.sum(0)
        div = w.sum()
        if div.abs() < 1e-8:
            div = torch.tensor(1.0, dtype=torch.float64)
    if normalize:
        merged = merged / div
    return base.double() + lam * merged


def ref_sce(xs, base, topk):
    d = ref_deltas(xs, base)
    if topk < 1:
        var = d.var(dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        if k == 0:
            d = torch.zeros_like(d)
        else:
            kth = torch.topk(var, k).values[-1]
            d = d * (var >= kth)
    energy = d.square().mean(dim=1)
    w = torch.full_like(energy, 1 / 3) if energy.sum() < 1e-6 else energy / energy.sum()
    sign = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    ew = w.unsqueeze(1) * (torch.sign(d) == sign)
    return base.double() + (d * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


def reference(method, xs, base, params, shape=SHAPE):
    d = ref_deltas(xs, base)
    dens = params["density"]
    rescale = params["rescale"]
    rows = []
    for i in range(d.shape[0]):
        if method.sparsification == "magnitude":
            rows.append(ref_topk(d[i], dens[i], rescale))
        elif method.sparsification == "magnitude_outliers":
            rows.append(ref_outliers(d[i], dens[i], params["gamma"][i], rescale))
        elif method.sparsification == "random":
            rows.append(ref_dare(d[i], dens[i], rescale, params.seed, i))
        elif method.sparsification == "della_magprune":
            rows.append(ref_della(d[i], dens[i], params["epsilon"][i], rescale, params.seed, i, shape))
        else:
            rows.append(d[i])
    return ref_combine(torch.stack(rows), base, params["weight"], method.elect, params["normalize"],
                       params["lambda"])


# --- the methods against their definitions ----------------------------------------------------------

CASES = [
    (TaskArithmetic, {}),
    (TaskArithmetic, {"normalize": True, "lambda": 0.7}),
    (Ties, {"density": (0.2, 0.5, 0.35)}),
    (Ties, {"density": (0.2, 1.0, 0.0), "rescale": True, "normalize": False, "lambda": 1.3}),
    (DareTies, {"density": (0.3, 0.6, 0.9)}),
    (DareTies, {"density": (0.3, 0.6, 0.9), "rescale": False, "normalize": True}),
    (DareLinear, {"density": (0.5, 0.25, 1.0)}),
    (Breadcrumbs, {"density": (0.3, 0.5, 0.9), "gamma": (0.01, 0.05, 0.2)}),
    (Breadcrumbs, {"density": (0.3, 0.5, 0.0), "gamma": (0.0, 0.6, 0.1), "rescale": True}),
    (BreadcrumbsTies, {"density": (0.4, 0.2, 0.6), "gamma": (0.02, 0.01, 0.1)}),
    (Della, {"density": (0.4, 0.5, 0.6), "epsilon": (0.1, 0.2, 0.15)}),
    (Della, {"density": (0.4, 0.5, 1.0), "rescale": False, "normalize": False}),
    (DellaLinear, {"density": (0.3, 0.5, 0.7), "epsilon": (0.1, 0.05, 0.2), "lambda": 0.8}),
]


@pytest.mark.parametrize("cls,over", CASES, ids=lambda v: getattr(v, "name", None) or str(v))
def test_method_matches_definition(cls, over):
    method = cls()
    xs, base = data()
    params = params_for(method, seed=7, weight=WEIGHTS, **over)
    a = run(method, xs, base, params, block=1000)
    b = run(method, xs, base, params, block=333)
    assert a.dtype == torch.float32 and a.shape == base.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), "depends on the block split"
    ref = reference(method, xs, base, params)
    torch.testing.assert_close(a.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [Ties, DareTies, Breadcrumbs, Della])
def test_float64_work_dtype(cls):
    method = cls()
    xs, base = data(torch.float64, seed=3)
    extra = {"gamma": (0.05, 0.02, 0.1)} if "gamma" in method.parameters else {}
    params = params_for(method, seed=11, weight=WEIGHTS, density=(0.3, 0.45, 0.6), **extra)
    a = run(method, xs, base, params, block=512)
    b = run(method, xs, base, params, block=4096)
    assert a.dtype == torch.float64
    assert torch.equal(a.view(torch.int64), b.view(torch.int64))
    torch.testing.assert_close(a, reference(method, xs, base, params), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
def test_sce(topk):
    method = SCE()
    xs, base = data(seed=5)
    params = params_for(method, select_topk=topk)
    a = run(method, xs, base, params, block=1000)
    b = run(method, xs, base, params, block=257)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    torch.testing.assert_close(a.double(), ref_sce(xs, base, topk), rtol=1e-6, atol=1e-6)


def test_sce_float64():
    method = SCE()
    xs, base = data(torch.float64, seed=6)
    params = params_for(method, select_topk=0.45)
    a = run(method, xs, base, params, block=700)
    torch.testing.assert_close(a, ref_sce(xs, base, 0.45), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [DareTies, DareLinear, Della, DellaLinear])
def test_seeded_methods(cls):
    method = cls()
    assert method.random
    xs, base = data(seed=2)
    p7 = params_for(method, seed=7, weight=WEIGHTS, density=(0.3, 0.5, 0.6))
    p8 = params_for(method, seed=8, weight=WEIGHTS, density=(0.3, 0.5, 0.6))
    a, b = run(method, xs, base, p7, block=500), run(method, xs, base, p7, block=500)
    c = run(method, xs, base, p8, block=500)
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert a.numpy().tobytes() != c.numpy().tobytes()
    # another tensor name draws other masks
    other = run(method, xs, base, p7, block=500, name="model.layers.1.mlp.up_proj.weight")
    assert not torch.equal(a, other)


def test_dare_keeps_density_fraction():
    """DARE keeps about ``density`` of the entries; L1 rescale scales them by about 1/density."""
    method = DareLinear()
    numel = 40_000
    xs, base = data(seed=9, numel=numel)
    xs, base = xs - base, torch.zeros_like(base)  # a zero base: the output is the merged delta
    params = params_for(method, seed=1, weight=(1.0, 0.0, 0.0), density=(0.25, 1.0, 1.0))
    out = run(method, xs, base, params, block=4096, shape=(numel,))
    d = (xs[0] - base).double()
    merged = out.double() - base.double()
    kept = merged != 0
    assert abs(kept.double().mean().item() - 0.25) < 0.01
    ratio = (merged[kept] / d[kept])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)
    assert abs(ratio[0].item() - 4.0) < 0.15
    torch.testing.assert_close(merged.abs().sum(), d.abs().sum(), rtol=1e-4, atol=0)


def test_della_1d_and_3d_shapes():
    for shape in [(3000,), (6, 20, 25)]:
        method = Della()
        numel = math.prod(shape)
        xs, base = data(seed=4, numel=numel)
        params = params_for(method, seed=3, weight=WEIGHTS, density=(0.4, 0.5, 0.6))
        out = run(method, xs, base, params, block=numel, shape=shape)
        torch.testing.assert_close(out.double(), reference(method, xs, base, params, shape),
                                   rtol=1e-6, atol=1e-6)


def test_della_epsilon_out_of_range():
    method = Della()
    xs, base = data()
    params = params_for(method, weight=WEIGHTS, density=(0.1, 0.5, 0.5), epsilon=(0.15, 0.1, 0.1))
    with pytest.raises(RecipeError, match="epsilon"):
        run(method, xs, base, params, block=1000)


def test_edge_densities():
    xs, base = data(seed=8)
    # density 1: task arithmetic; density 0: the base
    for cls in (Ties, DareTies, Breadcrumbs, Della):
        method = cls()
        full = params_for(method, weight=WEIGHTS)
        ta = params_for(TaskArithmetic(), weight=WEIGHTS, normalize=full["normalize"])
        if not method.elect:
            torch.testing.assert_close(run(method, xs, base, full, 1000),
                                       run(TaskArithmetic(), xs, base, ta, 1000), rtol=0, atol=0)
        none = params_for(method, weight=WEIGHTS, density=(0.0,) * 3)
        assert torch.equal(run(method, xs, base, none, 1000), base)


def test_ties_keeps_exactly_k_without_repeats():
    method = Ties()
    xs, base = data(seed=12)
    params = params_for(method, weight=(1.0, 0.0, 0.0), density=(0.1, 1.0, 1.0), normalize=False)
    out = run(method, xs, base, params, block=1000)
    assert int(((out - base) != 0).sum()) == int(0.1 * base.numel())


def test_parameters_match_mergekit():
    common = {"int8_mask": False, "lambda": 1.0, "weight": None, "density": 1.0}
    expect = {
        TaskArithmetic: dict(common, normalize=False, rescale=False),
        Ties: dict(common, normalize=True, rescale=False),
        DareTies: dict(common, normalize=False, rescale=True),
        DareLinear: dict(common, normalize=False, rescale=True),
        Breadcrumbs: dict(common, normalize=False, rescale=False, gamma=0.01),
        BreadcrumbsTies: dict(common, normalize=False, rescale=False, gamma=0.01),
        Della: dict(common, normalize=True, rescale=True, epsilon=0.15),
        DellaLinear: dict(common, normalize=False, rescale=True, epsilon=0.15),
        SCE: {"int8_mask": False, "select_topk": 1.0},
    }
    names = set()
    for cls, defaults in expect.items():
        assert {k: p.default for k, p in cls.parameters.items()} == defaults
        per_model = {k for k, p in cls.parameters.items() if p.per_model}
        assert per_model == ({k for k in ("weight", "density", "gamma", "epsilon") if k in defaults})
        assert {k for k, p in cls.parameters.items() if p.required} == ({"weight"} if "weight" in defaults else set())
        assert cls.needs_base and cls.reference.startswith("https://arxiv.org/abs/") and cls.description
        names.add(cls.name)
    assert names == {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                     "breadcrumbs_ties", "della", "della_linear", "sce"}


def test_missing_base():
    method = TaskArithmetic()
    xs, base = data()
    with pytest.raises(RecipeError, match="base"):
        method.block(xs, None, params_for(method, weight=WEIGHTS), None, At(NAME, SHAPE, 0, base.numel()))


# --- radix select and exact sums --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_exact(dtype):
    g = torch.Generator().manual_seed(0)
    numel = 50_000
    x = torch.randn(2, numel, generator=g, dtype=torch.float64).abs().to(dtype)
    x[:, :5000] = 0                       # zeros
    x[:, 5000:15000] = x[:, 15000:25000]  # every value twice
    x[0, 30000:30100] = 1.5               # a run of one value
    x[1, 40000:40010] = torch.finfo(dtype).tiny / 4  # subnormals
    x[1, 40010] = torch.finfo(dtype).max
    ks = [1, 2, 99, 100, 101, 12345, 40000, 44999, 45000, 45001, 49999, 50000]
    seen = []

    def passes():
        for s in range(0, numel, 1000):
            block = x[:, s:s + 1000].clone()
            seen.append(weakref.ref(block))
            yield block

    targets = [(r, k) for r in range(2) for k in ks]
    got = kth_largest(passes, dtype, targets)
    expect = [torch.sort(x[r], descending=True).values[k - 1].item() for r, k in targets]
    assert got == expect
    assert len(seen) == 50 * (2 if dtype == torch.float32 else 4)  # one pass per 16-bit digit
    assert all(ref() is None for ref in seen)  # no block outlived its pass


def test_radix_select_k_from_nonzero_count():
    x = torch.tensor([[0.0, 3.0, 0.0, 1.0, 2.0, 2.0]])
    got = kth_largest(lambda: iter([x[:, :4], x[:, 4:]]), torch.float32,
                      lambda nonzero: [(0, nonzero[0])])
    assert got == [1.0]


def test_statistics_hold_no_tensor_sized_state():
    """Ties' and SCE's statistics on a 50k tensor in blocks of 1000: blocks are dropped as the
    passes go, and what statistics returns holds only small values."""
    numel = 50_000
    xs, base = data(seed=13, numel=numel)
    for method, params in [
        (Ties(), params_for(Ties(), weight=WEIGHTS, density=(0.1, 0.2, 0.3), rescale=True)),
        (BreadcrumbsTies(), params_for(BreadcrumbsTies(), weight=WEIGHTS, density=(0.1, 0.2, 0.3))),
        (DareTies(), params_for(DareTies(), weight=WEIGHTS, density=(0.1, 0.2, 0.3))),
        (SCE(), params_for(SCE(), select_topk=0.2)),
    ]:
        seen = []
        tensor = tensor_input(xs, base, 1000, shape=(numel,), seen=seen)
        stats = method.statistics(tensor, params)
        assert seen and all(n <= 1000 for _, _, n in seen)
        assert all(a() is None and b() is None for a, b, _ in seen)
        for value in vars(stats).values():
            assert not isinstance(value, torch.Tensor)
            assert len(value) <= 3 if isinstance(value, tuple) else True
        ref = reference(method, xs, base, params, (numel,)) if not isinstance(method, SCE) \
            else ref_sce(xs, base, 0.2)
        out = run(method, xs, base, params, block=1000, shape=(numel,))
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_exact_sums_order_free():
    g = torch.Generator().manual_seed(1)
    v = (torch.randn(2, 30_000, generator=g, dtype=torch.float64) * 1e3).abs()
    v[0, :10] = 5e-324
    a, b = ExactSums(2), ExactSums(2)
    for s in range(0, 30_000, 1000):
        a.add(v[:, s:s + 1000])
    for s in reversed(range(0, 30_000, 7)):
        b.add(v[:, s:s + 7])
    assert a.totals() == b.totals() == [math.fsum(v[r].tolist()) for r in range(2)]


def test_exact_sums_of_float32_blocks_equal_the_exact_rational_sum():
    """``ExactSums`` reads float32 blocks from their own bits: the same correctly rounded sums as float64
    blocks and as an exact rational sum, subnormals, zeros and the largest float32 included."""
    from fractions import Fraction

    from soup.methods.select import ExactSums

    torch.manual_seed(0)
    x = (torch.randn(3, 4000) * 10.0 ** torch.randint(-40, 38, (3, 4000)).float()).abs()
    x[~torch.isfinite(x)] = 1.0
    x[0, :8] = torch.tensor([1e-45, 0.0, 3.4e38, 1.17549435e-38, 1.1754942e-38, 5e-40, 2.0, 0.5])
    as32, as64, mixed = ExactSums(3), ExactSums(3), ExactSums(3)
    for block in (x[:, :1000], x[:, 1000:], x[:, :7]):
        as32.add(block)
        as64.add(block.double())
    mixed.add(x)
    mixed.add(x[:, :7].double())
    exact = [float(sum(Fraction(v) for v in x[r].double().tolist()) + sum(Fraction(v) for v in x[r, :7].double().tolist()))
             for r in range(3)]
    assert as32.totals() == as64.totals() == mixed.totals() == exact


def _splitmix_reference(seed: int, name: str, i: int, stream: int) -> float:
    """splitmix64 in plain Python integers (mod 2^64), as ``uniform`` documents it."""
    import hashlib

    mask = (1 << 64) - 1
    key = int.from_bytes(hashlib.blake2b(f"{seed}\0{name}\0{stream}".encode(), digest_size=8).digest(), "little") >> 2
    z = (i * 0x9E3779B97F4A7C15 + key) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 11) / (1 << 53)


def test_the_counter_based_draws_are_splitmix64_and_the_masks_compare_exactly():
    from soup.methods.base import uniform_below

    idx = [0, 1, 2, 12345, 2 ** 40 + 7]
    for i in idx:
        assert uniform(9, NAME, i, i + 1, stream=2).item() == _splitmix_reference(9, NAME, i, 2)
    u = uniform(9, NAME, 1000, 201000, stream=1)
    for p in (0.0, 1e-12, 0.1, 1 / 3, 0.5, 0.9, 1.0):
        assert torch.equal(uniform_below(p, 9, NAME, 1000, 201000, stream=1), u < p), p
    assert uniform_below(0.3, 9, NAME, 1000, 201000, stream=1).float().mean().item() == pytest.approx(0.3, abs=0.005)
