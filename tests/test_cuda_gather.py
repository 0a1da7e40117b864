"""The CUDA C++ gather (`rsparse::cuda_partials`) against the float64 oracle. GPU only: it needs a CUDA
device and nvcc (skipped elsewhere, so CI on the CPU runs only the switch's checks; the Triton
kernels' tests cover the default path there). Fresh random inputs, widths not multiples of the 256-channel blocks, groups of
members with their own scales and thresholds, batch 1..8, sparsity 0..1, and the allocator's blocks
filled with NaN before each call so an unwritten partial fails."""
import pytest
import torch

from rsparse.kernels.module import TritonGroup
from rsparse.linear import rsparse_linear_ref
from thresholds import tau_between

cuda_gather = pytest.importorskip("rsparse.kernels.cuda_gather")
gpu = pytest.mark.skipif(not cuda_gather.available(), reason="needs a CUDA GPU and nvcc")


def test_the_switch_names_what_is_missing(monkeypatch):
    """`use_gather` refuses an unknown name, and "cuda" where it cannot build or run (naming why),
    leaving the Triton gather in place; `fits` refuses CPU tensors (runs everywhere, CI included)."""
    from rsparse.kernels import module as km

    monkeypatch.setattr(km, "GATHER", "triton")
    with pytest.raises(ValueError, match="gather must be triton or cuda"):
        km.use_gather("cutlass")
    if not cuda_gather.available():
        with pytest.raises(ValueError, match="the CUDA gather cannot run here"):
            km.use_gather("cuda")
    assert km.GATHER == "triton"
    assert not cuda_gather.fits(torch.zeros(256, 512, dtype=torch.bfloat16), 0, 512, 512)
    wt, x = torch.zeros(256, 512, dtype=torch.bfloat16), torch.zeros(1, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="col_scale must be torch.bfloat16"):  # checked before any launch
        torch.ops.rsparse.cuda_partials(x, wt, torch.ones(256), torch.tensor(0.5), 512, 512)
    with pytest.raises(ValueError, match="1..8 rows"):
        torch.ops.rsparse.cuda_partials(x.float(), wt, torch.ones(256, dtype=torch.bfloat16), torch.tensor(0.5), 512, 512)
    with pytest.raises(ValueError, match="chunks .* must be >= 1, got 0"):
        torch.ops.rsparse.cuda_partials(x, wt, torch.ones(256, dtype=torch.bfloat16), torch.tensor(0.5), 512, 512, 0)
    # what torch.compile traces: one partial per 256 * chunks channels, rounded up (805 = 3 * 256 + 37)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        wt = torch.empty(805, 512, dtype=torch.float16)
        x, c = torch.empty(3, 805, dtype=torch.float16), torch.empty(805, dtype=torch.float16)
        shapes = [tuple(torch.ops.rsparse.cuda_partials(x, wt, c, torch.empty(()), 512, 512, k).shape) for k in (1, 2, 3, 4)]
    assert shapes == [(4, 3, 512), (2, 3, 512), (2, 3, 512), (1, 3, 512)]

    # which calls the modules hand it (fake CUDA tensors: shapes, strides and dtypes only, as when traced)
    with FakeTensorMode():
        wt = torch.empty(640, 512, dtype=torch.bfloat16, device="cuda")
        assert cuda_gather.fits(wt, 0, 256, 512, rows=1) and cuda_gather.fits(wt, 0, 512, 512)
        assert not cuda_gather.fits(wt, 0, 512, 512, rows=2)  # batch 2+: slower than the Triton gather (session 35)
        assert not cuda_gather.fits(wt, 16, 512, 512)  # a rank term
        assert not cuda_gather.fits(wt, 0, 128, 512)  # a member off the 256-column tiles
        assert not cuda_gather.fits(wt.float(), 0, 512, 512)
        assert not cuda_gather.fits(torch.empty(640, 516, dtype=torch.bfloat16, device="cuda"), 0, 516, 516)  # width % 8


def _poison_allocator(shape):
    """The next float32 allocation of this shape most likely reuses this NaN-filled block."""
    t = torch.full(shape, float("nan"), device="cuda")
    del t


@gpu
@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,IN,outs,sparsities", [
    (1, 805, (296,), (0.5,)), (3, 4096, (512, 256, 256), (0.5, 0.3, 0.8)), (8, 300, (256, 40), (0.0, 0.95)),
    (2, 1100, (768, 768), (0.7, 0.5)), (5, 257, (1024,), (1.0,)), (7, 513, (256, 256, 8), (0.4, 0.6, 0.5)),
])
def test_cuda_partials_sum_to_members_oracles(dtype, B, IN, outs, sparsities, chunks):
    assert cuda_gather.ensure_built(), cuda_gather.build_error()
    torch.manual_seed(B * IN + len(outs))
    x = torch.distributions.Laplace(0.0, 1.0).sample((B, IN)).to(dtype)
    Ws = [(torch.randn(o, IN) / IN**0.5).to(dtype) for o in outs]
    cs = torch.stack([(torch.rand(IN) + 0.5).to(dtype) for _ in outs])
    taus = torch.stack([tau_between(x.double().abs() * c.double(), s).float() for c, s in zip(cs, sparsities)])
    wt = torch.cat([W.T for W in Ws], 1).contiguous().cuda()
    bounds = TritonGroup._segments(list(outs))  # the member boundaries as a group passes them
    empty = torch.empty(0, IN, dtype=torch.float64)
    refs = [rsparse_linear_ref(x.double(), W.double(), None, t.double(), c.double(), torch.empty(W.shape[0], 0, dtype=torch.float64),
                               empty) for W, c, t in zip(Ws, cs, taus)]
    ref = torch.cat(refs, 1)
    assert cuda_gather.fits(wt, 0, *bounds)
    shape = (-(-IN // (256 * chunks)), B, sum(outs))  # (chunks > 1: a block walks several 256-channel chunks)
    _poison_allocator(shape)
    parts = torch.ops.rsparse.cuda_partials(x.cuda(), wt, cs.cuda(), taus.cuda(), *bounds, chunks)
    assert parts.shape == shape and parts.dtype == torch.float32
    assert torch.isfinite(parts).all(), "partial element left unwritten"
    y = parts.sum(0).double().cpu()
    scale = max(ref.norm().item(), 1e-6)
    assert (y - ref).norm().item() / scale < 1e-5 or (ref.norm() == 0 and y.abs().max() == 0)
    # a lone module: 1-d scales, 0-d tau, seg1 = seg2 = out, its weight a column view of the group's
    o = outs[0]
    _poison_allocator((shape[0], B, o))
    lone = torch.ops.rsparse.cuda_partials(x.cuda(), wt[:, :o], cs[0].cuda(), taus[0].cuda(), o, o, chunks)
    assert torch.isfinite(lone).all()
    assert ((lone.sum(0).double().cpu() - refs[0]).norm() / max(refs[0].norm().item(), 1e-6)).item() < 1e-5


@gpu
def test_cuda_partials_compile_and_misfits():
    """The op traces under torch.compile (fake shapes right) and agrees with eager; shapes it does not
    take are refused by `fits` (a member off the 256-column tiles, a rank term, float32) and bad rows
    raise naming the problem."""
    assert cuda_gather.ensure_built(), cuda_gather.build_error()
    torch.manual_seed(0)
    IN, OUT = 640, 512
    x = torch.randn(2, IN, device="cuda", dtype=torch.bfloat16)
    wt = (torch.randn(IN, OUT, device="cuda") / IN**0.5).to(torch.bfloat16)
    c = torch.ones(IN, device="cuda", dtype=torch.bfloat16)
    tau = torch.tensor(0.5, device="cuda")
    f = torch.compile(lambda x: torch.ops.rsparse.cuda_partials(x, wt, c, tau, OUT, OUT).sum(0), fullgraph=True)
    assert torch.equal(f(x), torch.ops.rsparse.cuda_partials(x, wt, c, tau, OUT, OUT).sum(0))
    assert not cuda_gather.fits(wt, 0, 128, OUT) and not cuda_gather.fits(wt, 16, OUT, OUT)
    assert not cuda_gather.fits(wt.float(), 0, OUT, OUT)
    with pytest.raises(ValueError, match="1..8 rows"):
        torch.ops.rsparse.cuda_partials(torch.randn(9, IN, device="cuda", dtype=torch.bfloat16), wt, c, tau, OUT, OUT)


@gpu
def test_compiled_groups_take_the_cuda_gather(monkeypatch):
    """With `use_gather("cuda")`, a compiled step's q|k|v-like group and gate|up group (SiLU(gate) * up)
    trace `cuda_partials` (not the Triton gather) and agree with the float32 oracle modules; the switch
    back restores the Triton op."""
    from rsparse.kernels import module as km
    from rsparse.kernels.module import TritonRSparseLinear
    from rsparse.linear import RSparseLinear

    monkeypatch.setattr(km, "GATHER", "triton")
    torch.manual_seed(3)
    lins = [torch.nn.Linear(640, o, bias=False) for o in (512, 256, 256, 768, 768)]
    refs = [RSparseLinear.from_linear(lin, t, "wnorm") for lin, t in zip(lins, (0.25, 0.5, 0.125, 0.375, 0.5))]  # exact in bf16
    qkv = TritonGroup([TritonRSparseLinear(r).to("cuda", torch.bfloat16) for r in refs[:3]])
    mlp = TritonGroup([TritonRSparseLinear(r).to("cuda", torch.bfloat16) for r in refs[3:]])
    x = torch.randn(1, 640, dtype=torch.bfloat16)
    ref_qkv = torch.cat([r(x.float()) for r in refs[:3]], 1)
    ref_mlp = torch.nn.functional.silu(refs[3](x.float())) * refs[4](x.float())

    def run(gather, x=x):
        km.use_gather(gather)
        ops = []

        def backend(gm, inputs):
            ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward

        torch._dynamo.reset()
        f = torch.compile(lambda x: (torch.cat(qkv(x), -1), mlp.silu_mul(x)), backend=backend, fullgraph=True)
        return f(x.cuda()), ops

    (y_qkv, y_mlp), ops = run("cuda")
    assert sum("cuda_partials" in o for o in ops) == 2 and not any("rsparse_partials" in o for o in ops), ops
    (t_qkv, t_mlp), t_ops = run("triton")
    assert not any("cuda_partials" in o for o in t_ops) and any("rsparse_partials" in o for o in t_ops), t_ops
    _, b2_ops = run("cuda", torch.cat([x, x]))  # batch 2: above cuda_gather.MAX_ROWS, the Triton gather
    assert not any("cuda_partials" in o for o in b2_ops) and any("rsparse_partials" in o for o in b2_ops), b2_ops
    for got, tri, ref in ((y_qkv, t_qkv, ref_qkv), (y_mlp, t_mlp, ref_mlp)):
        # the same kept channels (bf16 modules) as the Triton gather; the float32 oracle keeps by its own
        # float32 scales and thresholds, a few channels apart
        assert ((got.float() - tri.float()).norm() / tri.float().norm()).item() < 1e-2
        assert ((got.float().cpu() - ref).norm() / ref.norm()).item() < 5e-2
