"""`rsparse bench --device cpu`: decode speed of dense vs sparsified models, batch 1, static KV cache.

Dense is the fastest plain PyTorch decode of the same model we found (same dtype, threads and
`StaticDecoder`): PyTorch's one-row GEMV speed on a CPU depends on the weight layout (F.linear on
W (out, in) vs x @ W^T stored (in, out): 1.9x apart on the lm_head here, either way round depending
on the shape), so `fastest_dense_` times both layouts per projection type and for the lm_head, then
q/k/v and gate/up as one fused matmul (either layout) against separate calls, and keeps the fastest;
the sparse model gets the same lm_head. Sparse is the same decoder with every planned projection on
the C++ backend (`kernels.cpu`, "cpp", q/k/v and gate/up fused) or on the eager oracle ("oracle":
reads every weight, a correctness reference, not a speed path). At the first sparsity the C++
kernel also runs with every channel kept, to separate what the kernel gains from what sparsity
gains. Models are timed alternately, repeat after repeat, per decoded token; medians over all
steps. Agreement: `agreement` against the float64 oracle, with the same-dtype oracle as the yardstick.
Peak memory: VmHWM of a fresh subprocess that loads the model (and applies the plan) and decodes.
Prints a table, ends with one JSON line; --out writes the results JSON.
"""
from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .apply import sparsify_
from .atomic import write_json
from .decode import CompiledDecoder, StaticDecoder
from .errors import RSparseError
from .models import load
from .pipeline import observe
from .plan import RSparseConfig, build_plan

PROMPT = "The history of the printing press"
AGREEMENT_TOKENS = 264  # teacher-forced decode steps of evaluation text for the agreement check (+ 8 prefill)


def _step_times(model, prompt, new_tokens):
    return _decode_times(StaticDecoder(model, max_len=prompt.shape[1] + new_tokens + 1), prompt, new_tokens)


def _decode_times(dec, prompt, new_tokens):
    """Seconds of each of `new_tokens` greedy decode steps of `dec` after prefilling `prompt` (untimed)."""
    logits = dec.prefill(prompt)
    times = []
    for _ in range(new_tokens):
        tok = logits.argmax(-1, keepdim=True)
        t = time.perf_counter()
        logits = dec.forward(tok)
        times.append(time.perf_counter() - t)
    return times


def compiled_timer(model, prompt, new_tokens):
    """(times, compile seconds): times() = `_decode_times` of one `CompiledDecoder` of the model (kept,
    so it compiles once: in the first call, made here; guard checks skipped after it, as in generate)."""
    dec = CompiledDecoder(model, max_len=prompt.shape[1] + new_tokens + 1, skip_guards=True)
    t0 = time.perf_counter()
    _decode_times(dec, prompt, new_tokens)
    return (lambda: _decode_times(dec, prompt, new_tokens)), time.perf_counter() - t0


class TransposedLinear(torch.nn.Module):
    """A dense linear layer stored as W^T (in, out): y = x @ W^T + b (plain PyTorch matmul)."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.wt = torch.nn.Parameter(lin.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = lin.bias

    @property
    def weight(self):
        return self.wt.t()

    def forward(self, x):
        y = x @ self.wt
        return y if self.bias is None else y + self.bias


class DenseGroup(torch.nn.Module):
    """Dense projections that read the same input as one matmul on their concatenated weights
    (gpt-fast's fused wqkv), W stored (out, in) for F.linear or transposed for x @ W^T. The members
    are re-pointed at views of the concatenated storage, so prefill still works and nothing is copied twice."""

    def __init__(self, members: list, transposed: bool):
        super().__init__()
        W = torch.cat([m.weight.detach() for m in members])
        self.split = [m.weight.shape[0] for m in members]
        self.transposed = transposed
        self.w = torch.nn.Parameter(W.t().contiguous() if transposed else W, requires_grad=False)
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.nn.Parameter(
            torch.cat([b.detach() if b is not None else W.new_zeros(n) for b, n in zip(biases, self.split)]), requires_grad=False)

    def members(self) -> list:
        """Plain nn.Linear views of the shared storage, one per member."""
        out, start = [], 0
        for n in self.split:
            lin = torch.nn.Linear(1, 1, bias=self.bias is not None, device="meta")
            lin.in_features, lin.out_features = self.w.shape[0] if self.transposed else self.w.shape[1], n
            w = self.w[:, start:start + n].t() if self.transposed else self.w[start:start + n]
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            lin.bias = None if self.bias is None else torch.nn.Parameter(self.bias[start:start + n], requires_grad=False)
            out.append(lin)
            start += n
        return out

    def forward(self, x):
        y = x @ self.w if self.transposed else torch.nn.functional.linear(x, self.w)
        if self.bias is not None:
            y = y + self.bias
        return y.split(self.split, dim=-1)


def _time_calls(fns, x, repeats=5):
    with torch.no_grad():
        for f in fns:
            f(x)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            for f in fns:  # the layers of one type in turn: their weights are not all in cache
                f(x)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def fastest_dense_(model, only_head: bool = False, choice: dict | None = None) -> dict:
    """Give each projection type (and the lm_head) the faster dense layout, then each group of
    projections sharing an input (q/k/v, gate/up) the fastest of: separate, one fused matmul in
    either layout; in place; returns the choices. With `choice` (a previous result), apply it
    without timing, block by block (peak-memory runs: no alternative is ever built)."""
    from .families import family_of, locate, set_group, set_module

    groups: dict[str, list] = {}
    # applying a recorded choice: members of a fused group go straight into it (no transposed copy first)
    fused = {p for g, members, _ in family_of(model).groups if choice and choice.get(g, "separate") != "separate" for p in members}
    if not only_head:
        for key, m in locate(model).items():
            if type(m) is torch.nn.Linear and key.split(".")[1] not in fused:
                groups.setdefault(key.split(".")[1], []).append((key, m))
    head = model.get_output_embeddings()
    out = {}
    for name, items in list(groups.items()) + [("lm_head", [("lm_head", head)])]:
        mods = [m for _, m in items]
        if choice is None:
            x = torch.randn(1, 1, mods[0].in_features, dtype=mods[0].weight.dtype)
            out[name] = "x @ W^T" if _time_calls([TransposedLinear(m) for m in mods], x) < _time_calls(mods, x) else "F.linear"
        else:
            out[name] = choice[name]
        if out[name] == "x @ W^T":
            for key, m in items:
                if key == "lm_head":
                    model.lm_head = TransposedLinear(m)
                else:
                    set_module(model, key, TransposedLinear(m))
    if choice:
        out.update({k: v for k, v in choice.items() if k not in out and (k == "lm_head" or not only_head)})
    if only_head:
        return out
    projs = locate(model)
    n_blocks = len({k.split(".")[0] for k in projs})
    layouts = {"fused F.linear": False, "fused x @ W^T": True}
    for gname, members, _ in family_of(model).groups:
        mods = [[projs[f"{i}.{p}"] for p in members] for i in range(n_blocks)]
        if choice is None:
            x = torch.randn(1, 1, mods[0][0].weight.shape[1], dtype=mods[0][0].weight.dtype)
            options = {"separate": _time_calls([m for ms in mods for m in ms], x)}
            for layout, transposed in layouts.items():
                options[layout] = _time_calls([DenseGroup(ms, transposed) for ms in mods], x)
            out[gname] = min(options, key=options.get)
        else:
            out[gname] = choice[gname]
        if out[gname] != "separate":
            for i, ms in enumerate(mods):
                g = DenseGroup(ms, layouts[out[gname]])
                for p, view in zip(members, g.members()):
                    set_module(model, f"{i}.{p}", view)
                set_group(model, i, gname, g)
    gc.collect()
    return out


def sparse_model(name, dtype, plan, backend):
    """A fresh copy of the model in `dtype` with `plan` applied, on `backend` ("cpp" or "oracle")."""
    model, _ = load(name, dtype)
    sparsify_(model, plan)
    if backend == "cpp":
        from .kernels.cpu import to_cpu_backend_

        to_cpu_backend_(model)
    return model


@torch.no_grad()
def agreement(candidates: dict, reference, text_ids: torch.Tensor, prompt, greedy_steps: int = 64,
              decoders: dict | None = None) -> dict:
    """How closely each candidate decodes like `reference` (the float64 oracle). Teacher-forced over
    `text_ids` (real text, fed one token per decode step after an 8-token prefill): mean KL(reference
    || candidate) of the next-token distributions, the fraction of steps with the same argmax, and the
    mean next-token NLL; plus how many greedy tokens from `prompt` equal the reference's before the
    first difference. Hard thresholds make decoding chaotic in the last bit: a channel whose score
    lands within rounding of tau flips and the difference propagates, so the same-dtype oracle is a
    candidate too, and a backend is judged against that spread, not against zero. decoders: {name:
    decoder class} for candidates decoded other than by StaticDecoder (e.g. CompiledDecoder)."""
    def run(model, decoder=StaticDecoder):
        dec = decoder(model, text_ids.shape[1] + 1)
        logits = [dec.prefill(text_ids[:, :8]).double().log_softmax(-1)]
        for t in range(8, text_ids.shape[1] - 1):
            logits.append(dec.forward(text_ids[:, t:t + 1]).double().log_softmax(-1))
        greedy = decoder(model, prompt.shape[1] + greedy_steps + 1).greedy(prompt, greedy_steps)[0]
        return torch.cat(logits), greedy

    ref, ref_greedy = run(reference)
    targets = text_ids[0, 8:]
    out = {"reference_nll": -ref.gather(1, targets[:, None]).mean().item(), "steps": len(targets)}
    for name, model in candidates.items():
        lp, greedy = run(model, (decoders or {}).get(name, StaticDecoder))
        same = greedy == ref_greedy
        out[name] = {"mean_kl": (ref.exp() * (ref - lp)).sum(-1).mean().item(),
                     "top1_agreement": (lp.argmax(-1) == ref.argmax(-1)).double().mean().item(),
                     "nll": -lp.gather(1, targets[:, None]).mean().item(),
                     "greedy_equal_tokens": greedy_steps if bool(same.all()) else int((~same).nonzero()[0])}
    return out


def tensor_mb(model: torch.nn.Module) -> float:
    """MB of the model's parameters and buffers, each storage counted once (tied weights, views): what it
    holds, against the peak resident memory, which adds the runtime and what loading left behind."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values()) / 2**20


def peak_rss_mb(args_list) -> float:
    """Peak resident memory (MB, VmHWM) of a fresh process running `python -m rsparse.bench _rss ...`."""
    out = subprocess.run([sys.executable, "-m", "rsparse.bench", "_rss", *args_list], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def parse_sparsities(text: str) -> list[float]:
    """--sparsities: a comma list of numbers in (0, 1), checked before any work."""
    try:
        values = [float(s) for s in text.split(",")]
    except ValueError:
        raise RSparseError(f"--sparsities is a comma list of numbers, got {text!r}") from None
    if any(not 0.0 < s < 1.0 for s in values):
        raise RSparseError(f"--sparsities must lie in (0, 1), got {text}")
    return values


def run_bench(args):
    if args.device == "cuda":
        from .gpubench import run_gpu_bench

        return run_gpu_bench(args)
    if args.device != "cpu":
        raise RSparseError(f"unknown --device {args.device!r}; use cpu or cuda")
    args.dtype = args.dtype or "float32"
    if args.batches != "1":
        raise RSparseError("rsparse bench --device cpu decodes batch 1; --batches is for --device cuda")
    if args.backend not in ("cpp", "oracle"):
        raise RSparseError(f"unknown backend {args.backend!r}; use cpp or oracle")
    sparsities = parse_sparsities(args.sparsities)
    head_sparsity = RSparseConfig(head_sparsity=getattr(args, "head_sparsity", 0.0)).head_sparsity  # refused before loading
    dense, tok = load(args.model, args.dtype)
    layout = fastest_dense_(dense)
    print(f"dense baseline layouts: {layout}", flush=True)
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    from .data import encode, text

    text_ids = encode(tok, text("wiki", "eval")[:20_000])[None, :AGREEMENT_TOKENS]
    calib, _ = load(args.model, "float32")
    stats = observe(calib, tok, tokens=args.calib_tokens, scores=("abs",))
    compiled = getattr(args, "cpu_compile", False)
    rows = []
    for s in sparsities:
        plan = build_plan(calib, stats, RSparseConfig(sparsity=s, head_sparsity=head_sparsity))
        sparse = sparse_model(args.model, args.dtype, plan, args.backend)
        oracle = sparse_model(args.model, args.dtype, plan, "oracle")
        ref64, _ = load(args.model, "float32")
        sparsify_(ref64.double(), plan, check=False)
        n_check = 64
        cands, decs = {"backend": sparse, "oracle_same_dtype": oracle}, {}
        if compiled:  # the compiled step's own agreement (it rounds differently)
            cands["backend_compiled"], decs["backend_compiled"] = sparse, CompiledDecoder
        agree = agreement(cands, ref64, text_ids, prompt, n_check, decs)
        del oracle, ref64
        if layout["lm_head"] != "F.linear" and not head_sparsity:  # the dense baseline's lm_head layout
            sparse.lm_head = TransposedLinear(sparse.lm_head)
        models = {"dense": dense, "sparse": sparse}
        if s == sparsities[0] and args.backend == "cpp":  # our kernel with every channel kept: kernel vs sparsity
            models["all_kept"] = sparse_model(args.model, args.dtype, plan, args.backend)
            for m in models["all_kept"].modules():
                if hasattr(m, "decode_rows"):
                    m.tau.fill_(-1.0)
            if not head_sparsity:  # a sparse head is the model's own (every channel kept above)
                models["all_kept"].lm_head = sparse.lm_head
        timers = {k: (lambda m=m: _step_times(m, prompt, args.tokens)) for k, m in models.items()}
        compile_s = {}
        if compiled:  # the same models, each decode step compiled (inductor C++)
            for k in ("dense", "sparse"):
                timers[f"{k}_compiled"], compile_s[k] = compiled_timer(models[k], prompt, args.tokens)
                print(f"compiled the {k} step in {compile_s[k]:.0f} s", flush=True)
        times = {k: [] for k in timers}
        for _ in range(args.repeats):  # alternate so drift hits all equally
            for k, timer in timers.items():
                times[k] += timer()
        row = {"sparsity": s, "expected_sparsity": plan.expected_sparsity(), "head_sparsity": head_sparsity,
               "expected_total_sparsity": plan.expected_total_sparsity(), "dense_tok_s": 1 / statistics.median(times["dense"]),
               "sparse_tok_s": 1 / statistics.median(times["sparse"]), "agreement": agree}
        if "all_kept" in times:
            row["kernel_all_kept_tok_s"] = 1 / statistics.median(times["all_kept"])
        if compile_s:
            row.update(dense_compiled_tok_s=1 / statistics.median(times["dense_compiled"]),
                       sparse_compiled_tok_s=1 / statistics.median(times["sparse_compiled"]), compile_s=compile_s)
            row["compiled_speedup"] = row["sparse_compiled_tok_s"] / row["dense_compiled_tok_s"]
        def within_spread(name):  # KL at most twice the same-dtype oracle's own
            return agree[name]["mean_kl"] <= 2 * agree["oracle_same_dtype"]["mean_kl"] + 1e-6

        ok = within_spread("backend")
        row["matches_oracle_within_its_own_spread"] = ok
        if compiled:
            row["compiled_matches_oracle_within_its_own_spread"] = within_spread("backend_compiled")
        row["speedup"] = row["sparse_tok_s"] / row["dense_tok_s"]
        rows.append(row)
        b_, o_ = agree["backend"], agree["oracle_same_dtype"]
        print(f"sparsity {s:.2f}: dense {row['dense_tok_s']:.1f} tok/s, sparse ({args.backend}) {row['sparse_tok_s']:.1f} tok/s, "
              f"speedup {row['speedup']:.2f}x"
              + (f"; all channels kept through our kernel {row['kernel_all_kept_tok_s']:.1f} tok/s" if "all_kept" in times else ""),
              flush=True)
        if compile_s:
            c_ = agree["backend_compiled"]
            print(f"  compiled steps: dense {row['dense_compiled_tok_s']:.1f} tok/s, sparse {row['sparse_compiled_tok_s']:.1f} tok/s, "
                  f"speedup {row['compiled_speedup']:.2f}x; compiled sparse vs float64 oracle KL {c_['mean_kl']:.2e} "
                  f"top-1 {c_['top1_agreement']:.3f} NLL {c_['nll']:.4f} greedy equal {c_['greedy_equal_tokens']}/{n_check}", flush=True)
        print(f"  vs float64 oracle ({agree['steps']} teacher-forced steps of text, NLL {agree['reference_nll']:.4f}): "
              f"{args.backend} KL {b_['mean_kl']:.2e} top-1 {b_['top1_agreement']:.3f} NLL {b_['nll']:.4f} greedy equal "
              f"{b_['greedy_equal_tokens']}/{n_check}; {args.dtype} oracle KL {o_['mean_kl']:.2e} top-1 {o_['top1_agreement']:.3f} "
              f"NLL {o_['nll']:.4f} greedy equal {o_['greedy_equal_tokens']}/{n_check} -> {'within' if ok else 'OUTSIDE'} "
              "2x the oracle's own spread", flush=True)
        row["dense_tensor_mb"], row["sparse_tensor_mb"] = tensor_mb(dense), tensor_mb(sparse)
        if args.out or args.memory:
            import tempfile

            from .artifact import save

            with tempfile.TemporaryDirectory() as d:
                save(plan, d)
                row["dense_peak_mb"] = peak_rss_mb([args.model, args.dtype, "dense", "-", args.backend, json.dumps(layout)])
                row["sparse_peak_mb"] = peak_rss_mb([args.model, args.dtype, "sparse", d, args.backend, json.dumps(layout)])
    result = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(), "backend": args.backend,
              "dense_layouts": layout,
              "tokens": args.tokens, "repeats": args.repeats, "rows": rows}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
    mid = min(rows, key=lambda r: abs(r["sparsity"] - 0.5))
    print(json.dumps({"dense_tok_s": mid["dense_tok_s"], "sparse_tok_s": mid["sparse_tok_s"], "speedup": mid["speedup"],
                      "compiled_speedup": mid.get("compiled_speedup"),
                      "sparsity": mid["sparsity"], "backend": args.backend, "dtype": args.dtype, "rows": rows}))


def _rss_child(model_name, dtype, kind, plan_dir, backend, layout):
    from .artifact import load as load_plan

    if kind == "dense":
        model, tok = load(model_name, dtype)
        fastest_dense_(model, choice=json.loads(layout))
    else:
        tok = load(model_name, "float32")[1]  # the model it loads is freed here: it must not count in the peak
        model = sparse_model(model_name, dtype, load_plan(plan_dir), backend)
        fastest_dense_(model, only_head=True, choice=json.loads(layout))
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        StaticDecoder(model, 64).greedy(prompt, 16)
    # peak of this process's own memory map (VmHWM); ru_maxrss would carry the parent's peak across exec
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(int(hwm.split()[1]) / 1024)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_rss":
    _rss_child(*sys.argv[2:8])
