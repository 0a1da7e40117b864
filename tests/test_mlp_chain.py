"""The one-launch sparse MLP (`kernels.mlp`: gate|up, SiLU(gate) * up and down in one grid) against a
float64 oracle of the three projections, on the CPU through Triton's interpreter (on a GPU machine,
on the device). Odd input widths, batch 1..8, sparsity 0..0.95, a last down chunk narrower than the
others, outputs poisoned with NaN, the counters zero after every call."""
import pytest
import torch

triton = pytest.importorskip("triton")

from rsparse.kernels import mlp, triton_gemv as tg  # noqa: E402
from rsparse.linear import rsparse_linear_ref  # noqa: E402
from thresholds import tau_between  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
SMALL_GU = dict(chunk=128, block_n=32, block_k=32, warps=4, stages=1)


def _dense_ref(x, W, tau, c):
    return rsparse_linear_ref(x.double(), W.double(), None, tau, c.double(), W.new_zeros(W.shape[0], 0).double(),
                              W.new_zeros(0, W.shape[1]).double())


def _mlp_case(B, IN, half, out, sp_gu, sp_d, dtype):
    """Weights, scales and thresholds of gate, up and down, and the float64 oracle of down(h) with h
    rounded as the module path rounds it (each member's output, SiLU, the product, in dtype): the
    down threshold sits between two of that h's scores, so kernel and oracle keep the same channels."""
    x = torch.distributions.Laplace(0.0, 1.0).sample((B, IN)).to(dtype)
    Wg, Wu = [(torch.randn(half, IN) / IN**0.5).to(dtype) for _ in range(2)]
    Wd = (torch.randn(out, half) / half**0.5).to(dtype)
    cg, cu, cd = [(torch.rand(n) + 0.5).to(dtype) for n in (IN, IN, half)]
    tg_, tu = [tau_between(x.double().abs() * c.double(), sp_gu) for c in (cg, cu)]
    g, u = _dense_ref(x, Wg, tg_, cg), _dense_ref(x, Wu, tu, cu)
    h = (torch.nn.functional.silu(g.to(dtype).float()).to(dtype).float() * u.to(dtype).float()).to(dtype)
    td = tau_between(h.double().abs() * cd.double(), sp_d)
    ref = _dense_ref(h, Wd, td, cd)
    wt_gu = torch.cat([Wg.T, Wu.T], 1).contiguous()
    args = (x, wt_gu, torch.stack([cg, cu]), torch.stack([tg_, tu]).float(), Wd.T.contiguous(), cd, td.float())
    return [t.to(DEV) for t in args], ref, h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,IN,half,out,sp_gu,sp_d,ch_d", [
    (1, 300, 96, 70, 0.5, 0.5, 64),     # 2 down chunks, the last 32 wide; 3 chunks of x, the last 44
    (3, 513, 160, 33, 0.0, 0.7, 32),    # every channel of x kept; 5 down chunks of one gate|up tile each
    (8, 129, 64, 130, 0.95, 0.0, 128),  # one down chunk wider than I; every channel of h kept
    (5, 257, 128, 64, 0.6, 0.95, 64),
])
def test_chain_matches_three_oracles(dtype, B, IN, half, out, sp_gu, sp_d, ch_d):
    torch.manual_seed(B * IN + half + out)
    args, ref, _ = _mlp_case(B, IN, half, out, sp_gu, sp_d, dtype)
    cfg_d = dict(SMALL_GU, chunk=ch_d, block_n=16)
    locks = torch.zeros(mlp.chain_locks_needed(half, SMALL_GU, cfg_d), dtype=torch.int32, device=DEV)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    first = None
    for _ in range(2):  # a second call on the counters the first left: they must be back at zero
        parts = mlp.launch_chain(*args, locks, SMALL_GU, cfg_d)
        assert parts.shape == (triton.cdiv(half, ch_d), B, out) and parts.dtype == torch.float32
        y = parts.sum(0).cpu()
        assert torch.isfinite(y).all()
        assert ((y.double() - ref).norm() / ref.norm()).item() < tol
        assert not locks.any(), "counters left raised"
        first = y if first is None else first
    assert torch.equal(first, y), "two calls on the same input differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 4])
def test_registered_op_reduces_like_the_two_calls(dtype, B):
    """The op with the shapes' own configurations: reduce=True gives y in the model dtype (the
    epilogue launch), reduce=False the partials; both equal the oracle, and the h the chain formed is
    the two-call path's (`rsparse_glu_gemv`) bit for bit where both round the same partial sums."""
    torch.manual_seed(7 + B)
    half, out = 192, 100
    args, ref, _ = _mlp_case(B, 333, half, out, 0.5, 0.5, dtype)
    cfg_gu, cfg_d = mlp.chain_configs(args[1], args[4])
    locks = torch.zeros(mlp.chain_locks_needed(half, cfg_gu, cfg_d), dtype=torch.int32, device=DEV)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    y = torch.ops.rsparse.rsparse_mlp(*args, locks, True).cpu()
    assert y.shape == (B, out) and y.dtype == dtype and torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    parts = torch.ops.rsparse.rsparse_mlp(*args, locks, False).cpu()
    assert torch.equal(tg.sum_partials(parts, None, dtype), y) and not locks.any()


def test_bad_layouts_and_counters_are_refused():
    args, _, _ = _mlp_case(1, 64, 96, 32, 0.5, 0.5, torch.float32)
    cfg_d = dict(SMALL_GU, chunk=48, block_n=16)  # down chunks of 48 channels: a 32-wide gate|up tile would feed two
    with pytest.raises(ValueError, match="do not each feed one down chunk"):
        mlp.launch_chain(*args, torch.zeros(8, dtype=torch.int32, device=DEV), SMALL_GU, cfg_d)
    cfg_d = dict(SMALL_GU, chunk=32, block_n=16)
    with pytest.raises(ValueError, match="chain counters must be a contiguous int32 vector of at least 9 zeros"):
        mlp.launch_chain(*args, torch.zeros(5, dtype=torch.int32, device=DEV), SMALL_GU, cfg_d)
    with pytest.raises(ValueError, match="needs gate\\|up \\(in, 2 I\\) and down \\(I, out\\)"):
        mlp.launch_chain(*args[:4], args[4][:64], args[5][:64], args[6], torch.zeros(8, dtype=torch.int32, device=DEV), SMALL_GU,
                         cfg_d)


def _mlp_modules(ranks=(0, 0, 0), bias=False):
    from rsparse.kernels.module import TritonGroup, TritonRSparseLinear
    from rsparse.linear import RSparseLinear

    torch.manual_seed(5)
    shapes = [(256, 200), (256, 200), (150, 256)]
    mods = []
    for (o, i), r, t in zip(shapes, ranks, (0.4, 0.5, 0.05)):
        lin = torch.nn.Linear(i, o, bias=bias)
        f = (torch.randn(o, r) / 4, torch.randn(r, i) / 4) if r else (None, None)
        mods.append(TritonRSparseLinear(RSparseLinear.from_linear(lin, t, "wnorm", *f)).to(DEV))
    return TritonGroup(mods[:2]), mods[2]


@pytest.mark.parametrize("compiling", [False, True])
def test_group_chain_down_matches_the_two_calls(monkeypatch, compiling):
    """TritonGroup.chain_down with the switch on: the two-call path's output (silu_mul, then down);
    under torch.compile (faked here) the partials are summed outside the op. Off, with rank terms,
    with a bias or with more rows than the modules run on the kernels: None (the caller's two calls)."""
    from rsparse.kernels import module

    group, down = _mlp_modules()
    x = torch.distributions.Laplace(0.0, 1.0).sample((1, 1, 200)).to(DEV)
    with torch.no_grad():
        two = down(group.silu_mul(x))
        assert group.chain_down(x, down) is None  # the switch is off by default
        monkeypatch.setattr(module, "MLP_CHAIN", True)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        calls = []
        real = torch.ops.rsparse.rsparse_mlp
        monkeypatch.setattr(torch.ops.rsparse, "rsparse_mlp", lambda *a, **k: calls.append(a[8]) or real(*a, **k), raising=False)
        one = group.chain_down(x, down)
        assert calls == [not compiling]  # reduce in the op only when no compiler sums the partials
        assert one.shape == two.shape and ((one - two).norm() / two.norm()).item() < 1e-5
        down.max_rows = 1
        assert group.chain_down(torch.cat([x, x], 1), down) is None
        for g, d in (_mlp_modules(ranks=(16, 0, 0)), _mlp_modules(ranks=(0, 0, 16)), _mlp_modules(bias=True)):
            assert g.chain_down(x, d) is None
