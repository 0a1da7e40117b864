"""`rsparse bench --device cuda --profile`: where one decode step's GPU time goes, kernel by kernel.

Batch 1, Llama-architecture shapes with random bf16 weights (as `gpubench`); the eager step (the
kernels a CUDA graph replays, without launch gaps; also with the PyTorch norm instead of the fused
one, side by side) and the torch.compile'd step (default mode), dense and sparse (fused groups; rank
terms for --alpha < 1), each with its graph replay time.
Prints the top kernels per step; writes its JSON to `out` (--out), else $OUT/gpu_profile.json when OUT is set.
"""
import os
import statistics

import torch
import torch._dynamo

from .apply import swapped
from .atomic import write_json
from .decode import GraphDecoder, gpu_inductor
from .families import locate
from .gpubench import MAX_LEN, REPEATS, capture, time_graph
from .gpumodel import attached, build, modules_at, sparse_samples
from .gpuvariants import compile_options, cuda_gather_step, uncached_compiles
from .kernels.module import triton_groups


def kernel_table(events, steps: int, top: int = 25):
    """The CUDA kernels of `steps` profiled steps grouped by name (its first 90 characters), per step:
    (total µs, launches, the `top` largest as (name, µs, launches), largest first). Other events (CPU
    operators) are left out."""
    kernels = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name[:90], [0.0, 0.0])
            k[0] += e.device_time / steps
            k[1] += 1 / steps
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return sum(v[0] for v in kernels.values()), sum(v[1] for v in kernels.values()), [(n, us, c) for n, (us, c) in ranked]


@torch.inference_mode()
def _explain(step, ids, pos) -> dict:
    """Does dynamo see the step as one graph? (graphs, breaks, the first reasons)"""
    try:
        ex = torch._dynamo.explain(step)(ids, pos)
        return {"graphs": ex.graph_count, "breaks": ex.graph_break_count,
                "reasons": [str(b.reason)[:160] for b in ex.break_reasons[:8]]}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def profile(name, sparsity=0.5, alpha=1.0, steps=5, rank_modes=(), out=None, attention="fused", dtype=torch.bfloat16,
            gather_chunks=()):
    """Where a decode step's GPU time goes: kernels grouped by name, batch 1, for the eager step (the
    same kernels a graph replays, without the launch gaps) and the torch.compile'd step (default
    mode), dense and sparse (fused groups; rank terms for alpha < 1, as `modules_at`), plus each
    one's CUDA-graph replay time; rank_modes: the compiled sparse step again with each of these
    `triton_gemv.RANK_MODES` (launch counts and kernel time against graph time: the launch gaps);
    gather_chunks: instead, only the compiled sparse step under `decode.GPU_INDUCTOR` (as the bench
    compiles it) with the Triton gather and with the CUDA one at each of these chunks per block
    (`cuda_gather.CHUNKS`), and dynamo's graph count with the CUDA one."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    uncached_compiles()
    model = build(name, dtype)
    projs = locate(model)
    sparse, quantile = modules_at(projs, sparsity, alpha)
    sparse_samples(model, sparse, quantile, sparsity)  # sets the thresholds
    dec = GraphDecoder(model, max_len=MAX_LEN, batch=1, attention=attention)
    ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([MAX_LEN // 2], device="cuda")
    groups = triton_groups(model, sparse)
    result = {}
    result["explain"] = _explain(dec.step, ids, pos)
    print("explain:", result["explain"], flush=True)
    # the eager steps again with the PyTorch norm (the default on CUDA fuses residual add + norm): A/B in one run
    steps_ = [("dense", {}, {}, False, {}), ("fused", sparse, groups, False, {}),
              ("dense-torch-norm", {}, {}, False, {"norm": "torch"}), ("fused-torch-norm", sparse, groups, False, {"norm": "torch"}),
              ("dense-compiled", {}, {}, True, {}), ("fused-compiled", sparse, groups, True, {})]
    steps_ += [(f"fused-compiled-rank-{m}", sparse, groups, True, {"rank_terms": m}) for m in rank_modes]
    if gather_chunks:  # only the e2e A/B's steps, kernel by kernel (the CUDA one, 6-28% faster per call alone, ties there, sessions 34-36;
        # a fresh machine compiles a step in ~100 s: the other steps would not leave room in one 600 s call)
        steps_ = [("fused-compiled-tuned", sparse, groups, True, {"inductor": gpu_inductor()})]
        steps_ += [(label, sparse, groups, True, {"inductor": gpu_inductor(), **opts})
                   for label, opts in (cuda_gather_step("fused-compiled", k) for k in gather_chunks)]
        with swapped(model, sparse), attached(model, groups), compile_options(dec, gather="cuda"):
            torch._dynamo.reset()
            result["explain_cuda_gather"] = _explain(dec.step, ids, pos)
        print("explain, sparse step with the CUDA gather:", result["explain_cuda_gather"], flush=True)
    for label, mods, grp, compiled, opts in steps_:
        torch._dynamo.reset()
        # inference mode as the bench compiles: outside it, a step under gpu_inductor() traced the
        # backward of the partials op and failed (session 36)
        with swapped(model, mods), attached(model, grp), compile_options(dec, **opts), torch.inference_mode():
            step = torch.compile(dec.step) if compiled else dec.step
            for _ in range(3):
                step(ids, pos)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    step(ids, pos)
                torch.cuda.synchronize()
            g, _ = capture(step, 1)
            graph_ms = statistics.median(time_graph(g) for _ in range(REPEATS)) * 1e3
            del g
        total, launches, top = kernel_table(prof.events(), steps)
        result[label] = {"graph_ms": graph_ms, "kernel_ms": total / 1e3, "kernels_per_step": launches,
                         "top": [{"name": n, "us": us, "count": c} for n, us, c in top]}
        print(f"\n{label}: graph replay {graph_ms:.3f} ms/step; kernels {total / 1e3:.3f} ms in {launches:.0f} launches")
        for n, us, c in top:
            print(f"  {us:9.1f} us  {c:6.0f}x  {n}")
    out = out or (os.path.join(os.environ["OUT"], "gpu_profile.json") if os.environ.get("OUT") else None)
    if out:
        write_json(out, result)
    return result
