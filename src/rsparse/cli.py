"""Command line: `rsparse eval | calibrate | run | generate | fetch`.

User errors (RSparseError, bad arguments) print one line and exit with status 2. With --json the
last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time

from .errors import RSparseError

DEFAULT_TASKS = "winogrande,piqa,sciq,openbookqa,hellaswag,boolq,arc_easy,arc_challenge"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage first otherwise)
        print(f"rsparse: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_model(p, dtype="float32", dtype_help="float32 (default), bfloat16, float16"):
    p.add_argument("--model", default="smollm2-135m", help="bundled name, HF model directory or .gguf file")
    p.add_argument("--dtype", default=dtype, help=dtype_help)


def _add_method(p, default_method="rsparse"):
    p.add_argument("--method", default=default_method, choices=["dense", "rsparse", "teal", "cats"])
    p.add_argument("--sparsity", type=float, default=0.5, help="model-level byte sparsity in [0, 1)")
    p.add_argument("--allocation", default="auto", help="rsparse: auto|uniform; teal: uniform|greedy")
    p.add_argument("--alpha", type=float, default=None,
                   help="uniform rsparse: channel share of each layer's budget (default: best of a small grid on calibration data)")
    p.add_argument("--score", default="abs", choices=["abs", "wnorm", "auto"])
    p.add_argument("--factors", default="aware", choices=["aware", "plain"])
    p.add_argument("--target", default="bytes", choices=["bytes", "gpu"],
                   help="how rank terms are priced: bytes (the method's accounting) or gpu (ranks in multiples of 16, as "
                        "the Triton modules store them, factor bytes at 3x a kept column's: their decode time on an H200, "
                        "and a keep floor of 0.1)")
    p.add_argument("--rank-multiple", type=int, default=None, help="ranks in multiples of this (overrides --target)")
    p.add_argument("--min-keep", type=float, default=None,
                   help="auto/greedy allocations and the search: no projection keeps fewer than this fraction of its "
                        "channels (extreme ones drift on new text; default: the target's, 0 for bytes, 0.1 for gpu; "
                        "try 0.1 at 70%%)")
    p.add_argument("--rank-cost", type=float, default=None,
                   help="auto/evo allocations: a factor byte counts as this many kept-column bytes (>= 1; overrides --target)")
    p.add_argument("--head-sparsity", type=head_sparsity, default=0.0,
                   help="rsparse/teal: sparsify the lm_head too, at this byte sparsity (0: dense, the default). It is "
                        "outside --sparsity, which covers the blocks' projections; the plan reports both and the share "
                        "of every weight a token reads. On SmolLM2 the head is 21%% of those bytes. 'auto': the head "
                        "joins the budget (--sparsity counts every weight a token reads) and its share is chosen: "
                        "--sparsity for the head and the blocks alike, or searched with --search evo")
    p.add_argument("--calib-text", default="wiki", help="calibration text: wiki (bundled) or a file")
    p.add_argument("--calib-tokens", type=int, default=65536)
    p.add_argument("--refine-tokens", type=int, default=None,
                   help="rsparse/teal: re-derive thresholds on this many calibration tokens run through the sparse model "
                        "itself, so the realised sparsity is the planned one (default: the calibration's, at most 16384; "
                        "0: off; --search evo: off unless given)")
    p.add_argument("--seed", type=int, default=0)


def head_sparsity(v: str):
    """--head-sparsity: a number (checked with the config) or 'auto'."""
    if v == "auto":
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a byte sparsity in [0, 1) or 'auto', got {v!r}") from None


def _positive(name, v):
    if v is not None and v < 1:
        raise RSparseError(f"{name} must be at least 1, got {v}")


def _config(args):
    from .plan import RSparseConfig, refuse_search_only

    if getattr(args, "refine_tokens", None) is not None and args.refine_tokens < 0:
        raise RSparseError(f"--refine-tokens must be >= 0 (0: no refinement), got {args.refine_tokens}")
    given = {k: v for k, v in (("rank_multiple", args.rank_multiple), ("rank_cost", args.rank_cost),
                               ("min_keep", args.min_keep)) if v is not None}
    config = RSparseConfig.for_target(args.target, method=args.method, sparsity=args.sparsity, allocation=args.allocation,
                                      alpha=args.alpha, score=args.score, factors=args.factors,
                                      head_sparsity=args.head_sparsity, **given)
    if getattr(args, "search", None) != "evo":
        refuse_search_only(config)  # eval and calibrate call this before the model loads
    return config


def _refine(args) -> dict:
    return {} if args.refine_tokens is None else {"refine_tokens": args.refine_tokens}  # None: the pipeline's default


def _sparsified(args, model, tok, progress=True):
    """Apply --plan DIR, or calibrate --method on the fly; returns the plan (None for dense)."""
    from . import artifact
    from .apply import sparsify_
    from .pipeline import calibrate

    if getattr(args, "plan", None):
        plan = artifact.load(args.plan)
        sparsify_(model, plan)
        return plan
    config = _config(args)
    if config.method == "dense":
        return None
    _positive("--calib-tokens", args.calib_tokens)
    plan = calibrate(model, tok, config, source=args.calib_text, tokens=args.calib_tokens, seed=args.seed, progress=progress,
                     **_refine(args))
    sparsify_(model, plan)
    return plan


def cmd_eval(args):
    from . import data, evaluate
    from .apply import counting_kept
    from .models import load
    from .plan import total_sparsity

    _positive("--limit", args.limit)
    _positive("--windows", args.windows)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else []
    for t in tasks:
        if t not in evaluate.TASKS:
            raise RSparseError(f"unknown task {t!r}; known tasks: {', '.join(evaluate.TASKS)}")
    source = args.text or args.dataset
    if not getattr(args, "plan", None):
        _config(args)  # a bad --sparsity or --allocation fails before the model loads
    model, tok = load(args.model, args.dtype)
    # windows first: a bad text fails before minutes of calibration
    win = data.token_windows(tok, source, "eval", args.length, n=args.windows) if source else None
    plan = _sparsified(args, model, tok)
    res = {"model": args.model, "method": plan.config["method"] if plan else "dense",
           "sparsity_target": plan.config["sparsity"] if plan else 0.0}
    if plan:
        res["plan"] = {k: plan.config.get(k, d) for k, d in (("allocation", None), ("alpha", None), ("score", None),
                                                               ("factors", None), ("rank_multiple", 1), ("rank_cost", 1.0),
                                                               ("min_keep", 0.0), ("head_sparsity", 0.0))}
        res["plan"]["refine_tokens"] = plan.calibration.get("refined", {}).get("tokens", 0)
        res["sparsity_expected"] = round(plan.expected_sparsity(), 5)
        total = plan.expected_total_sparsity()
        if total is not None:  # every weight a token reads, the lm_head included
            res["sparsity_total_expected"] = round(total, 5)
    if win is not None:
        counting = counting_kept(model, plan.shapes) if plan else contextlib.nullcontext({})
        with counting as real:  # the realised sparsity on every sparse token of the text
            r = evaluate.perplexity(model, win, protocol=args.protocol)
        if plan:
            res["sparsity_realized"] = round(real["sparsity"], 5)
            if plan.head_shape:
                res["sparsity_total_realized"] = round(total_sparsity(real["layers"], plan.shapes, plan.head_shape), 5)
        res.update(text=source, ppl=r["ppl"], tokens=r["tokens"], ppl_protocol=r["protocol"], window=args.length)
        print(f"perplexity on {source}: {r['ppl']:.3f} over {r['tokens']} tokens ({r['protocol']} tokens sparse)")
    if tasks:
        res["tasks"] = evaluate.zero_shot(model, tok, tasks, limit=args.limit, protocol=args.task_protocol)
        res["task_protocol"], res["limit"] = args.task_protocol, args.limit
        for t, r in res["tasks"].items():
            print(f"{t:14s} acc={r['acc']:.4f} acc_norm={r['acc_norm']:.4f}" + (f" n={r['n']}" if "n" in r else ""))
    if args.json:
        print(json.dumps(res))


def cmd_calibrate(args):
    from .artifact import save
    from .models import load
    from .plan import summarize

    config = _config(args)
    if config.method == "dense":
        raise RSparseError("--method dense has nothing to calibrate")
    t0 = time.time()
    if args.search == "evo":
        from .pipeline import search_plan
        from .search import SearchConfig

        scfg = SearchConfig(population=args.population, generations=args.generations, groups=args.groups,
                            fitness_tokens=args.fitness_tokens, val_tokens=args.val_tokens, seed=args.seed,
                            budget_minutes=args.budget_minutes, min_keep=config.min_keep, fitness=args.fitness)
        model, tok = load(args.model, args.dtype)
        plan = search_plan(model, tok, config, scfg, args.out, baselines=not args.no_baselines, **_refine(args),
                           source=args.calib_text, tokens=args.calib_tokens, seed=args.seed)
        s = plan.calibration["search"]
        f = s["fitness"].upper()
        print(f"search: {s['evaluations']} evaluations in {s['seconds']:.0f}s; {f} fit {s['seed_fit']:.4f} -> {s['fit']:.4f}, "
              f"validation {s['seed_val']:.4f} -> {s['val']:.4f} (seed = default plan)")
        for name, v in s.get("baselines", {}).items():
            print(f"  {name:16s} {f} fit {v['fit']:.4f} validation {v['val']:.4f}")
    else:
        model, tok = load(args.model, args.dtype)
        plan = _sparsified(args, model, tok)
        save(plan, args.out)
    print(summarize(plan))
    print(f"plan written to {args.out} in {time.time() - t0:.0f}s")


def cmd_plot_plan(args):
    from .artifact import load
    from .plotting import plot_plan

    out = plot_plan(load(args.plan), args.out or f"{args.plan.rstrip('/')}/plan.png")
    print(f"heatmap written to {out}")


def _generate_device(args) -> str:
    """Checks --device / --backend / --compile together, before any model is loaded, and sets the
    default backend (cpp on the CPU, triton on cuda)."""
    import importlib.util
    import os

    import torch

    if args.device not in ("cpu", "cuda"):
        raise RSparseError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RSparseError("--device cuda: no CUDA GPU is visible")
    args.backend = args.backend or ("triton" if args.device == "cuda" else "cpp")
    if args.plan and args.backend == "cpp" and args.device == "cuda":
        raise RSparseError("--backend cpp is the CPU kernel; on --device cuda use --backend triton (or oracle)")
    if args.plan and args.backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RSparseError('--backend triton needs Triton: pip install -e ".[triton]"')
        if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RSparseError("--backend triton runs on --device cuda (on the CPU only under TRITON_INTERPRET=1, slowly)")
    if args.gather == "cuda" and not (args.device == "cuda" and args.compile and args.plan and args.backend == "triton"):
        raise RSparseError("--gather cuda is the compiled GPU step's gather: it needs --device cuda --compile, a --plan "
                           "and --backend triton")
    if args.compile and args.device == "cpu" and args.plan and args.backend != "cpp":
        raise RSparseError(f"--compile on the CPU compiles the decode step around the C++ kernel: it needs --backend cpp, "
                           f"not {args.backend}")
    return args.device


def cmd_generate(args):
    from .generate import decoder_ids, generate_ids, stream
    from .models import load

    _positive("--max-new-tokens", args.max_new_tokens)
    device = _generate_device(args)
    model, tok = load(args.model, args.dtype)
    ids_fn = generate_ids
    if args.plan:
        from .pipeline import load_sparsified

        load_sparsified(model, args.plan)  # on the CPU: the plan is checked against the weights as loaded
        if args.backend == "cpp":  # the C++ decode kernel and the lean decoder: the sparse model decodes faster than dense
            from .kernels.cpu import to_cpu_backend_

            to_cpu_backend_(model)
            ids_fn = functools.partial(decoder_ids, compile=args.compile)
    elif args.compile and device == "cpu":  # dense: the same compiled lean decoder
        ids_fn = functools.partial(decoder_ids, compile=True)
    model.to(device)
    if args.plan and args.backend == "triton":  # the Triton kernels and the lean decoder, graph-replayed on a GPU
        from .families import attached_groups
        from .kernels.module import to_triton_, use_gather

        swapped = to_triton_(model)
        try:
            use_gather(args.gather)  # builds the CUDA gather now (nvcc), before any step is traced
        except ValueError as e:
            raise RSparseError(f"--gather {args.gather}: {e}") from None
        print(f"triton: {len(swapped)} projections, {len(attached_groups(model))} fused groups, decode steps "
              + ("replayed from a CUDA graph" if device == "cuda" else "through the interpreter"), file=sys.stderr)
        ids_fn = functools.partial(decoder_ids, graphed=device == "cuda", compile=args.compile)
    elif device == "cuda" and not args.plan:  # dense: the same graph-replayed decoder (the oracle keeps the HF forward)
        ids_fn = functools.partial(decoder_ids, graphed=True, compile=args.compile)
    for piece in stream(model, tok, args.prompt, args.max_new_tokens, ids_fn):
        print(piece, end="", flush=True)
    print()


def cmd_run(args):
    from .run import main_job

    _positive("--windows", args.windows)
    _positive("--length", args.length)
    _positive("--limit", args.limit)
    _positive("--calib-tokens", args.calib_tokens)
    main_job(args)


def cmd_bench(args):
    from .bench import run_bench

    _positive("--tokens", args.tokens)
    _positive("--repeats", args.repeats)
    run_bench(args)


def cmd_fetch(args):
    from .assets import ASSETS, fetch
    from .models import load

    for name in ASSETS:
        print(f"{name}: {fetch(name)}")
    load("smollm2-135m")


def build_parser():
    p = _Parser(prog="rsparse", description="Rank-aware activation sparsity (R-Sparse) for faster LLM decoding")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a dense or sparsified model")
    _add_model(e)
    _add_method(e, default_method="dense")
    e.add_argument("--plan", help="a plan directory from `rsparse calibrate` (skips calibration)")
    e.add_argument("--text", help="UTF-8 text file to measure perplexity on")
    e.add_argument("--dataset", help="wiki (bundled, eval split), lambada (bundled), wikitext2, c4")
    e.add_argument("--length", type=int, default=1024, help="perplexity window length")
    e.add_argument("--windows", type=int, help="use only the first N windows")
    e.add_argument("--protocol", default="all", choices=["all", "decode"], help="perplexity protocol")
    e.add_argument("--tasks", default="", help=f"comma list or 'all' ({DEFAULT_TASKS})")
    e.add_argument("--task-protocol", default="decode", choices=["all", "decode"])
    e.add_argument("--limit", type=int, help="documents per task")
    e.add_argument("--json", action="store_true", help="end with one JSON line")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("calibrate", help="calibrate a plan and write it to a directory")
    _add_model(c)
    _add_method(c)
    c.add_argument("--out", required=True)
    c.add_argument("--search", default="none", choices=["none", "evo"],
                   help="evo: evolutionary per-layer allocation (resumable: rerun with the same --out)")
    c.add_argument("--population", type=int, default=16)
    c.add_argument("--generations", type=int, default=4, help="generations per block group")
    c.add_argument("--groups", type=int, default=5, help="consecutive block groups searched one after another")
    c.add_argument("--fitness-tokens", type=int, default=2048)
    c.add_argument("--val-tokens", type=int, default=2048)
    c.add_argument("--budget-minutes", type=float, default=None, help="stop the search after this many minutes")
    c.add_argument("--fitness", default="kl", choices=["kl", "ce"],
                   help="search objective on calibration windows: KL to the dense model or cross-entropy (log perplexity)")
    c.add_argument("--no-baselines", action="store_true", help="skip the fitness of the standard allocations on the same windows")
    c.set_defaults(fn=cmd_calibrate)

    pp = sub.add_parser("plot-plan", help="heatmap (PNG) of a plan's per-layer sparsity and alpha")
    pp.add_argument("plan")
    pp.add_argument("--out", help="PNG path (default: PLAN/plan.png)")
    pp.set_defaults(fn=cmd_plot_plan)

    g = sub.add_parser("generate", help="stream text from a (sparsified) model")
    _add_model(g)
    g.add_argument("--plan")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--backend", choices=["cpp", "oracle", "triton"],
                   help="with --plan: cpp (C++ decode kernel, built on first use; float32/bfloat16; the default on the "
                   "CPU), triton (GPU kernels; the default with --device cuda) or oracle (eager reference)")
    g.add_argument("--device", default="cpu", help="cpu, or cuda: the model on the GPU, each decode step a CUDA graph replay")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (cuda: before capturing it in a CUDA graph; cpu: inductor's C++ "
                   "code around the C++ kernel: SmolLM2-135M at 50%% decoded 42.4 tok/s against 22.6 eager in session 15; the first "
                   "step compiles for ~1-1.5 min, later runs reuse inductor's on-disk cache)")
    g.add_argument("--gather", choices=["triton", "cuda"], default="triton",
                   help="with --device cuda --compile --backend triton: the gather of the plan's r = 0 calls; cuda: the CUDA "
                   "C++ gather (kernels/cuda_gather.py, built with nvcc on first use) on batch-1 steps; on an H200 a 50%% "
                   "Llama-3-8B-shaped step ran as fast as with the Triton gather (1.00x, session 35); slower at batch 2+, "
                   "which keeps the Triton gather)")
    g.add_argument("prompt")
    g.set_defaults(fn=cmd_generate)

    r = sub.add_parser("run", help="the main job: calibrate R-Sparse at 50%% and compare with dense and TEAL")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--sparsity", type=float, default=0.5)
    r.add_argument("--windows", type=int, default=8, help="perplexity windows per text")
    r.add_argument("--length", type=int, default=1024, help="perplexity window length")
    r.add_argument("--limit", type=int, default=50, help="documents per zero-shot task")
    r.add_argument("--calib-tokens", type=int, default=16384)
    r.set_defaults(fn=cmd_run)

    b = sub.add_parser("bench", help="decode tokens/s of dense vs sparsified model (static KV cache); "
                       "--device cpu: the bundled model, batch 1; --device cuda: 7-8B shapes, random bf16 weights")
    _add_model(b, dtype=None, dtype_help="cpu: float32 (default), bfloat16; cuda: bfloat16 (default), float16")
    b.add_argument("--device", default="cpu", help="cpu (real model) or cuda (Triton kernels, benchmark shapes)")
    b.add_argument("--sparsities", default="0.4,0.5,0.6,0.7")
    b.add_argument("--tokens", type=int, default=32, help="decoded tokens per repeat")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--calib-tokens", type=int, default=8192)
    b.add_argument("--head-sparsity", type=head_sparsity, default=0.0,
                   help="the plans sparsify the lm_head too, at this byte sparsity (0: dense; --device cpu also takes "
                        "'auto': each --sparsities value then counts the head, which takes it too)")
    b.add_argument("--backend", default="cpp", help="cpp (C++ kernel, built on first use) or oracle (eager reference)")
    b.add_argument("--memory", action="store_true", help="also measure peak resident memory (subprocesses)")
    b.add_argument("--out", help="write the results JSON here (cpu: implies --memory)")
    b.add_argument("--cpu-compile", action="store_true",
                   help="cpu: also time dense and sparse with each decode step compiled by torch.compile (inductor's "
                   "C++ for the norms, RoPE, cache and residual ops around the kernels), and the compiled sparse step's "
                   "agreement with the float64 oracle; each compile takes ~1 min (four of them)")
    g = b.add_argument_group("--device cuda")
    g.add_argument("--shapes", default="llama3-8b", help="llama3-8b and/or llama2-7b (comma list)")
    g.add_argument("--batches", default="1", help="decode rows, comma list of 1..8 (cpu: 1 only)")
    g.add_argument("--tuned", help="per-shape kernel configurations (JSON from benchmarks/gpu_kernels.py)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="share of each projection's budget on kept columns; < 1 adds rank terms (one --sparsities value)")
    g.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    g.add_argument("--no-fused", dest="fused", action="store_false", help="skip the q|k|v, gate|up fused-group rows")
    g.add_argument("--no-reduce-overhead", dest="reduce_overhead", action="store_false",
                   help="skip the torch.compile(mode='reduce-overhead') step (its compile takes ~2.5 min; A/B runs)")
    g.add_argument("--compare-reduce", action="store_true",
                   help="batch 1: also compile the sparse step with our epilogue kernel summing the partials, and "
                   "with inductor summing them only off the one-launch shapes (A/B)")
    g.add_argument("--masked-dense", action="store_true",
                   help="batch > 1: also compile the sparse step with cuBLAS on masked inputs instead of the kernels (A/B)")
    g.add_argument("--compare-rank", metavar="MODES",
                   help="with --alpha < 1: also compile the sparse step with each listed way (comma list) of computing "
                   "the rank terms: epilogue (U product in the epilogue), gather (added by the gather after a launch of "
                   "its own for the low-rank inputs), one-launch (the low-rank inputs too in the gather launch, the default) (A/B)")
    g.add_argument("--rank-ab", action="append", metavar="KEY=VALUE[,...]",
                   help="with --alpha < 1: also compile the sparse step with these rank-path knobs (each occurrence one "
                   "more step): ZCHUNK_WIDE (channels per z program on the MLP's calls, 0: 128 everywhere) (A/B)")
    g.add_argument("--compare-gather", nargs="?", const="1", default=None, metavar="CHUNKS",
                   help="also compile the sparse step with the CUDA C++ gather (kernels/cuda_gather.py, built with nvcc) "
                   "on its batch-1 r = 0 calls instead of the Triton gather, once per listed count of 256-channel chunks per "
                   "block (comma list; alone: 1): fewer, larger blocks leave fewer partials for the consumer to sum "
                   "(A/B; with --profile: the compiled sparse steps kernel by kernel)")
    g.add_argument("--no-tuned-dense", dest="tuned_dense", action="store_false",
                   help="skip the second dense baseline: the dense step under the sparse step's inductor settings "
                   "(decode.GPU_INDUCTOR; at batch 1 inductor's own Triton GEMV, 21%% faster than cuBLAS on an H200 "
                   "in session 17)")
    g.add_argument("--retune", type=int, default=1, metavar="N",
                   help="compile the tuned dense step and the sparse step N times each (1-4), every repeat tuning its "
                   "kernels afresh; reports each and the best of each (coordinate-descent tuning picks differently per "
                   "compile: the tuned dense read 196-232 tok/s across runs)")
    g.add_argument("--inductor-ab", action="append", metavar="KEY=VALUE[,...]",
                   help="also compile dense and sparse steps under decode.GPU_INDUCTOR updated with these "
                   "torch._inductor.config settings (A/B; repeatable, one pair of steps each), e.g. combo_kernels=0 "
                   "or triton.enable_pdl=1")
    g.add_argument("--attention", choices=("fused", "triton", "sdpa"), default="fused",
                   help="decode attention of dense and sparse steps alike: fused (the default: kernels/attention.py "
                   "over the filled slots, also rotating q and k and writing the new K and V to the cache), triton "
                   "(the same kernel after inductor's rotation and index_copy_; 2.6%% (dense) and 3.7%% (50%% sparse) "
                   "faster end to end than sdpa on an H200 in session 14) or sdpa (the whole cache, masked)")
    g.add_argument("--hf-reference", default="eager", metavar="MODES",
                   help="batch 1: also time Hugging Face generate on the dense model as a reference row (never the "
                   "baseline): eager and/or compiled (static cache, transformers' own reduce-overhead compile, "
                   "~1-2 min more), comma list; none to skip (default eager)")
    g.add_argument("--compare-attention", nargs="?", const=True, default=False, metavar="NAME",
                   help="also compile dense and sparse steps with attention NAME (triton, fused, sdpa; alone: sdpa, or "
                   "fused where --attention is sdpa) (A/B, timed side by side)")
    g.add_argument("--time-limit", type=float, default=420.0,
                   help="seconds; skip the remaining work after this, and an A/B compile that would end past it "
                   "(judged by the longest compile so far)")
    g.add_argument("--profile", action="store_true", help="only: per-kernel GPU time of one dense and one sparse step "
                   "(at the one --sparsities value, else 0.5; with --alpha's rank terms; --compare-rank: each mode's too; "
                   "--compare-gather: instead, the compiled sparse step with the Triton gather and with each CUDA one)")
    b.set_defaults(fn=cmd_bench)

    f = sub.add_parser("fetch", help="fetch and verify every bundled asset now (otherwise done on first use)")
    f.set_defaults(fn=cmd_fetch)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "tasks", None) == "all":
        args.tasks = DEFAULT_TASKS
    try:
        args.fn(args)
    except RSparseError as e:
        print(f"rsparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rsparse: interrupted", file=sys.stderr)
        return 130
    return 0
