"""The geometric merge methods (linear, slerp, nuslerp, multislerp, karcher, model_stock, nearswap,
arcee_fusion, ram, ramplus_tl) against their definitions, computed here whole-tensor in float64.

Each method runs through a tiny driver: the flat tensors split into blocks of a chosen size, a
``TensorInput`` whose passes yield those blocks, ``statistics`` then ``block`` per block, concatenated.
The outputs must match the definition and must not depend on the block size.
"""

from __future__ import annotations

import pytest
import torch

from soup.errors import RecipeError
from soup.methods.arcee_fusion import ArceeFusion
from soup.methods.base import At, TensorInput, TensorParams
from soup.methods.karcher import Karcher
from soup.methods.linear import Linear
from soup.methods.model_stock import ModelStock
from soup.methods.multislerp import MultiSlerp
from soup.methods.nearswap import NearSwap
from soup.methods.nuslerp import NuSlerp
from soup.methods.ram import Ram
from soup.methods.ramplus_tl import RamPlusTL
from soup.methods.slerp import Slerp

SHAPE = (48, 64)
BLOCKS = (257, 1000)  # neither divides a row (64) nor the tensor (3072)


# ---------------------------------------------------------------------------------------------- driver

def merge(method, xs: torch.Tensor, base: torch.Tensor | None, block_size: int, values=None,
          per_model=None, dtype=torch.float32) -> torch.Tensor:
    """Run ``method`` over the tensor split in blocks of ``block_size`` flat positions."""
    shape = tuple(xs.shape[1:])
    n = xs.shape[0]
    flat = xs.reshape(n, -1).to(dtype)
    flat_base = None if base is None else base.reshape(-1).to(dtype)
    numel = flat.shape[1]
    passes = []

    def blocks():
        passes.append(1)
        for start in range(0, numel, block_size):
            stop = min(numel, start + block_size)
            yield (At("t", shape, start, stop), flat[:, start:stop].clone(),
                   None if flat_base is None else flat_base[start:stop].clone())

    resolved = {k: p.default for k, p in method.parameters.items() if not p.per_model}
    resolved.update(values or {})
    params = TensorParams(values=resolved, per_model={k: tuple(v) for k, v in (per_model or {}).items()})
    tensor = TensorInput("t", shape, n, dtype, base is not None, blocks)
    stats = method.statistics(tensor, params)
    outs = []
    for at, x, b in blocks():
        out = method.block(x, b, params, stats, at)
        assert out.shape == (at.stop - at.start,) and out.dtype == dtype
        outs.append(out)
    return torch.cat(outs).reshape(shape)


def models(n: int, shape=SHAPE, seed: int = 0, noise: float = 0.02):
    """A base (values ~ N(0, 0.1)) and n fine-tunes = base + small noise, float32."""
    g = torch.Generator().manual_seed(seed)
    base = 0.1 * torch.randn(shape, generator=g)
    xs = base + noise * torch.randn((n, *shape), generator=g)
    return xs, base


def check(method, xs, base, reference, values=None, per_model=None, atol=2e-7, rtol=2e-6):
    """Against the float64 reference in float32 and float64 work dtypes, and block-size invariance."""
    outs = [merge(method, xs, base, bs, values, per_model) for bs in BLOCKS]
    whole = merge(method, xs, base, xs[0].numel(), values, per_model)
    for out in outs:
        assert torch.equal(out, whole), "float32 output depends on the block size"
    torch.testing.assert_close(whole.double(), reference, atol=atol, rtol=rtol)
    out64 = [merge(method, xs, base, bs, values, per_model, dtype=torch.float64) for bs in BLOCKS]
    torch.testing.assert_close(out64[0], out64[1], atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(out64[0], reference, atol=1e-13, rtol=1e-12)
    return whole


def f64(xs, base):
    return xs.double(), None if base is None else base.double()


# ------------------------------------------------------------------------------------------ defaults

MERGEKIT_PARAMETERS = {  # mergekit 0.1.5: name -> (per_model, default); None: required (no default)
    Linear: {"weight": (True, None), "normalize": (False, True)},
    Slerp: {"t": (False, None)},
    NuSlerp: {"weight": (True, None), "nuslerp_row_wise": (False, False), "nuslerp_flatten": (False, True)},
    MultiSlerp: {"weight": (True, None), "normalize_weights": (False, True), "eps": (False, 1e-8)},
    Karcher: {"max_iter": (False, 10), "tol": (False, 1e-5)},
    ModelStock: {"filter_wise": (False, False)},
    NearSwap: {"t": (False, None)},
    ArceeFusion: {},
    Ram: {"epsilon": (False, 1e-5)},
    RamPlusTL: {"r": (False, 0.1), "alpha": (False, 0.2), "epsilon": (False, 1e-5)},
}
MERGEKIT_NAMES = {Linear: ("linear", False), Slerp: ("slerp", True), NuSlerp: ("nuslerp", False),
                  MultiSlerp: ("multislerp", False), Karcher: ("karcher", False),
                  ModelStock: ("model_stock", True), NearSwap: ("nearswap", True),
                  ArceeFusion: ("arcee_fusion", True), Ram: ("ram", True), RamPlusTL: ("ramplus_tl", True)}


@pytest.mark.parametrize("cls", list(MERGEKIT_PARAMETERS), ids=lambda c: c.__name__)
def test_names_and_defaults_are_mergekits(cls):
    name, needs_base = MERGEKIT_NAMES[cls]
    assert cls.name == name and cls.needs_base is needs_base
    assert cls.reference.startswith("https://") and cls.description
    got = {k: (p.per_model, p.default) for k, p in cls.parameters.items()}
    assert got == MERGEKIT_PARAMETERS[cls]
    for p in cls.parameters.values():
        if isinstance(p.default, bool):
            assert p.kind == "bool"
        elif isinstance(p.default, int):
            assert p.kind == "int"


# -------------------------------------------------------------------------------------------- linear

@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize):
    xs, _ = models(3)
    w = (0.5, 1.25, -0.25)
    x = xs.double()
    ref = sum(wi * xi for wi, xi in zip(w, x))
    if normalize:
        ref = ref / sum(w)
    check(Linear(), xs, None, ref, {"normalize": normalize}, {"weight": w})


def test_linear_requires_weights_and_a_nonzero_sum():
    xs, _ = models(2)
    with pytest.raises(RecipeError, match="weight"):
        merge(Linear(), xs, None, 500)
    with pytest.raises(RecipeError, match="sum to 0"):
        merge(Linear(), xs, None, 500, per_model={"weight": (1.0, -1.0)})


# --------------------------------------------------------------------------------------------- slerp

def slerp_reference(t, a, b, threshold=0.9995, eps=1e-8):
    fa, fb = a.reshape(-1), b.reshape(-1)
    na, nb = fa.norm(), fb.norm()
    na = na if na > eps else torch.tensor(1.0, dtype=a.dtype)
    nb = nb if nb > eps else torch.tensor(1.0, dtype=a.dtype)
    dot = torch.dot(fa / na, fb / nb).clamp(-1, 1)
    if dot.abs() > threshold:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp(t):
    xs, base = models(1, noise=0.1)
    x, b = f64(xs, base)
    ref = slerp_reference(t, b, x[0])
    assert torch.dot(b.reshape(-1) / b.norm(), x[0].reshape(-1) / x[0].norm()) < 0.9995  # the spherical branch
    out = check(Slerp(), xs, base, ref, {"t": t})
    if t == 0.0:
        assert torch.equal(out, base)


def test_slerp_falls_back_to_lerp_on_parallel_inputs():
    _, base = models(1)
    wobble = 1e-4 * torch.randn(base.shape, generator=torch.Generator().manual_seed(9))
    for other in (2.5 * base, -0.5 * base, base * (1 + wobble)):
        cos = torch.nn.functional.cosine_similarity(base.reshape(1, -1).double(), other.reshape(1, -1).double())
        assert cos.abs() > 0.9995
        t = 0.3
        ref = (1 - t) * base.double() + t * other.double()
        check(Slerp(), other[None], base, ref, {"t": t})


def test_slerp_spherical_is_not_lerp():
    xs, base = models(1, noise=0.1)
    lerp = 0.5 * base.double() + 0.5 * xs[0].double()
    out = merge(Slerp(), xs, base, 500, {"t": 0.5}).double()
    assert (out - lerp).abs().max() > 1e-4  # the midpoint's norm is lifted back towards the sphere


def test_slerp_needs_t_and_one_model():
    xs, base = models(2)
    with pytest.raises(RecipeError, match="'t'"):
        merge(Slerp(), xs[:1], base, 500)
    with pytest.raises(RecipeError, match="exactly one"):
        merge(Slerp(), xs, base, 500, {"t": 0.5})


# --------------------------------------------------------------------------------------- model_stock

def model_stock_reference(xs, base, filter_wise):
    n = xs.shape[0]
    if filter_wise:
        d = [(x - base) for x in xs]  # rows along the last dimension
        dims = -1
    else:
        d = [(x - base).reshape(-1) for x in xs]
        dims = -1
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            prod = (d[i].norm(dim=dims) * d[j].norm(dim=dims)).clamp(min=1e-6)
            cos.append(((d[i] * d[j]).sum(dim=dims) / prod).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    t = n * c / (1 + (n - 1) * c)
    t = torch.where((1 + (n - 1) * c).abs() < 1e-6, torch.zeros_like(t), t)
    avg = xs.mean(0)
    if not filter_wise:
        return (t * avg.reshape(-1) + (1 - t) * base.reshape(-1)).reshape(base.shape)
    return t * avg + (1 - t) * base


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_model_stock(filter_wise, n):
    xs, base = models(n)
    # correlated fine-tunes: a shared direction plus their own noise, so cos is well away from 0
    shared = 0.02 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    xs = xs + shared
    x, b = f64(xs, base)
    check(ModelStock(), xs, base, model_stock_reference(x, b, filter_wise), {"filter_wise": filter_wise})


def test_model_stock_per_row_ratios_differ():
    xs, base = models(2)
    out_rows = merge(ModelStock(), xs, base, 300, {"filter_wise": True})
    out_whole = merge(ModelStock(), xs, base, 300, {"filter_wise": False})
    assert not torch.equal(out_rows, out_whole)


def test_model_stock_needs_two_fine_tunes():
    xs, base = models(1)
    with pytest.raises(RecipeError, match="at least 2"):
        merge(ModelStock(), xs, base, 500)


# ------------------------------------------------------------------------------------------- nuslerp

def nuslerp_reference(w, x0, x1, base, row_wise, flatten):
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    v0, v1 = (x0 - base, x1 - base) if base is not None else (x0, x1)
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:  # vectors along dimension 0
        a, b = v0.movedim(0, -1), v1.movedim(0, -1)
    else:
        a, b = v0, v1
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where((1 - cos ** 2) <= 1e-16, (1 - t) * a + t * b, out)
    if flatten:
        out = out.reshape(shape)
    elif row_wise:
        out = out.movedim(-1, 0)
    return out + base if base is not None else out


@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False), (True, True)])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp(row_wise, flatten, with_base):
    xs, base = models(2, noise=0.05)
    base = base if with_base else None
    w = (0.7, 0.4)
    x, b = f64(xs, base)
    ref = nuslerp_reference(w, x[0], x[1], b, row_wise, flatten)
    check(NuSlerp(), xs, base, ref, {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}, {"weight": w})


def test_nuslerp_row_wise_on_three_dimensions_and_zero_weights():
    xs, base = models(2, shape=(6, 8, 10), noise=0.05)
    x, b = f64(xs, base)
    for w in ((1.0, 3.0), (1.0, -1.0)):  # the second: t = 0.5
        ref = nuslerp_reference(w, x[0], x[1], b, True, False)
        for bs in (7, 77, 480):
            out = merge(NuSlerp(), xs, base, bs, {"nuslerp_row_wise": True, "nuslerp_flatten": False},
                        {"weight": w})
            torch.testing.assert_close(out.double(), ref, atol=2e-7, rtol=2e-6)


def test_nuslerp_colinear_rows_lerp():
    _, base = models(1)
    x0 = base.clone()
    x1 = 3 * base  # every row parallel to x0's
    w = (1.0, 1.0)
    ref = 0.5 * x0.double() + 0.5 * x1.double()
    out = merge(NuSlerp(), torch.stack([x0, x1]), None, 100, {"nuslerp_flatten": False}, {"weight": w})
    torch.testing.assert_close(out.double(), ref, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------- multislerp

def multislerp_reference(w, xs, base, normalize=True, eps=1e-8):
    v = xs - base if base is not None else xs
    flat = v.reshape(v.shape[0], -1)
    w = torch.tensor(w, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    dots = units @ mean
    tangent = ((units - dots[:, None] * mean) * w[:, None]).sum(0)
    tn = tangent.norm() + eps
    out = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms[:, 0] * w).sum()
    out = out.reshape(xs.shape[1:])
    return out + base if base is not None else out


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp(with_base, normalize):
    xs, base = models(3, noise=0.05)
    base = base if with_base else None
    w = (1.0, 2.0, 0.5)
    x, b = f64(xs, base)
    check(MultiSlerp(), xs, base, multislerp_reference(w, x, b, normalize), {"normalize_weights": normalize},
          {"weight": w})


def test_multislerp_single_model_and_antipodal_pair():
    xs, base = models(2)
    out = merge(MultiSlerp(), xs[:1], base, 500, per_model={"weight": (2.0,)})
    assert torch.equal(out, xs[0])
    # antipodal task vectors with equal weights: two models fall back to the weighted sum
    # (values on a 2^-12 grid, so base ± d and their deltas are exact in float32)
    base = torch.round(base * 4096) / 4096
    d = torch.round((xs[0] - xs[1]) * 4096) / 4096
    pair = torch.stack([base + d, base - d])
    out = merge(MultiSlerp(), pair, base, 500, per_model={"weight": (1.0, 1.0)})
    ref = base.double() + 0.5 * (pair[0].double() - base.double()) + 0.5 * (pair[1].double() - base.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-7, rtol=1e-6)
    three = torch.stack([base + d, base - d, base + d])
    with pytest.raises(RecipeError, match="zero"):
        merge(MultiSlerp(), three, base, 500, per_model={"weight": (1.0, 2.0, 1.0)})


# ------------------------------------------------------------------------------------------- karcher

def karcher_reference(xs, max_iter=10, tol=1e-5):
    flat = [x.reshape(-1) for x in xs]
    n = len(flat)
    norms = [f.norm() for f in flat]
    units = [f / nm if nm > 0 else torch.zeros_like(f) for f, nm in zip(flat, norms)]
    valid = [i for i in range(n) if norms[i] > tol]
    a = {i: 1.0 / len(valid) for i in valid}
    mean = sum(a[i] * units[i] for i in valid)
    mean = units[valid[0]].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            dot = torch.dot(mean, units[i]).clamp(-1, 1)
            theta = torch.acos(dot)
            if theta < tol:
                continue
            tangent = tangent + a[i] * theta / torch.sin(theta) * (units[i] - dot * mean)
        tn = tangent.norm()
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (sum(norms) / n * mean).reshape(xs.shape[1:])


@pytest.mark.parametrize("n", [2, 3])
def test_karcher(n):
    xs, _ = models(n, noise=0.1)
    xs = xs * torch.tensor([1.0, 1.5, 0.7][:n]).reshape(-1, 1, 1)  # different norms
    check(Karcher(), xs, None, karcher_reference(xs.double()))


def test_karcher_iterations_matter_and_max_iter_zero():
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(3, *SHAPE, generator=g)  # far-apart directions: the iteration moves the mean
    ref10 = karcher_reference(xs.double(), max_iter=10)
    ref0 = karcher_reference(xs.double(), max_iter=0)
    assert (ref10 - ref0).abs().max() > 1e-3
    check(Karcher(), xs, None, ref10, atol=1e-6, rtol=1e-5)
    check(Karcher(), xs, None, ref0, {"max_iter": 0}, atol=1e-6, rtol=1e-5)


def test_karcher_averages_a_given_base_as_one_more_model():
    xs, base = models(2, noise=0.1)
    ref = karcher_reference(torch.cat([xs, base[None]]).double())
    check(Karcher(), xs, base, ref)
    assert not torch.equal(merge(Karcher(), xs, base, 500), merge(Karcher(), xs, None, 500))


def test_karcher_zero_model_is_left_out_of_the_mean():
    xs, _ = models(3, noise=0.1)
    xs[1] = 0
    check(Karcher(), xs, None, karcher_reference(xs.double()))


# ------------------------------------------------------------------------------------------ nearswap

@pytest.mark.parametrize("t", [0.001, 0.02, 0.5])
def test_nearswap(t):
    xs, base = models(1)
    x, b = f64(xs, base)
    w = (t / (b - x[0]).abs().clamp(min=1e-6)).clamp(0, 1)
    ref = w * x[0] + (1 - w) * b
    check(NearSwap(), xs, base, ref, {"t": t})


# -------------------------------------------------------------------------------------- arcee_fusion

def arcee_reference(x, b):
    """(output, importance, threshold) in float64, rows along the last dimension."""
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    importance = (x - b).abs() * kl
    s = importance.reshape(-1).sort().values
    last = s.numel() - 1
    q1, med, q3 = s[last // 4], s[last // 2], s[3 * last // 4]
    threshold = med + 1.5 * (q3 - q1)
    return b + (x - b) * (importance >= threshold), importance, threshold


@pytest.mark.parametrize("shape", [SHAPE, (3000,), (7, 5, 9)])
def test_arcee_fusion(shape):
    # different spreads per row, so the rows' KL divergences differ
    xs, base = models(1, shape=shape, noise=0.1)
    base = base * torch.linspace(1, 20, shape[-1]) if len(shape) > 1 else base * 10
    xs = xs * 10
    x, b = f64(xs, base)
    ref, importance, threshold = arcee_reference(x[0], b)
    kept = (importance >= threshold)
    assert 0 < kept.sum() < kept.numel() // 2
    # float64 work values: exact
    for bs in (97, 1000):
        out = merge(ArceeFusion(), xs, base, bs, dtype=torch.float64)
        torch.testing.assert_close(out, ref, atol=1e-15, rtol=0)
    # float32: identical for any block size, equal to the definition away from the threshold
    outs = [merge(ArceeFusion(), xs, base, bs) for bs in (97, 1000, xs[0].numel())]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    clear = ((importance - threshold).abs() > 1e-5 * threshold)
    torch.testing.assert_close(outs[0].double()[clear], ref[clear], atol=2e-7, rtol=2e-6)


def test_kth_smallest_matches_sort():
    from soup.methods.select import kth_smallest

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        v = torch.randn(5001, generator=g, dtype=dtype) * torch.logspace(-30, 30, 5001, dtype=dtype)
        v[::7] = 0.0
        v[1::11] = -0.0
        v[5] = v[6]  # ties
        ks = [0, 1, 2500, 4999, 5000, 1234]
        got = kth_smallest(lambda: iter(v.split(333)), ks, dtype)
        s = v.sort().values
        for k, value in zip(ks, got):
            assert value.dtype == dtype and value == s[k]


# ------------------------------------------------------------------------------------ ram, ramplus_tl

def sparse_models(n, seed=0):
    """Fine-tunes that change a random half of the entries each (some shared, some unique), some below eps."""
    xs, base = models(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.rand((n, *SHAPE), generator=g) < torch.tensor([0.5, 0.3, 0.7][:n]).reshape(-1, 1, 1)
    tiny = torch.rand((n, *SHAPE), generator=g) < 0.1
    d = (xs - base) * keep
    d = torch.where(tiny, torch.full_like(d, 4e-6), d)
    return base + d, base


def ram_reference(xs, base, eps, lambdas=None):
    tv = xs - base
    nz = tv.abs() > eps
    count = nz.sum(0)
    out = torch.zeros_like(base)
    for i in range(xs.shape[0]):
        lam = 1.0 if lambdas is None else lambdas[i]
        out += torch.where(nz[i] & (count == 1), tv[i] * lam, torch.zeros_like(base))
        out += torch.where(nz[i] & (count > 1), tv[i] / count.clamp(min=1), torch.zeros_like(base))
    return base + out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ram(n):
    xs, base = sparse_models(n)
    # the float32 task vectors decide which entries pass epsilon: the reference uses the same ones
    nz_ref = ram_reference(xs.double(), base.double(), 1e-5)
    check(Ram(), xs, base, nz_ref, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 2.0)])
def test_ramplus_tl(r, alpha):
    xs, base = sparse_models(3, seed=4)
    x, b = f64(xs, base)
    tv = x - b
    nz = tv.abs() > 1e-5
    count = nz.sum(0)
    lambdas = []
    for i in range(3):
        shared = int((nz[i] & (count > 1)).sum())
        unique = int((nz[i] & (count == 1)).sum())
        lambdas.append(1 + r * min(max(shared / max(unique, 1e-5), 0), alpha))
    assert len(set(lambdas)) > 1 or alpha == 0.2
    ref = ram_reference(x, b, 1e-5, lambdas)
    check(RamPlusTL(), xs, base, ref, {"r": r, "alpha": alpha}, atol=1e-7, rtol=1e-6)
    assert not torch.equal(merge(RamPlusTL(), xs, base, 500, {"r": r, "alpha": alpha}),
                           merge(Ram(), xs, base, 500))


def test_statistics_keep_no_tensor_sized_state():
    """The statistics of every method are small: O(1) or O(rows) numbers, never the tensor."""
    xs, base = models(3)
    cases = [
        (Slerp(), xs[:1], base, {"t": 0.5}, None),
        (ModelStock(), xs, base, {"filter_wise": True}, None),
        (NuSlerp(), xs[:2], base, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, {"weight": (1, 1)}),
        (MultiSlerp(), xs, base, {}, {"weight": (1, 1, 1)}),
        (Karcher(), xs, None, {}, None),
        (ArceeFusion(), xs[:1], base, {}, None),
        (RamPlusTL(), xs, base, {}, None),
    ]
    numel = xs[0].numel()
    for method, x, b, values, per_model in cases:
        shape = tuple(x.shape[1:])
        flat = x.reshape(x.shape[0], -1)

        def blocks(flat=flat, b=b, shape=shape):
            for s in range(0, numel, 500):
                e = min(numel, s + 500)
                yield At("t", shape, s, e), flat[:, s:e], None if b is None else b.reshape(-1)[s:e]

        resolved = {k: p.default for k, p in method.parameters.items() if not p.per_model}
        resolved.update(values)
        stats = method.statistics(TensorInput("t", shape, x.shape[0], torch.float32, b is not None, blocks),
                                  TensorParams(resolved, per_model or {}))

        def size(s):
            if isinstance(s, torch.Tensor):
                return s.numel()
            if isinstance(s, (list, tuple)):
                return sum(size(v) for v in s)
            return 1

        assert size(stats) <= 2 * max(SHAPE) + 16, method.name
