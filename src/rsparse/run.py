"""The main job (`rsparse run`): on the bundled model, calibrate R-Sparse and TEAL at one
sparsity from a single calibration pass (16k tokens by default, a quarter of `rsparse calibrate`'s
64k, to keep the job within a few minutes on 2 cores), then print dense / TEAL / R-Sparse perplexity on two
texts, a few zero-shot accuracies and a generated sample from the sparse model. The plans are
saved under the cache directory, so a second run skips calibration."""
from __future__ import annotations

import json
import time

from . import artifact, data, evaluate
from .apply import counting_kept, sparsify_
from .assets import cache_dir
from .errors import RSparseError
from .generate import stream
from .models import load
from .pipeline import calibrate, observe
from .plan import RSparseConfig, fingerprint

TASKS = ("piqa", "arc_easy", "winogrande")
PROMPT = "Photosynthesis is the process by which plants"


def main_job(args):
    t0 = time.time()
    configs = {  # before the model loads: a bad --sparsity is named at once
        "dense": RSparseConfig(method="dense", sparsity=0.0),
        "teal": RSparseConfig(method="teal", sparsity=args.sparsity, allocation="uniform"),
        "rsparse": RSparseConfig(method="rsparse", sparsity=args.sparsity),
    }
    model, tok = load(args.model)
    fp = fingerprint(model)
    plans, stats = {}, None
    for name, cfg in configs.items():
        d = cache_dir() / "plans" / f"{fp[:16]}-{name}-{args.sparsity:.2f}-{args.calib_tokens}-refined"
        try:
            plans[name] = artifact.load(d)
            continue
        except RSparseError:
            pass
        if cfg.method != "dense" and stats is None:
            print(f"calibrating on {args.calib_tokens} tokens of Wikipedia (once; cached afterwards)")
            stats = observe(model, tok, tokens=args.calib_tokens, scores=("abs",))
        plans[name] = calibrate(model, tok, cfg, stats=stats)  # dense needs no statistics; thresholds refined
        artifact.save(plans[name], d)

    texts = {"wiki": data.token_windows(tok, "wiki", "eval", args.length, n=args.windows),
             "lambada": data.token_windows(tok, "lambada", "eval", args.length, n=args.windows)}
    rows = []
    for name, plan in plans.items():
        m, _ = load(args.model)
        sparsify_(m, plan)
        row = {"method": name, "target": plan.config["sparsity"]}
        with counting_kept(m, plan.shapes) as real:  # realised on all the Wikipedia windows it scores
            row["ppl_wiki"] = evaluate.perplexity(m, texts["wiki"])["ppl"]
        row["realized"] = real["sparsity"] if plan.layers else 0.0
        row["ppl_lambada"] = evaluate.perplexity(m, texts["lambada"])["ppl"]
        tasks = evaluate.zero_shot(m, tok, TASKS, limit=args.limit)
        row.update({t: tasks[t]["acc"] for t in TASKS})
        rows.append(row)
        if name == "rsparse":
            sparse_model = m
    head = f"{'method':8s} {'target':>6s} {'real':>6s} {'ppl wiki':>9s} {'ppl lambada':>11s} " + " ".join(f"{t:>10s}" for t in TASKS)
    print(f"\n{args.model}, {args.windows} windows x {args.length} tokens per text (every token sparse); "
          f"tasks: first {args.limit} documents, acc, prompts dense and continuations sparse")
    print(head)
    for r in rows:
        print(f"{r['method']:8s} {r['target']:6.2f} {r['realized']:6.3f} {r['ppl_wiki']:9.3f} {r['ppl_lambada']:11.3f} "
              + " ".join(f"{r[t]:10.3f}" for t in TASKS))
    print(f"\nR-Sparse at {args.sparsity:.0%} (greedy): {PROMPT}", end="")
    for piece in stream(sparse_model, tok, PROMPT, 48):
        print(piece, end="", flush=True)
    print(f"\n\ndone in {time.time() - t0:.0f}s")
    print(json.dumps({"rows": rows}))

