"""Triton decode kernels against the eager oracle, on the CPU through Triton's interpreter
(TRITON_INTERPRET=1; on a GPU machine the same tests run on the device). Fresh random inputs,
odd shapes (not multiples of any block, GQA-like widths), batch 1..8, sparsity 0..0.95, and
outputs poisoned with NaN so an unwritten element fails."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")  # on the CPU through the interpreter: TRITON_INTERPRET set in conftest.py

from rsparse.kernels import lowrank, triton_gemv as tg  # noqa: E402
from rsparse.kernels.teal import teal_gemv  # noqa: E402
from rsparse.linear import rsparse_linear_ref  # noqa: E402
from cases import grid  # noqa: E402
from thresholds import tau_between  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _case(B, IN, OUT, R, sparsity, dtype, bias):
    x = torch.distributions.Laplace(0.0, 1.0).sample((B, IN)).to(dtype)
    W = (torch.randn(OUT, IN) / IN**0.5).to(dtype)
    U, A = (torch.randn(OUT, R) / 4).to(dtype), (torch.randn(R, IN) / 4).to(dtype)
    c = (torch.rand(IN) + 0.5).to(dtype)
    tau = tau_between(x.double().abs() * c.double(), sparsity)
    b = torch.randn(OUT).to(dtype) if bias else None
    return x, W, U, A, c, tau.float(), b


@pytest.mark.parametrize("dtype,B,IN,OUT,R,sparsity,variant", grid(DTYPES, [
    (1, 300, 70, 0, 0.5), (1, 576, 192, 3, 0.95), (3, 513, 130, 0, 0.0), (8, 257, 65, 37, 0.7),
    (5, 1100, 96, 0, 0.4), (2, 129, 200, 9, 0.6), (7, 64, 33, 64, 0.5),
], ["fused", "select", "gather", "one-launch", "split1", "split3", "k32"]))
def test_gemv_matches_oracle(dtype, B, IN, OUT, R, sparsity, variant):
    """split1 / split3: the one-launch kernel (r = 0; with a rank term the call takes the partials
    path) with one range per tile (writes y itself) or 3 ranges (last ticket sums the partials);
    gather / one-launch: the rank terms' U product added by the gather (the low-rank inputs before it,
    or in the same launch);
    fused and select: the U product in the epilogue (all the same for r = 0); k32: fused with 32-row K steps
    (4-8 of them per chunk: the steps' carried accumulator and the masked tail step)."""
    torch.manual_seed(hash((B, IN, OUT, R, variant)) % 2**31)
    x, W, U, A, c, tau, b = _case(B, IN, OUT, R, sparsity, dtype, bias=(B % 2 == 1))
    cfg = dict(tg.config_for(OUT, R), fused=variant != "select", rank_terms=variant if variant in tg.RANK_MODES else "epilogue", chunk=128 if IN < 600 else 256,
               block_n=64, splits=int(variant[-1]) if variant.startswith("split") else None)
    if variant == "k32":
        cfg["block_k"] = 32
    out = torch.full((B, OUT), float("nan"), dtype=dtype)
    args = [t.to(DEV) if t is not None else None for t in (x, W.T.contiguous(), A.T.contiguous(), U, c, tau, b)]
    locks = tg.tile_locks(OUT, DEV)  # the split kernel's tile counters, as a module keeps them
    y = tg._launch(*args, cfg, out=out.to(DEV), locks=locks).cpu()
    ref = rsparse_linear_ref(x.double(), W.double(), None if b is None else b.double(), tau.double(), c.double(), U.double(), A.double())
    assert torch.isfinite(y).all(), "output element left unwritten"
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    if variant == "one-launch" and R:  # the ranked gather counted its z programs on locks[0] and left it zeroed
        assert not locks.any()
    if variant == "split3":  # the merging programs leave the counters at zero: a second call on them is right
        assert not locks.any()
        assert torch.equal(tg._launch(*args, cfg, out=out.to(DEV), locks=locks).cpu(), y) and not locks.any()


def test_unknown_rank_path_is_refused():
    """A configuration naming no known rank path gets a ValueError that lists the known ones."""
    x, W, U, A, c, tau, b = _case(1, 64, 32, 16, 0.5, torch.float32, bias=False)
    args = [t.to(DEV) for t in (x, W.T.contiguous(), A.T.contiguous(), U, c, tau)]
    with pytest.raises(ValueError, match="rank_terms must be one of"):
        tg._launch(*args, None, dict(tg.config_for(32, 16), rank_terms="fused"))
    with pytest.raises(ValueError, match="tile counters must be a contiguous int32 vector of at least 2 zeros"):
        split = dict(tg.config_for(32, 0), chunk=32, block_n=16, splits=2)  # 2 ranges of the 64 channels, 2 output tiles of 16
        tg._launch(args[0], args[1], args[2][:, :0], args[3][:, :0], args[4], args[5], None, split, locks=torch.zeros(1, dtype=torch.int32, device=DEV))


def test_registered_op_and_teal_baseline():
    torch.manual_seed(0)
    x, W, U, A, c, tau, b = _case(1, 333, 77, 5, 0.5, torch.float32, bias=True)
    dev = [t.to(DEV) for t in (x, W.T.contiguous(), A.T.contiguous(), U, c, tau, b)]
    y = torch.ops.rsparse.rsparse_gemv(*dev[:6], tg.tile_locks(77, DEV), dev[6]).cpu()
    ref = rsparse_linear_ref(x.double(), W.double(), b.double(), tau.double(), c.double(), U.double(), A.double())
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    ones = torch.ones(333)
    yt = teal_gemv(x[0].to(DEV), W.T.contiguous().to(DEV), tau.to(DEV), split_k=4, block_n=64).cpu()
    ref_t = rsparse_linear_ref(x.double(), W.double(), None, tau.double(), ones.double(), U[:, :0].double(), A[:0].double())[0]
    assert ((yt.double() - ref_t).norm() / ref_t.norm()).item() < 1e-5


def test_triton_module_matches_rsparse_linear():
    """TritonRSparseLinear (Wt layout, kernel for <= 8 rows, oracle beyond) equals RSparseLinear, and
    its dense twin shares the stored weight."""
    from rsparse.kernels.module import TritonRSparseLinear
    from rsparse.linear import RSparseLinear, svd_factors

    torch.manual_seed(1)
    lin = torch.nn.Linear(300, 70, bias=True)
    U, A = svd_factors(lin.weight.detach(), 5)
    ref_mod = RSparseLinear.from_linear(lin, 0.4, "wnorm", U.float(), A.float())
    fast = TritonRSparseLinear(ref_mod).to(DEV)
    for shape in [(1, 300), (3, 1, 300), (2, 9, 300)]:  # decode rows and a prefill-sized input
        x = torch.distributions.Laplace(0.0, 1.0).sample(shape)
        with torch.no_grad():
            y, ref = fast(x.to(DEV)).cpu(), ref_mod(x)
        assert y.shape == ref.shape
        assert ((y - ref).norm() / ref.norm()).item() < 1e-5
    assert fast.dense().weight.data_ptr() == fast.wt.data_ptr()


# group / GLU kernels: two-launch (partials + epilogue), one launch with 1 or 2 ranges (r = 0), or
# "gather" / "one-launch": rank terms added in the gather launch (None: by the epilogue); see tg.RANK_TERMS
SPLITS = [None, 1, 2, "gather", "one-launch"]


def _group_case(B, IN, outs, ranks, sparsities, dtype):
    """x and members side by side: wt (in, sum out), at (in, sum r), U packed, per-member scales and
    thresholds (quantiles of each member's own scores), bias for odd B; each member's float64 oracle."""
    x = torch.distributions.Laplace(0.0, 1.0).sample((B, IN)).to(dtype)
    cases = [_case(B, IN, o, r, s, dtype, bias=(B % 2 == 1)) for o, r, s in zip(outs, ranks, sparsities)]
    cs = torch.stack([c[4] for c in cases])
    taus = torch.stack([(x.double().abs() * c[4].double()).reshape(-1).quantile(q).float() + 1e-4 for c, q in zip(cases, sparsities)])
    wt = torch.cat([c[1].T for c in cases], 1).contiguous()
    at = torch.cat([c[3].T for c in cases], 1).contiguous()
    u = torch.cat([c[2].reshape(-1) for c in cases])
    bias = torch.cat([c[6] for c in cases]) if B % 2 == 1 else None
    refs, start = [], 0
    for i, (c, o) in enumerate(zip(cases, outs)):
        b = None if bias is None else bias[start:start + o].double()
        refs.append(rsparse_linear_ref(x.double(), c[1].double(), b, taus[i].double(), cs[i].double(), c[2].double(), c[3].double()))
        start += o
    bounds = lambda v: ([sum(v[:i + 1]) for i in range(len(v))] + [sum(v)] * 2)[:2]  # noqa: E731
    return x, wt, at, u, cs, taus, bias, refs, bounds(list(outs)), bounds(list(ranks))


@pytest.mark.parametrize("dtype,B,IN,outs,ranks,splits", grid(DTYPES, [
    (1, 300, (64, 32, 32), (0, 0, 0)), (3, 513, (96, 65), (5, 0)), (8, 129, (32, 32, 7), (3, 0, 37)), (2, 77, (50,), (0,)),
    (1, 300, (64, 32, 32), (9, 4, 70))], SPLITS))
def test_group_kernel_matches_members_oracles(dtype, B, IN, outs, ranks, splits):
    """q|k|v-like members side by side, each with its own tau, scales and rank term (0 allowed), one
    call: every member's output equals its own oracle; alone on its column slices of the shared storage
    (row strides > its widths) each member does too. (Rank terms take the partials path, splits or not.)"""
    torch.manual_seed(B + IN + len(outs) + sum(ranks))
    x, wt, at, u, cs, taus, bias, refs, seg, roff = _group_case(B, IN, outs, ranks, (0.5, 0.8, 0.3)[:len(outs)], dtype)
    cfg = dict(tg.config_for(sum(outs), 0), chunk=128, block_n=32, fused=True, rank_terms=splits if splits in tg.RANK_MODES else "epilogue",
               splits=None if sum(ranks) or isinstance(splits, str) else splits)
    out = torch.full((B, sum(outs)), float("nan"), dtype=dtype)
    dev = [t.to(DEV) if t is not None else None for t in (x, wt, at, u, cs, taus, bias)]
    y = tg._launch(*dev, cfg, out=out.to(DEV), segments=tuple(seg), roffs=tuple(roff)).cpu()
    assert torch.isfinite(y).all(), "output element left unwritten"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    start = r0 = u0 = 0
    for i, (o, r) in enumerate(zip(outs, ranks)):
        got = y[:, start:start + o].double()
        assert ((got - refs[i]).norm() / refs[i].norm()).item() < tol
        alone = tg._launch(dev[0], dev[1][:, start:start + o], dev[2][:, r0:r0 + r], dev[3][u0:u0 + o * r].view(o, r), dev[4][i],
                           dev[5][i], None if dev[6] is None else dev[6][start:start + o], dict(cfg, splits=None)).cpu()
        assert ((alone.double() - refs[i]).norm() / refs[i].norm()).item() < tol
        start, r0, u0 = start + o, r0 + r, u0 + o * r
    op = torch.ops.rsparse.rsparse_group_gemv(*dev[:6], tg.tile_locks(sum(outs), DEV), *seg, *roff, dev[6]).cpu()
    assert ((op.double() - torch.cat(refs, 1)).norm() / torch.cat(refs, 1).norm()).item() < tol


@pytest.mark.parametrize("dtype,B,IN,half,ranks,splits", grid(
    DTYPES, [(1, 300, 96, (0, 0)), (3, 513, 64, (6, 0)), (8, 129, 160, (4, 33))], SPLITS))
def test_glu_kernel_matches_silu_of_member_oracles(dtype, B, IN, half, ranks, splits):
    """gate|up side by side (rank terms allowed), SiLU(gate) * up in the epilogue: equals the float64
    oracle of the two members followed by the activation; (B, half) output poisoned; the registered op agrees."""
    torch.manual_seed(B * IN + half + sum(ranks))
    x, wt, at, u, cs, taus, bias, (ref_g, ref_u), seg, roff = _group_case(B, IN, (half, half), ranks, (0.5, 0.7), dtype)
    ref = torch.nn.functional.silu(ref_g) * ref_u
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    cfg = dict(tg.config_for(2 * half, 0), chunk=128, block_n=32, fused=True, rank_terms=splits if splits in tg.RANK_MODES else "epilogue",
               splits=None if sum(ranks) or isinstance(splits, str) else splits)
    dev = [t.to(DEV) if t is not None else None for t in (x, wt, at, u, cs, taus, bias)]
    out = torch.full((B, half), float("nan"), dtype=dtype).to(DEV)
    y = tg._launch(*dev, cfg, out=out, segments=(half, 2 * half), glu=True, roffs=tuple(roff)).cpu()
    assert torch.isfinite(y).all(), "output element left unwritten"
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    op = torch.ops.rsparse.rsparse_glu_gemv(*dev[:6], tg.tile_locks(2 * half, DEV), roff[0], dev[6]).cpu()
    assert op.shape == (B, half) and ((op.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("dtype,B,IN,outs,ranks", grid(DTYPES, [
    (1, 300, (64, 32, 32), (0, 0, 0)), (5, 513, (96, 65), (0, 0)), (8, 129, (70,), (0,)), (3, 300, (64, 32, 32), (9, 0, 37)),
    (1, 1100, (70,), (16,)), (6, 257, (96, 65), (4, 64)), (2, 129, (50,), (70,))], reps=1))
def test_partials_sum_to_members_oracles(dtype, B, IN, outs, ranks):
    """The gather alone (`rsparse_partials`; rank terms inside the launch, their rank blocks fewer or
    more than the chunks): its float32 partials (chunks, rows, out), poisoned before the launch, sum
    (with bias, cast; `sum_partials`) to every member's float64 oracle; the registered op agrees, and
    a lone module (seg1 = seg2 = out, 1-d scales, 0-d tau) too."""
    torch.manual_seed(B * IN + len(outs) + sum(ranks))
    x, wt, at, u, cs, taus, bias, refs, seg, roff = _group_case(B, IN, outs, ranks, (0.5, 0.8, 0.3)[:len(outs)], dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    cfg = dict(tg.config_for(sum(outs), 0), chunk=128, block_n=32 if len(outs) > 1 else 64)
    dev = [t.to(DEV) if t is not None else None for t in (x, wt, at, u, cs, taus, bias)]
    mode = ("gather", "one-launch")[B % 2]
    parts = torch.full((-(-IN // 128), B, sum(outs)), float("nan"), device=DEV)
    if sum(ranks):  # the low-rank inputs in the same launch or in one before it
        lowrank._ranked_gather(*dev[:6], cfg, *seg, *roff, mode, ypart=parts)
    else:
        tg._gather(dev[0], dev[1], dev[4], dev[5], parts, cfg, *seg)
    assert torch.isfinite(parts).all(), "partial element left unwritten"
    y = tg.sum_partials(parts, dev[6], dtype).cpu()
    ref = torch.cat(refs, 1)
    assert y.dtype == dtype and ((y.double() - ref).norm() / ref.norm()).item() < tol
    locks = tg.tile_locks(sum(outs), DEV)  # one-launch rank terms count their z programs on the first, left zeroed
    op = torch.ops.rsparse.rsparse_partials(*dev[:6], locks, *seg, *roff, mode)
    assert op.dtype == torch.float32 and op.shape[1:] == (B, sum(outs)) and not locks.any()
    assert ((tg.sum_partials(op, dev[6], dtype).cpu().double() - ref).norm() / ref.norm()).item() < tol
    assert torch.equal(torch.ops.rsparse.rsparse_partials(*dev[:6], locks, *seg, *roff, mode), op) and not locks.any()
    o, r = outs[0], ranks[0]
    lone = torch.ops.rsparse.rsparse_partials(dev[0], dev[1][:, :o], dev[2][:, :r], dev[3][:o * r].view(o, r), dev[4][0], dev[5][0],
                                              locks, o, o, r, r)
    got = tg.sum_partials(lone, None if bias is None else dev[6][:o], dtype).cpu().double()
    assert ((got - refs[0]).norm() / refs[0].norm()).item() < tol and not locks.any()


@pytest.mark.parametrize("B", [1, 3])
def test_wide_calls_take_wide_z_programs(monkeypatch, B):
    """One-launch calls at or above WIDE_CALL (the MLP's on a GPU; every call here) take ZCHUNK_WIDE
    channels per z program (256 here: 3 z programs per member over 513 channels, the last one
    partial); the partials, poisoned, sum to every member's float64 oracle."""
    monkeypatch.setattr(lowrank, "WIDE_CALL", 1)
    monkeypatch.setattr(lowrank, "ZCHUNK_WIDE", 256)
    assert lowrank.z_chunk(513, 97) == 256
    torch.manual_seed(7)
    outs, ranks = (64, 33), (20, 48)
    x, wt, at, u, cs, taus, bias, refs, seg, roff = _group_case(B, 513, outs, ranks, (0.5, 0.7), torch.float32)
    dev = [t.to(DEV) if t is not None else None for t in (x, wt, at, u, cs, taus, bias)]
    parts = torch.full((5, B, 97), float("nan"), device=DEV)
    lowrank._ranked_gather(*dev[:6], dict(tg.config_for(97, 0), chunk=128, block_n=32), *seg, *roff, "one-launch", ypart=parts)
    assert torch.isfinite(parts).all(), "partial element left unwritten"
    ref = torch.cat(refs, 1)
    y = tg.sum_partials(parts, dev[6], torch.float32).cpu().double()
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_modules_leave_the_partials_sum_to_the_compiler(monkeypatch, rows):
    """While torch.compile traces, modules and groups call `rsparse_partials` (no epilogue launch) and
    sum the partials in the graph; with RANK_TERMS = "epilogue" a module with a rank term keeps the
    epilogue op. All give the oracle, for one decode row and for several (rows with different kept
    sets: the kernels gather their union). On the CPU the trace is simulated (is_compiling forced: Triton's interpreter cannot run
    under fake tensors); on a GPU the modules are compiled by inductor for real."""
    from rsparse.kernels.module import TritonGroup, TritonRSparseLinear
    from rsparse.linear import RSparseLinear

    torch.manual_seed(5)
    lins = [torch.nn.Linear(160, o, bias=o == 64) for o in (64, 32, 32)]
    refs = [RSparseLinear.from_linear(lin, t, "wnorm") for lin, t in zip(lins, (0.3, 0.6, 0.1))]
    ranked = RSparseLinear.from_linear(lins[0], 0.2, "wnorm", torch.randn(64, 4) / 4, torch.randn(4, 160) / 4)
    lone, lone_ranked = TritonRSparseLinear(refs[0]).to(DEV), TritonRSparseLinear(ranked).to(DEV)
    group = TritonGroup([TritonRSparseLinear(r).to(DEV) for r in refs])
    sums = []
    real_sum = tg.sum_partials
    monkeypatch.setattr(tg, "sum_partials", lambda *a: sums.append(a[0].shape) or real_sum(*a))
    modes, real_ranked = [], tg._ranked_gather  # the rank mode each ranked gather was launched with
    monkeypatch.setattr(tg, "_ranked_gather", lambda *a, **k: modes.append(a[11]) or real_ranked(*a, **k))
    if DEV == "cpu":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        compile_ = lambda f: f  # noqa: E731
    else:
        compile_ = lambda f: torch.compile(f, fullgraph=True)  # noqa: E731
    x = torch.distributions.Laplace(0.0, 1.0).sample((rows, 1, 160))
    with torch.no_grad():
        for fn, ref, mode, via_partials in ((lone, refs[0](x), "epilogue", True), (lone_ranked, ranked(x), "gather", True),
                                            (lone_ranked, ranked(x), "one-launch", True),
                                            (lone_ranked, ranked(x), "epilogue", False)):
            monkeypatch.setattr(tg, "RANK_TERMS", mode)
            sums.clear()
            modes.clear()
            torch._dynamo.reset()  # a fresh trace reads the switch
            y = compile_(fn)(x.to(DEV)).cpu()
            assert ((y - ref).norm() / ref.norm()).item() < 1e-5
            assert bool(sums) == via_partials
            assert set(modes) == ({mode} if fn is lone_ranked and mode != "epilogue" else set())
        # the op launches the mode it is given, whatever the global says (a compiled graph records it)
        m = lone_ranked
        args = (x.reshape(rows, 160).to(DEV), m.wt, m.at, m.U, m.col_scale, m.tau, m.tile_locks, 64, 64, m.at.shape[1], m.at.shape[1])
        modes.clear()
        got = tg.sum_partials(torch.ops.rsparse.rsparse_partials(*args, "one-launch"), m.bias, x.dtype).cpu()
        want = ranked(x).reshape(rows, -1)
        assert modes == ["one-launch"] and ((got - want).norm() / want.norm()).item() < 1e-5
        with pytest.raises(ValueError, match="rank_terms 'gather' or 'one-launch', got 'epilogue'"):
            torch.ops.rsparse.rsparse_partials(*args, "epilogue")
        sums.clear()
        ys = compile_(group)(x.to(DEV))
        assert sums and sums[0][1:] == (rows, 128)  # (chunks, rows, q|k|v columns)
        for y, r in zip(ys, refs):
            ref = r(x)
            assert ((y.cpu() - ref).norm() / ref.norm()).item() < 1e-5
        # "non-splitk": a shape TUNED runs on the one-launch kernel keeps it; "none": no partials anywhere
        from rsparse.kernels import module as km
        monkeypatch.setitem(tg.TUNED, (128, 160), dict(chunk=128, block_k=32, block_n=32, warps=4, stages=2, splits=2))
        for mode, group_sums, lone_sums in (("non-splitk", False, True), ("none", False, False)):
            monkeypatch.setattr(km, "REDUCE_IN_CONSUMER", mode)
            sums.clear()
            torch._dynamo.reset()  # a fresh trace reads the mode
            ys = compile_(group)(x.to(DEV))
            assert bool(sums) == group_sums, mode
            assert all(((y.cpu() - r(x)).norm() / r(x).norm()).item() < 1e-5 for y, r in zip(ys, refs))
            sums.clear()
            torch._dynamo.reset()
            compile_(lone)(x.to(DEV))
            assert bool(sums) == lone_sums, mode


def test_rows_beyond_the_kernel_limit_run_the_masked_dense_product(monkeypatch):
    """With KERNEL_MAX_ROWS = 2, a 3-row decode call of a module and of a group (rank terms included)
    runs cuBLAS on masked inputs, never a Triton kernel, and still equals the oracle."""
    from rsparse.kernels import module as km
    from rsparse.linear import RSparseLinear

    torch.manual_seed(6)
    lins = [torch.nn.Linear(96, o, bias=True) for o in (64, 64)]
    refs = [RSparseLinear.from_linear(lins[0], 0.3, "wnorm", torch.randn(64, 5) / 4, torch.randn(5, 96) / 4),
            RSparseLinear.from_linear(lins[1], 0.5, "wnorm")]
    mods = [km.TritonRSparseLinear(r).to(DEV) for r in refs]
    group = km.TritonGroup(mods)
    monkeypatch.setattr(km, "KERNEL_MAX_ROWS", 2)
    monkeypatch.setattr(tg, "_launch", lambda *a, **k: pytest.fail("a kernel ran above KERNEL_MAX_ROWS"))
    x = torch.distributions.Laplace(0.0, 1.0).sample((3, 1, 96))
    with torch.no_grad():
        for y, r in zip(group(x.to(DEV)), refs):
            assert ((y.cpu() - r(x)).norm() / r(x).norm()).item() < 1e-5
        y = group.silu_mul(x.to(DEV)).cpu()
        ref = torch.nn.functional.silu(refs[0](x)) * refs[1](x)
        assert ((y - ref).norm() / ref.norm()).item() < 1e-5


def test_kernel_rows_rule_by_hand():
    """Rows on the kernels: up to the largest B whose expected union 1 - (1 - keep)^B is <= UNION_MAX
    (r = 0), one row with rank terms, every decode batch when the kept fraction is unknown."""
    from rsparse.kernels.module import UNION_MAX, kernel_rows

    assert UNION_MAX == 0.94
    assert kernel_rows(None, 0) == kernel_rows(None, 16) == 8
    assert kernel_rows(0.5, 16) == kernel_rows(0.1, 32) == 1
    assert kernel_rows(0.5, 0) == 4  # unions 0.5, 0.75, 0.875, 0.9375 | 0.969
    assert kernel_rows(0.3, 0) == 7  # 1 - 0.7^7 = 0.918 | 1 - 0.7^8 = 0.942
    assert kernel_rows(0.6, 0) == 3  # 1 - 0.4^3 = 0.936 | 1 - 0.4^4 = 0.974
    assert kernel_rows(0.95, 0) == 1 and kernel_rows(0.1, 0) == 8  # 1 - 0.9^8 = 0.57


def test_launch_configuration_rule_by_hand():
    """config_for: 128-row K steps; 64-wide tiles below 2^25 weights, 128 from there; chunks of 512 up to
    2^22 weights, 2048 from 56 * 2^20, else 1024; TUNED's one-launch entries only for eager r = 0 calls."""
    def picked(*args, **kw):
        c = tg.config_for(*args, **kw)
        return c["chunk"], c["block_k"], c["block_n"], c.get("splits")

    assert picked(1024, 0, 4096) == picked(2048, 0, 2048) == (512, 128, 64, None)  # 2^22
    assert picked(3072, 0, 8192) == picked(5120, 0, 3072) == (1024, 128, 64, None)
    assert picked(16384, 0, 2048) == picked(12288, 0, 4096) == (1024, 128, 128, None)  # 2^25, 48 * 2^20
    assert picked(14336, 0, 4096) == picked(4096, 0, 14336) == picked(15360, 0, 5120) == (2048, 128, 128, None)
    assert picked(4096, 0, 4096) == (1024, 128, 64, 4)  # eager call: the one-launch kernel
    assert picked(4096, 0, 4096, reduce=False) == picked(4096, 16, 4096) == (1024, 128, 64, None)  # gather alone
    assert picked(28672, 0, 4096) == picked(28672, 32, 4096) == (2048, 128, 256, None)
    assert picked(3072) == (1024, 128, 64, None)  # no input width: taken as square


def test_rows_past_max_rows_run_the_exact_dense_product(monkeypatch):
    """A module whose plan keeps 60% of its channels runs 4 decode rows as the dense product on its
    stored weight (no kernel; equal to the dense layer in float64) and 3 rows on the kernels (the
    sparse oracle); a group runs 4 rows member by member, each its own way."""
    from rsparse.kernels import module as km
    from rsparse.linear import RSparseLinear

    torch.manual_seed(7)
    lins = [torch.nn.Linear(96, 64, bias=True), torch.nn.Linear(96, 32, bias=False)]
    refs = [RSparseLinear.from_linear(lins[0], 0.5, "wnorm", keep=0.6), RSparseLinear.from_linear(lins[1], 0.4, "wnorm", keep=0.3)]
    mods = [km.TritonRSparseLinear(r).to(DEV) for r in refs]
    assert [m.max_rows for m in mods] == [3, 7]
    group = km.TritonGroup(mods)
    assert group.max_rows == 3
    launches = []
    real_launch = tg._launch
    monkeypatch.setattr(tg, "_launch", lambda *a, **k: launches.append(a[1].shape[1]) or real_launch(*a, **k))
    x4 = torch.distributions.Laplace(0.0, 1.0).sample((4, 96))
    dense = [torch.nn.functional.linear(x4.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
             for lin in lins]
    with torch.no_grad():
        y = mods[0](x4.to(DEV)).cpu()
        assert launches == [] and ((y.double() - dense[0]).norm() / dense[0].norm()).item() < 1e-6
        y3 = mods[0](x4[:3].to(DEV)).cpu()
        assert launches == [64] and ((y3 - refs[0](x4[:3])).norm() / refs[0](x4[:3]).norm()).item() < 1e-5
        assert ((y3.double() - dense[0][:3]).norm() / dense[0].norm()).item() > 1e-3  # really sparse at 3 rows
        launches.clear()
        ya, yb = group(x4.to(DEV))
        assert launches == [32]  # the member with keep 0.3 alone runs the kernels at 4 rows
        assert ((ya.cpu().double() - dense[0]).norm() / dense[0].norm()).item() < 1e-6
        assert ((yb.cpu() - refs[1](x4)).norm() / refs[1](x4).norm()).item() < 1e-5


def test_triton_group_module_shares_storage_and_matches_members():
    from rsparse.kernels.module import TritonGroup, TritonRSparseLinear
    from rsparse.linear import RSparseLinear

    torch.manual_seed(2)
    lins = [torch.nn.Linear(200, o, bias=False) for o in (128, 128, 256)]
    factors = [(torch.randn(o, r) / 4, torch.randn(r, 200) / 4) for o, r in zip((128, 128, 256), (6, 0, 11))]
    refs = [RSparseLinear.from_linear(lin, t, "wnorm", *(f if f[0].shape[1] else (None, None)))
            for lin, t, f in zip(lins, (0.3, 0.6, 0.1), factors)]
    mods = [TritonRSparseLinear(r).to(DEV) for r in refs]
    # ranks 6, 0, 11 stored as 16, 0, 16 columns (aligned rows); the added columns are zero
    assert TritonGroup.fits(mods) and [m.rank for m in mods] == [16, 0, 16]
    assert not mods[0].at[:, 6:].any() and not mods[0].U[:, 6:].any() and torch.equal(mods[2].U[:, :11], refs[2].U.to(DEV))
    g = TritonGroup(mods)
    assert all(m.wt.data_ptr() >= g.wt.data_ptr() and m.wt.stride(0) == 512 for m in mods)  # views, no copies
    assert mods[2].at.data_ptr() == g.at.data_ptr() + 16 * g.at.element_size() and mods[2].at.stride(0) == 32
    assert mods[2].U.data_ptr() == g.U.data_ptr() + 128 * 16 * g.U.element_size()
    mods[1].tau.fill_(0.7)  # a member's threshold moves the group's
    refs[1].tau.fill_(0.7)
    x = torch.distributions.Laplace(0.0, 1.0).sample((1, 1, 200))
    with torch.no_grad():
        ys = g(x.to(DEV))
        for y, m, r in zip(ys, mods, refs):
            ref = r(x)
            assert y.shape == ref.shape and ((y.cpu() - ref).norm() / ref.norm()).item() < 1e-5
            assert ((m(x.to(DEV)).cpu() - ref).norm() / ref.norm()).item() < 1e-5
    pair = TritonGroup(mods[:2])  # gate|up-like: SiLU(a) * b from the epilogue, for decode and prefill rows
    for shape in [(1, 1, 200), (2, 9, 200)]:
        x = torch.distributions.Laplace(0.0, 1.0).sample(shape)
        with torch.no_grad():
            ref = torch.nn.functional.silu(refs[0](x)) * refs[1](x)
            y = pair.silu_mul(x.to(DEV)).cpu()
        assert y.shape == ref.shape and ((y - ref).norm() / ref.norm()).item() < 1e-5


def test_fused_groups_in_decoder_match_per_module_steps(monkeypatch):
    """to_triton_ on a tiny Llama attaches q|k|v and gate|up groups; the decoder's steps through them
    give the per-module Triton steps' logits, and prefill (dense_view) detaches them. The graphed step
    with the fused attention hands it the q|k|v group's one output (`decode_attention_rope_qkv`), the
    per-module model's three, and both give the eager steps' logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rsparse.apply import modules_for
    from rsparse.decode import GraphDecoder, StaticDecoder
    from rsparse.kernels import attention
    from rsparse.families import attached_groups, set_module
    from rsparse.kernels.module import to_triton_
    from rsparse.plan import LayerPlan

    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    models = []
    for fuse in (True, False):
        torch.manual_seed(3)
        m = LlamaForCausalLM(cfg).eval().to(DEV)
        ranks = {"q": 5, "gate": 3, "down": 4}  # rank terms inside both groups and in a lone projection
        layers = {f"{i}.{p}": LayerPlan(tau=0.05 * (1 + j), keep=0.5, rank=ranks.get(p, 0))
                  for i in range(2) for j, p in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}
        gen = torch.Generator().manual_seed(4)
        shapes = {"q": (128, 128), "gate": (256, 128), "down": (128, 256)}
        factors = {f"{i}.{p}": ((torch.randn(o, ranks[p], generator=gen) / 8).to(DEV), (torch.randn(ranks[p], n, generator=gen) / 8).to(DEV))
                   for i in range(2) for p, (o, n) in shapes.items()}
        for key, mod in modules_for(m, layers, factors).items():
            set_module(m, key, mod)
        # padded to 16: q 11 x 256, gate 13 x 384, down 12 x 384 columns per layer, against 147,456
        # dense elements per layer (q, o 128x128; k, v 64x128; gate, up 256x128; down 128x256): 8.4%
        with pytest.warns(UserWarning, match=r"not all multiples of 16.* read 8\.4% of the projections' dense bytes more"):
            to_triton_(m, fuse=fuse)
        models.append(m)
    assert len(attached_groups(models[0])) == 4 and not attached_groups(models[1])
    with pytest.warns(UserWarning, match="to_triton_: the model has no sparse modules"):
        assert to_triton_(LlamaForCausalLM(cfg).eval()) == {}  # dense: named, not silently left dense
    joined = []
    real = attention.decode_attention_rope_qkv
    monkeypatch.setattr(attention, "decode_attention_rope_qkv", lambda qkv, *a, **kw: joined.append(qkv.shape) or real(qkv, *a, **kw))
    ids = torch.randint(0, 97, (1, 5), device=DEV)
    a, b = StaticDecoder(models[0], 16), StaticDecoder(models[1], 16)
    ga, gb = GraphDecoder(models[0], 16, attention="fused"), GraphDecoder(models[1], 16, attention="fused")
    with torch.no_grad():
        la, lb = a.prefill(ids), b.prefill(ids)
        assert torch.equal(la, lb) and torch.equal(ga.prefill(ids), la) and torch.equal(gb.prefill(ids), la)
        for t in range(2):  # a step past the prefill's position, and one past the first step's write
            tok = la.argmax(-1, keepdim=True)
            la, lb = a.forward(tok), b.forward(tok)
            assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4), t
            pos = torch.tensor([5 + t], device=DEV)
            for g in (ga, gb):
                assert torch.allclose(g.step(tok, pos), la, atol=1e-4, rtol=1e-4), t
    assert joined == [(1, 1, 256)] * 4  # grouped: 2 layers x 2 steps, q|k|v side by side; per-module: never


def test_gpu_bench_modules_at_the_budget():
    """rsparse bench --device cuda --alpha: every projection gets the rank and kept fraction the budget
    gives (bytes = (1 - s) of dense), and thresholds that the harness can move in place."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rsparse.budget import allocate
    from rsparse.families import locate
    from rsparse.gpumodel import modules_at
    from rsparse.kernels.module import RANK_ALIGN

    m = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=97))
    projs = locate(m)
    for alpha in (1.0, 0.5):
        mods, quantile = modules_at(projs, 0.6, alpha)
        for k, mod in mods.items():
            out_f, in_f = projs[k].weight.shape
            r = allocate(out_f, in_f, 0.6, alpha).rank // RANK_ALIGN * RANK_ALIGN  # rounded to the stored multiple
            assert mod.rank == (r if alpha < 1 else 0) and (k in quantile) == (alpha < 1)
            if alpha < 1:  # the bytes stay the budget's: columns saved by the rounding go to kept channels
                assert ((1 - quantile[k]) * in_f * out_f + r * (in_f + out_f)) == pytest.approx(0.4 * in_f * out_f, rel=1e-9)
            mod.tau.fill_(0.25)  # the harness moves thresholds in place, outside inference mode
        assert alpha == 1.0 or any(mod.rank for mod in mods.values())


def test_kernels_trace_as_torch_compile_analyses_them():
    """torch.compile runs its own analysis of every user Triton kernel (which pointers it writes); if
    tracing fails it assumes every input mutated and copies them all on each call (session 6: the
    SiLU*up epilogue with rank terms did, copying U). Here every kernel compiles for sm_90 with its
    scalar arguments as constants (as torch 2.11 traces), again with them typed as inductor's launcher
    types them (a float is fp64 there: session 13's attention kernel failed on the H200 that way), and
    torch's analysis finds exactly the outputs. A subprocess: Triton's interpreter, on for this module, has no compiler to analyse."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_analysis.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    written = json.loads(run.stdout.strip().splitlines()[-1])
    assert written == {"select": ["cnt_ptr", "idx_ptr", "zpart_ptr"], "group_z": ["zpart_ptr"], "gather": ["ypart_ptr"],
                       "fused_gather": ["scratch_ptr", "ypart_ptr"],
                       "ranked_gather": ["scratch_ptr", "sync_ptr", "ypart_ptr", "zpart_ptr"],
                       "splitk": ["lock_ptr", "scratch_ptr", "y_ptr", "ypart_ptr"],
                       "epilogue": ["y_ptr"], "glu_epilogue": ["y_ptr"], "teal": ["y_ptr"],
                       "attention": ["lock_ptr", "o_ptr", "part_ptr"],
                       "attention_rope": ["k_ptr", "lock_ptr", "o_ptr", "part_ptr", "v_ptr"],
                       "add_rms_norm": ["s_ptr", "y_ptr"]}
