"""`rsparse bench --device cuda`: end-to-end GPU decode, dense cuBLAS vs R-Sparse Triton kernels, on Llama-architecture models with
random bf16 weights (--dtype float16: fp16; Llama-3-8B and Llama-2-7B shapes), static KV cache, one decode step captured in a
CUDA graph (`decode.GraphDecoder`), batch 1/2/4/8, sparsity 40-70%.

Thresholds come from the model's own forward passes (|x| at every projection input over a prefill
of random tokens through the sparse model, each threshold set before its projection runs, as
`gpumodel.sparse_samples`; per-projection quantile for a uniform plan at the target byte sparsity, r = 0),
so the kept fractions are what these activations give (from session 31; before, the samples came from
the dense model's prefill, and the sparse steps ran at slightly more sparsity than the labels). Dense and sparse steps are replayed
alternately (median of repeats, each repeat = `STEPS` replays timed with CUDA events). A
torch.compile(mode="reduce-overhead") step is timed too at batch 1 (it fuses the elementwise ops
the manual graph runs one by one). Compiled, dense has two baselines: cuBLAS matmuls under inductor's
defaults ("dense", the issue's baseline as named) and the step under `decode.GPU_INDUCTOR`
("dense-tuned": at batch 1 inductor's own Triton GEMV, 21% faster on an H200 in session 17); the
sparse step is compiled under GPU_INDUCTOR too, and `compiled_speedup_vs_best_dense` is against the
fastest compiled dense step of the run. Every compiled step's output is checked against the eager
step over the same modules with every channel kept (`compiled_vs_eager`). Bandwidth: bytes that must be read per token (projection bytes
x realised kept fraction, lm_head, norms, the whole KV cache) / time / measured copy bandwidth.
At batch 1 the dense model's own Hugging Face `generate` is timed as a reference row, never the
baseline (`hfreference`, --hf-reference). --head-sparsity H sparsifies the lm_head too (r = 0, its
threshold from the same prefill; `gpumodel.with_head`): the rows' "sparsity" stays the blocks'.

    rsparse bench --device cuda [--shapes llama3-8b] [--batches 1] [--tuned FILE] [--out FILE] [--profile]
Prints a table, ends with one JSON line, writes --out (default $OUT/gpu_decode.json when OUT is set).
(benchmarks/gpu_decode.py runs the same with the same flags.)
"""
import copy
import functools
import json
import os
import statistics
import time

import torch
import torch._dynamo

from .apply import swapped
from .atomic import write_json
from .bench import parse_sparsities
from .decode import ATTENTION, GraphDecoder, cuda_graph, fresh_step, gpu_inductor
from .errors import RSparseError
from .budget import check_sparsity
from .families import HEAD, locate, swappable
from .kernels import triton_gemv as tg
from .kernels.module import triton_groups
from .gpuvariants import (compile_options, compiled_variants, gather_chunks, inductor_patches, private_inductor_cache,
                          rank_modes, rank_patches, skip_compile, uncached_compiles)
from .hfreference import hf_generate_tok_s, hf_modes
from .linear import RSparseLinear
from .models import parse_dtype
from .gpumodel import MODELS, attached, build, modules_at, set_thresholds, sparse_samples, with_head

MAX_LEN, STEPS, REPEATS = 512, 32, 7


def gpu_dtype(name) -> torch.dtype:
    """--dtype of the GPU bench (`models.parse_dtype`'s names): bfloat16 (None, the default) or float16;
    the kernels read 2-byte weights."""
    dtype = parse_dtype(name or "bfloat16")
    if dtype not in (torch.bfloat16, torch.float16):
        raise RSparseError(f"the GPU benchmark runs bfloat16 or float16 weights, got --dtype {name!r}")
    return dtype


def copy_bandwidth():
    """Measured device copy bandwidth (bytes/s: read + write of a 2 GiB buffer, far beyond L2)."""
    import triton.testing

    a = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), rep=300, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def capture(step, B):
    """One decode step (`step(ids, pos)`, eager or compiled) captured in a CUDA graph. Rows decode
    different tokens: identical rows would have identical kept sets and hide the union's cost."""
    ids = torch.arange(1, B + 1, dtype=torch.long, device="cuda")[:, None] * 7919
    return cuda_graph(step, ids, torch.tensor([MAX_LEN // 2], device="cuda"))


def compiled_vs_eager(compiled, eager, taus) -> float:
    """Relative error of a compiled step's logits against the eager step over the same modules, both
    replayed with every threshold at 0 (every channel kept: the same kernels and data paths, no kept
    set to differ). At the real thresholds the random-weight models amplify the compiled step's
    rounding differences through channels that cross the threshold: 0.15 after 2 layers, 0.5 after 8
    and ~1 after 32 for the 50% step at batch 2, where the dense step stays at 0.01-0.06
    (`benchmarks/gpu_compiled_check.py`, session 17); at tau = 0 a sparse step should agree like dense."""
    saved = {k: t.clone() for k, t in taus.items()}
    try:
        for t in taus.values():
            t.zero_()
        (g, got), (g_ref, ref) = compiled, eager
        g.replay()
        g_ref.replay()
        return ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    finally:
        for k, t in taus.items():
            t.copy_(saved[k])


def time_graph(g):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(STEPS):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / STEPS * 1e-3  # s per token step


def run_gpu_bench(args):
    """args: shapes, batches, sparsities (comma lists), tuned (JSON path or None), compile, fused,
    reduce_overhead, time_limit (s), profile, out (path or None). Inductor tunes afresh in a private
    cache directory (`gpuvariants.private_inductor_cache`) unless TORCHINDUCTOR_CACHE_DIR names one."""
    with private_inductor_cache():
        return _run_gpu_bench(args)


def _run_gpu_bench(args):
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise RSparseError(f"unknown --shapes {unknown}; choose from {sorted(MODELS)}")
    sparsities = parse_sparsities(args.sparsities)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise RSparseError(f"--batches is a comma list of numbers, got {args.batches!r}") from None
    if any(not 1 <= b <= 8 for b in batches):
        raise RSparseError(f"--batches must be 1..8 (the decode kernels' rows), got {args.batches}")
    tuned = read_tuned(args.tuned) if args.tuned else {}
    alpha = getattr(args, "alpha", 1.0)
    if not 0.0 < alpha <= 1.0:
        raise RSparseError(f"--alpha must be in (0, 1], got {alpha}")
    if alpha < 1.0 and len(sparsities) != 1:
        raise RSparseError("--alpha < 1 sizes every projection's rank for one sparsity: give one --sparsities value")
    hf_reference = hf_modes(getattr(args, "hf_reference", "eager"))  # a bad mode fails before any work
    if rank_modes(args) and alpha == 1.0:
        raise RSparseError("--compare-rank compares ways of computing rank terms: give --alpha < 1 too")
    compare = getattr(args, "compare_attention", False)
    if isinstance(compare, str) and compare not in ATTENTION:
        raise RSparseError(f"--compare-attention: unknown attention {compare!r}; choose from {list(ATTENTION)}")
    if rank_patches(args) and alpha == 1.0:
        raise RSparseError("--rank-ab compares ways of computing rank terms: give --alpha < 1 too")
    inductor_patches(args)  # a bad --inductor-ab fails before any work
    if not 1 <= getattr(args, "retune", 1) <= 4:
        raise RSparseError(f"--retune must be 1..4 (compiles of each tuned step), got {args.retune}")
    dtype = gpu_dtype(getattr(args, "dtype", None))
    chunks = gather_chunks(args)  # a bad list fails before any work, on any machine
    if not torch.cuda.is_available():
        raise RSparseError("rsparse bench --device cuda needs a CUDA GPU (none is visible); use --device cpu here")
    if chunks:  # builds the CUDA gather now: no nvcc fails before any work
        from .kernels import cuda_gather

        try:
            cuda_gather.require()
        except ValueError as e:
            raise RSparseError(f"--compare-gather: {e}") from None
    head_s = getattr(args, "head_sparsity", 0.0)
    if head_s == "auto":
        raise RSparseError("--device cuda takes a number for --head-sparsity (the head's sparsity beside the blocks'); "
                           "'auto' is for plans of a real model (--device cpu, calibrate, eval)")
    head_s = check_sparsity(head_s, "--head-sparsity")
    if args.profile:
        if head_s:
            raise RSparseError("--profile times the steps with a dense lm_head; leave out --head-sparsity")
        from .gpuprofile import profile

        return profile(names[0], sparsities[0] if len(sparsities) == 1 else 0.5, alpha, rank_modes=rank_modes(args), out=args.out,
                       attention=getattr(args, "attention", "fused"), dtype=dtype,
                       gather_chunks=chunks)
    uncached_compiles()
    torch._dynamo.config.automatic_dynamic_shapes = False  # batch sizes compile as separate static graphs
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    t_start = time.time()
    tg.load_tuned(tuned)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s  {dtype}  tuned shapes: {sorted(tg.TUNED)}", flush=True)
    rows, compiled, checks, compiled_err, skipped = [], [], [], {}, []
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_decode.json") if os.environ.get("OUT") else None)

    def save():  # after every batch size too: a run stopped by its time limit keeps what it measured
        if out:
            write_json(out, {"dtype": str(dtype).removeprefix("torch."), "checks": checks, "compiled_vs_eager_rel_err": compiled_err, "copy_bw_TBps": bw / 1e12, "max_len": MAX_LEN, "steps": STEPS, "repeats": REPEATS,
                             "tuned": {f"{o}x{i}": c for (o, i), c in tg.TUNED.items()}, "compiled": compiled, "rows": rows, "skipped_steps": skipped,
                             "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
                             "seconds": time.time() - t_start})
    for name in names:
        if time.time() - t_start > args.time_limit:
            break
        torch.manual_seed(0)
        model = build(name, dtype)
        projs = locate(model)
        sparse, quantile = modules_at(projs, sparsities[0], alpha, decide_rows=len(sparsities) == 1)
        with_head(projs, sparse, quantile, model, head_s)
        groups = triton_groups(model, sparse) if args.fused else {}  # built, attached per capture
        taus = {k: m.tau for k, m in sparse.items()}  # updated in place per sparsity (graphs see them; group views too)
        samples = functools.partial(_samples_at, {}, model, sparse, taus, quantile)  # sparsity -> samples; sets taus
        lin_bytes = {k: m.weight.numel() * 2 for k, m in projs.items()}
        other_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                          if "proj" not in n and "embed_tokens" not in n and not (HEAD in projs and n.startswith("lm_head")))
        for B in batches:
            if time.time() - t_start > args.time_limit:
                break
            dec = GraphDecoder(model, max_len=MAX_LEN, batch=B, attention=getattr(args, "attention", "fused"))
            kv_bytes = sum(t.numel() * t.element_size() for t in dec.k_cache + dec.v_cache)
            g_dense, out_dense = capture(dec.step, B)
            with swapped(model, sparse):
                g_sparse, out_sparse = capture(dec.step, B)
                if groups:
                    with attached(model, groups):
                        g_fused, out_fused = capture(dec.step, B)
                        if B == 1:  # the same groups without SiLU(gate)*up in the epilogue: what that fusion gives
                            dec.silu = False
                            g_noglu, _ = capture(dec.step, B)
                            dec.silu = True
            # the same steps compiled by inductor (default mode: fused elementwise kernels) and captured
            # in our graphs; no dynamo reset in between, so both compiled steps' kernels stay loaded
            comp, label_c = {}, "fused" if groups else "sparse"
            if args.compile and time.time() - t_start < args.time_limit:
                longest = 0.0
                for label, mods, grp, opts in compiled_variants(args, label_c, sparse, groups, B):
                    if skip_compile(label, label_c, time.time() - t_start, longest, args.time_limit):
                        print(f"skipped the {label} step (B={B}): it would end past --time-limit "
                              f"({longest:.0f}s, the longest compile so far)", flush=True)
                        skipped.append(f"B{B}.{label}")
                        continue
                    with swapped(model, mods), attached(model, grp), compile_options(dec, **opts):
                        t0 = time.time()
                        step = fresh_step(dec)  # a code object of its own: else dynamo could reuse another variant's code
                        comp[label], out_c = capture(torch.compile(step), B)
                        longest = max(longest, time.time() - t0)
                        print(f"compiled {label} step (B={B}) in {time.time() - t0:.0f}s", flush=True)
                        ref = (g_dense, out_dense) if not mods else (g_fused, out_fused) if grp else (g_sparse, out_sparse)
                        err = compiled_vs_eager((comp[label], out_c), ref, taus)
                        compiled_err[f"B{B}.{label}"] = err
                        print(f"  {label} compiled vs eager, every channel kept: rel err {err:.2e}"
                              + ("   MISMATCH" if not err < 0.1 else ""), flush=True)
            if B == 1:
                checks.append(check_against_oracle(name, model, projs, dec, g_sparse, out_sparse, taus, samples(0.5), sparse, quantile))
                if groups:
                    g_fused.replay()
                    g_sparse.replay()
                    checks[-1]["fused_vs_unfused_rel_err"] = ((out_fused.float() - out_sparse.float()).norm()
                                                              / out_sparse.float().norm()).item()
                    print("fused vs unfused step:", checks[-1]["fused_vs_unfused_rel_err"], flush=True)
            for s in sparsities:
                kept = {}
                for k, x in samples(s).items():
                    xb = x[: x.shape[0] // B * B].reshape(-1, B, x.shape[1])  # B rows at a time: union of kept channels
                    kept[k] = (xb > taus[k]).any(1).float().mean().item()
                d, sp, fu, ng, ct = [], [], [], [], {}
                for _ in range(REPEATS):
                    d.append(time_graph(g_dense))
                    sp.append(time_graph(g_sparse))
                    if groups:
                        fu.append(time_graph(g_fused))
                    if groups and B == 1:
                        ng.append(time_graph(g_noglu))
                    for label, g in comp.items():
                        ct.setdefault(label, []).append(time_graph(g))
                td, ts = statistics.median(d), statistics.median(sp)
                tf = statistics.median(fu) if groups else None
                dense_read = sum(lin_bytes.values()) + other_bytes + kv_bytes
                on = {k: B <= sparse[k].max_rows for k in projs}  # else the dense product: every byte, no rank terms
                rank_read = sum(2 * sparse[k].rank * (sparse[k].out_features + (1 - kept[k]) * sparse[k].in_features)
                                for k in projs if on[k])
                sparse_read = sum(lin_bytes[k] * (kept[k] if on[k] else 1.0) for k in projs) + rank_read + other_bytes + kv_bytes
                row = {"model": name, "batch": B, "sparsity": s, "head_sparsity": head_s, "alpha": alpha, "rank_bytes": rank_read, "dense_tok_s": B / td, "sparse_tok_s": B / ts,
                       "speedup": td / ts, "dense_ms": td * 1e3, "sparse_ms": ts * 1e3,
                       "kept_union": sum(lin_bytes[k] * kept[k] for k in projs) / sum(lin_bytes.values()),
                       "on_kernels": sum(lin_bytes[k] for k in projs if on[k]) / sum(lin_bytes.values()),
                       "dense_bw_frac": dense_read / td / bw, "sparse_bw_frac": sparse_read / ts / bw,
                       "bound_speedup": dense_read / sparse_read}
                if tf is not None:
                    row.update(fused_tok_s=B / tf, fused_speedup=td / tf, fused_bw_frac=sparse_read / tf / bw)
                if ng:
                    row["fused_no_glu_tok_s"] = B / statistics.median(ng)
                if "dense" in ct and label_c in ct:
                    tcd, tcs = statistics.median(ct["dense"]), statistics.median(ct[label_c])
                    row.update(dense_compiled_tok_s=B / tcd, compiled_tok_s=B / tcs, compiled_speedup=tcd / tcs,
                               dense_compiled_bw_frac=dense_read / tcd / bw, compiled_bw_frac=sparse_read / tcs / bw)
                    for label in set(ct) - {"dense", label_c}:  # the A/B variants: tok/s and x the compiled dense
                        t = statistics.median(ct[label])
                        row[f"compiled_{label}_tok_s"], row[f"compiled_{label}_speedup"] = B / t, tcd / t
                    # the fastest compiled dense of the run (any "dense*" step): the speedup a user sees against it
                    tbest = min(statistics.median(t) for label, t in ct.items() if label.startswith("dense"))
                    row.update(best_dense_compiled_tok_s=B / tbest, compiled_speedup_vs_best_dense=tbest / tcs)
                    repeats = [label_c] + [f"{label_c}-{i}" for i in range(2, getattr(args, "retune", 1) + 1)]
                    if len(repeats) > 1:  # --retune: the best compile of each against the best of the other
                        tsb = min(statistics.median(ct[label]) for label in repeats if label in ct)
                        row.update(best_sparse_compiled_tok_s=B / tsb, best_compiled_speedup_vs_best_dense=tbest / tsb)
                        cg = [label for label in ct if label.startswith(f"{label_c}-cuda-gather")]
                        if cg:  # --compare-gather: its best compile too (each variant tuned as often as the Triton step)
                            best = min(cg, key=lambda label: statistics.median(ct[label]))
                            tgb = statistics.median(ct[best])
                            row.update(best_cuda_gather_compiled_tok_s=B / tgb, best_cuda_gather_speedup_vs_best_dense=tbest / tgb,
                                       best_cuda_gather_step=best)
                rows.append(row)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            if B == 1 and time.time() - t_start < args.time_limit:  # the dense model's own generate: a reference row
                ref = {}
                for mode in hf_reference:
                    try:  # a reference row that fails (another transformers version) must not cost the run
                        ref.update(hf_generate_tok_s(model, 1, getattr(args, "tokens", STEPS), mode))
                    except Exception as e:
                        ref[f"hf_generate_{mode}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        print(f"reference {mode} failed:", ref[f"hf_generate_{mode}_error"], flush=True)
                for r in rows[-len(sparsities):]:
                    r.update(ref)
                if ref:
                    print("reference, not the baseline: Hugging Face generate on the dense model, batch 1: "
                          + ", ".join(f"{k[12:-6]} {v:.1f} tok/s" for k, v in ref.items() if k.endswith("_tok_s")), flush=True)
            save()
            del g_dense, g_sparse
            if groups:
                del g_fused
            if groups and B == 1:
                del g_noglu
            del comp
            if args.compile and getattr(args, "reduce_overhead", True) and B == 1 and time.time() - t_start < args.time_limit:
                s_ro = 0.5 if 0.5 in sparsities else sparsities[0]  # the issue's headline, else what was asked
                compiled.append(compiled_step(name, model, sparse, taus, samples(s_ro), dec, quantile, groups, t_start + args.time_limit, s_ro,
                                              getattr(args, "tuned_dense", True)))
                save()
            del dec
            torch.cuda.empty_cache()
        del model, sparse, samples
        torch.cuda.empty_cache()

    print(f"\n{'model':10s} {'B':>2s} {'s':>4s} {'dense tok/s':>11s} {'sparse tok/s':>12s} {'speedup':>8s} {'fused tok/s':>11s} "
          f"{'fused x':>8s} {'bound':>6s} {'BW dense':>9s} {'BW sparse':>9s} {'BW fused':>9s} {'kept':>5s} {'kern':>5s}")
    for r in rows:
        print(f"{r['model']:10s} {r['batch']:2d} {r['sparsity']:4.2f} {r['dense_tok_s']:11.1f} {r['sparse_tok_s']:12.1f} "
              f"{r['speedup']:8.2f} {r.get('fused_tok_s', float('nan')):11.1f} {r.get('fused_speedup', float('nan')):8.2f} "
              f"{r['bound_speedup']:6.2f} {r['dense_bw_frac']:9.1%} {r['sparse_bw_frac']:9.1%} {r.get('fused_bw_frac', float('nan')):9.1%} "
              f"{r['kept_union']:5.2f} {r['on_kernels']:5.2f}")
    print(f"\ncompiled (inductor default mode, captured in a CUDA graph):\n{'model':10s} {'B':>2s} {'s':>4s} {'dense tok/s':>11s} "
          f"{'sparse tok/s':>12s} {'speedup':>8s} {'BW dense':>9s} {'BW sparse':>9s}")
    for r in rows:
        if "compiled_speedup" in r:
            print(f"{r['model']:10s} {r['batch']:2d} {r['sparsity']:4.2f} {r['dense_compiled_tok_s']:11.1f} {r['compiled_tok_s']:12.1f} "
                  f"{r['compiled_speedup']:8.2f} {r['dense_compiled_bw_frac']:9.1%} {r['compiled_bw_frac']:9.1%}"
                  + (f"   best dense {r['best_dense_compiled_tok_s']:.1f} tok/s: {r['compiled_speedup_vs_best_dense']:.2f}x"
                     if "best_dense_compiled_tok_s" in r else "")
                  + (f"   best of the --retune compiles: sparse {r['best_sparse_compiled_tok_s']:.1f} tok/s, "
                     f"{r['best_compiled_speedup_vs_best_dense']:.2f}x" if "best_sparse_compiled_tok_s" in r else "")
                  + (f", with the CUDA gather {r['best_cuda_gather_compiled_tok_s']:.1f} tok/s, "
                     f"{r['best_cuda_gather_speedup_vs_best_dense']:.2f}x ({r['best_cuda_gather_step']})"
                     if "best_cuda_gather_compiled_tok_s" in r else ""))
    for r in rows:
        ab = {k[9:-6]: v for k, v in r.items() if k.startswith("compiled_") and k.endswith("_tok_s") and k != "compiled_tok_s"}
        if ab:
            print(f"A/B compiled variants, {r['model']} B={r['batch']} s={r['sparsity']:.2f}: "
                  + ", ".join(f"{k} {v:.1f} tok/s ({r[f'compiled_{k}_speedup']:.2f}x)" for k, v in sorted(ab.items())))
    for c in compiled:
        print("compiled:", json.dumps(c))
    save()
    # headline: the issue's target row (Llama-3-8B, batch 1, 50%) when measured, else the first row
    key = ([r for r in rows if r["model"] == "llama3-8b" and r["batch"] == 1 and r["sparsity"] == 0.5] or rows[:1] or [{}])[0]
    head = (f"{key['model'].replace('-', '_')}_b{key['batch']}_s{round(key['sparsity'] * 100)}" if key else "llama3_8b_b1_s50")
    print(json.dumps({f"{head}_compiled_speedup": key.get("compiled_speedup"),
                      f"{head}_compiled_speedup_vs_best_dense": key.get("compiled_speedup_vs_best_dense"),
                      f"{head}_speedup": key.get("speedup"),
                      f"{head}_fused_speedup": key.get("fused_speedup"), "dense_tok_s": key.get("dense_tok_s"),
                      "sparse_tok_s": key.get("sparse_tok_s"), "compiled": compiled,
                      "rows": [{k: r.get(k) for k in ("model", "batch", "sparsity", "alpha", "speedup", "fused_speedup",
                                                       "compiled_speedup", "compiled_speedup_vs_best_dense",
                                                       "best_compiled_speedup_vs_best_dense", "kept_union",
                                                       "on_kernels")} for r in rows]}))


def _factors(m):
    return (m.U, m.A) if m.rank else (None, None)


def _samples_at(cache, model, sparse, taus, quantile, s):
    """The sparse model's prefill samples at sparsity `s` (`sparse_samples`, computed once per model and
    sparsity in `cache`), with the thresholds they give set."""
    if s not in cache:
        cache[s] = sparse_samples(model, sparse, quantile, s)  # sets the thresholds as it samples
    else:
        set_thresholds(taus, cache[s], quantile, s)  # the same thresholds again, when revisited
    return cache[s]


@torch.inference_mode()
def check_against_oracle(name, model, projs, dec, g_sparse, out_sparse, taus, samples, sparse, quantile):
    """The graph-captured Triton step vs the same step on eager RSparseLinear oracles, at 50% (with
    rank terms: at the kept fractions `quantile` gives), all on the token and position the graph was
    captured with (`cuda_graph` keeps them in g.static). From 4b6847c (distinct tokens per row in
    `capture`) to session 14 the eager steps ran on token 0 and the graph on token 7919, so those
    runs' whole-step figures (cosine ~0, rel_err ~1.4, graph vs eager Triton ~1.4) compared two
    different tokens; their per-projection figures and the bf16-vs-f32 oracle figure were right."""
    set_thresholds(taus, samples, quantile, 0.5)
    g_sparse.replay()
    got = out_sparse.float().clone()
    oracle = {k: RSparseLinear.from_linear(projs[k], taus[k].item(), "abs", *_factors(sparse[k])) for k in projs}
    ids, pos = (t.clone() for t in g_sparse.static[0])
    with swapped(model, oracle):
        ref = dec.step(ids, pos).float()
    with swapped(model, sparse):
        eager = dec.step(ids, pos).float()
    # per projection, on this model's own hidden states: first projection of block 0 and the last down
    per = {}
    for k in ("0.q", "0.down", f"{len(dec.layers) - 1}.down"):
        dt = sparse[k].wt.dtype  # the model's (bfloat16 or float16 here; float32 in the CPU test)
        x = samples[k][:1].to(dt) * torch.sign(torch.randn_like(samples[k][:1])).to(dt)
        a, b = sparse[k](x).float(), oracle[k](x).float()
        per[k] = ((a - b).norm() / b.norm()).item()
    # the same oracle step with float32 weights and cache: how far bf16 rounding alone moves the output
    # of a hard-threshold model (decisions flip near tau), the yardstick for the rel_err above
    # (a float32 copy: converting the model in place would move the weights the captured graphs read)
    model32 = copy.deepcopy(model).float()
    projs32 = {k: m for k, m in swappable(model32).items() if k in projs}
    oracle32 = {k: RSparseLinear.from_linear(projs32[k], taus[k].item(), "abs", *(None if f is None else f.float() for f in _factors(sparse[k])))
                for k in projs32}
    dec32 = GraphDecoder(model32, max_len=MAX_LEN, batch=1, attention="sdpa", norm="torch")  # the plainest float32 reference
    with swapped(model32, oracle32):
        ref32 = dec32.step(ids, pos).float()
    del dec32, model32, projs32, oracle32
    torch.cuda.empty_cache()
    low = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype, "same")
    out0 = {f"oracle_{low}_vs_f32_rel_err": ((ref - ref32).norm() / ref32.norm()).item(),
            "triton_vs_oracle_f32_rel_err": ((got - ref32).norm() / ref32.norm()).item()}
    out = {"model": name, "cosine": torch.nn.functional.cosine_similarity(got, ref).min().item(), **out0,
           "rel_err": ((got - ref).norm() / ref.norm()).item(), "argmax_equal": bool(torch.equal(got.argmax(-1), ref.argmax(-1))),
           "graph_vs_eager_triton_rel_err": ((got - eager).norm() / eager.norm()).item(), "per_projection_rel_err": per}
    print("check:", out, flush=True)
    return out


def compiled_step(name, model, sparse, taus, samples, dec, quantile, groups=None, deadline=float("inf"), sparsity=0.5,
                  tuned_dense=True):
    """torch.compile(mode="reduce-overhead") of the same step, batch 1, at `sparsity` (50% when the run
    asked for it, else its first sparsity), dense (cuBLAS under inductor's defaults; with `tuned_dense`
    also under `GPU_INDUCTOR`: inductor's Triton GEMV) and sparse (fused groups if built, under
    GPU_INDUCTOR): inductor's own
    CUDA graphs capture the triton_ops, entered from Python every step (guards and bookkeeping on the
    CPU per token; `*_enqueue_ms` is that CPU time)."""
    out = {"model": name, "sparsity": sparsity if not quantile else "the --sparsities value, ranks from --alpha"}
    set_thresholds(taus, samples, quantile, sparsity)
    ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([MAX_LEN // 2], device="cuda")
    label_s = "fused" if groups else "sparse"
    import torch._inductor.config as inductor_config

    tuned = gpu_inductor()
    steps = ([("dense", {}, {}, {})] + ([("dense-tuned", {}, {}, tuned)] if tuned_dense else [])
             + [(label_s, sparse, groups or {}, tuned)])
    for label, mods, grp, patch in steps:
        if time.time() > deadline:
            out[f"{label}_skipped"] = "time limit"
            continue
        try:
            torch._dynamo.reset()
            with swapped(model, mods), attached(model, grp), torch.inference_mode(), inductor_config.patch(patch):
                step = torch.compile(dec.step, mode="reduce-overhead")
                t0 = time.time()
                for _ in range(3):
                    step(ids, pos)
                torch.cuda.synchronize()
                out[f"{label}_compile_s"] = time.time() - t0
                times, enqueue = [], []
                for _ in range(REPEATS):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    for _ in range(STEPS):
                        step(ids, pos)
                    enqueue.append((time.perf_counter() - t) / STEPS)
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t) / STEPS)
                out[f"{label}_tok_s"] = 1 / statistics.median(times)
                out[f"{label}_enqueue_ms"] = statistics.median(enqueue) * 1e3
        except Exception as e:  # report, do not lose the table
            out[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if f"{label_s}_tok_s" in out and "dense_tok_s" in out:
        out[f"{label_s}_speedup"] = out[f"{label_s}_tok_s"] / out["dense_tok_s"]
        best = max(out["dense_tok_s"], out.get("dense-tuned_tok_s", 0.0))
        out[f"{label_s}_speedup_vs_best_dense"] = out[f"{label_s}_tok_s"] / best
    print("compiled:", out, flush=True)
    return out


def read_tuned(path) -> dict:
    """{"OUTxIN": launch configuration} from the "best" entry of a benchmarks/gpu_kernels.py result."""
    if not os.path.isfile(path):
        raise RSparseError(f"--tuned {path}: no such file")
    try:
        best = json.loads(open(path).read())["best"]
        for shape, cfg in best.items():
            o, i = map(int, shape.split("x"))
            if not isinstance(cfg, dict) or not {"chunk", "block_k", "block_n", "warps", "stages"} <= set(cfg):
                raise ValueError(shape)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RSparseError(f"--tuned {path}: not a kernel-configuration file (need {{\"best\": {{\"OUTxIN\": {{chunk, block_k, "
                           f"block_n, warps, stages, ...}}}}}}; {type(e).__name__}: {e})") from None
    return best
