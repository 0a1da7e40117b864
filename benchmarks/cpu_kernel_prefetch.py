"""Does software prefetch of the next kept rows speed up the CPU kernel's streaming?

Why: in the compiled 50% step the C++ kernel moves ~212 MB of kept rows and factors in ~13.4 ms (~16
GB/s) where MKL's GEMV on a long contiguous matrix reaches ~24 GB/s on this host (docs/perf-cpu.md,
session 16). The kernel reads each kept Wt row whole, 8 rows at a time; the rows are short (576-1536
float32: 2-6 KB) and scattered, so the hardware prefetcher restarts on every row. Here a copy of the
kernel (`kernels/cpu.py`'s source, built under another name) issues `__builtin_prefetch` for every line
of the next 8 rows before it accumulates the current 8 (its loop unchanged).

The two builds run the same groups (every projection of SmolLM2-135M at 50%, single-member groups on
the modules' own buffers), on inputs recorded from a real decode step, alternated (medians of 15
rounds, each round every projection once); outputs must be equal. Prints a table, ends with one JSON
line; `--out` writes the JSON (per run "ms" and "GB_s"; session 16's files name the time "ms_per_round").
`PYTHONPATH=src python3 benchmarks/cpu_kernel_prefetch.py [--out FILE]`

Session 16: refuted twice. This version (`cpu_kernel_prefetch_s16.json`): 13.96 ms per round against
11.12 for the plain kernel (0.80x), outputs equal. A first version that interleaved the prefetches
with the accumulation, one line of each next row per 64-byte step of the loop
(`cpu_kernel_prefetch_s16_interleaved.json`, code not kept): 24.77 against 14.28 ms (0.58x). The plain
kernel streamed at 13-17 GB/s in these runs (the host is noisy between runs).
"""
import sys
import time

import torch

from cpu_kernel_rate import alternate, build_variant, report
from rsparse.bench import PROMPT, sparse_model
from rsparse.decode import StaticDecoder
from rsparse.kernels import cpu
from rsparse.kernels.cpu import CpuRSparseLinear
from rsparse.models import load
from rsparse.pipeline import observe
from rsparse.plan import RSparseConfig, build_plan

ROUNDS = 15
PREFETCH_AXPY8 = r"""
template <typename T>
__attribute__((noinline)) static void axpy8(float* __restrict d, const T* const* w, const float* __restrict x, int64_t n,
                                            const T* const* nx) {
  const T* __restrict w0 = w[0]; const T* __restrict w1 = w[1]; const T* __restrict w2 = w[2]; const T* __restrict w3 = w[3];
  const T* __restrict w4 = w[4]; const T* __restrict w5 = w[5]; const T* __restrict w6 = w[6]; const T* __restrict w7 = w[7];
  const float x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3], x4 = x[4], x5 = x[5], x6 = x[6], x7 = x[7];
  if (nx) {  // the next 8 rows, whole, before this group's loop (which stays as it was)
    const int64_t line = 64 / sizeof(T);
    for (int q = 0; q < 8; ++q)
      for (int64_t o = 0; o < n; o += line) __builtin_prefetch(nx[q] + o, 0, 1);
  }
  for (int64_t o = 0; o < n; ++o)
    d[o] += (x0 * to_f(w0[o]) + x1 * to_f(w1[o]) + x2 * to_f(w2[o]) + x3 * to_f(w3[o]))
          + (x4 * to_f(w4[o]) + x5 * to_f(w5[o]) + x6 * to_f(w6[o]) + x7 * to_f(w7[o]));
}
"""
PREFETCH_ROWS = r"""
template <typename T>
static void rows_axpy(float* d, const T* base, int64_t OUT, const int32_t* idx, const float* coef, int64_t n) {
  int64_t k = 0;
  const T* w[8];
  const T* nx[8];
  for (; k + 8 <= n; k += 8) {
    for (int q = 0; q < 8; ++q) w[q] = base + (int64_t)idx[k + q] * OUT;
    const bool more = k + 16 <= n;
    if (more) for (int q = 0; q < 8; ++q) nx[q] = base + (int64_t)idx[k + 8 + q] * OUT;
    axpy8<T>(d, w, coef + k, OUT, more ? nx : nullptr);
  }
  for (; k < n; ++k) axpy1<T>(d, base + (int64_t)idx[k] * OUT, coef[k], OUT);
}
"""


def prefetch_source() -> str:
    """kernels/cpu.py's source with axpy8 / rows_axpy replaced by the prefetching ones."""
    src = cpu._SOURCE
    a0 = src.index("template <typename T>\n__attribute__((noinline)) static void axpy8")
    a1 = src.index("template <typename T>\n__attribute__((noinline)) static void axpy1")
    r0 = src.index("// d[0:OUT] += sum_k coef[k]")
    r1 = src.index("// Projections that read the same input x")
    return src[:a0] + PREFETCH_AXPY8 + src[a1:r0] + PREFETCH_ROWS + "\n" + src[r1:]


def main():
    dense, tok = load()
    plan = build_plan(dense, observe(dense, tok, tokens=2048, scores=("abs",)), RSparseConfig(sparsity=0.5))
    model = sparse_model("smollm2-135m", "float32", plan, "cpp")
    mods = {n: m for n, m in model.named_modules() if isinstance(m, CpuRSparseLinear)}
    name_of = {id(m): n for n, m in mods.items()}
    inputs = {}

    def record(mod, args):  # a module's, or a fused group's for each of its members: the step's last row
        row = args[0].reshape(-1, args[0].shape[-1])[-1:].clone()
        for m in getattr(mod, "_members", (mod,)):
            inputs[name_of[id(m)]] = row

    targets = list(mods.values()) + [m for m in model.modules() if type(m).__name__ == "CpuGroup"]
    hooks = [m.register_forward_pre_hook(record) for m in targets]
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    dec = StaticDecoder(model, max_len=prompt.shape[1] + 4)
    logits = dec.prefill(prompt)
    inputs.clear()
    dec.forward(logits.argmax(-1, keepdim=True))  # one decode step: every projection's real input
    for h in hooks:
        h.remove()
    missing = [n for n in mods if n not in inputs]
    if missing:
        sys.exit(f"no recorded input for {len(missing)} modules (first: {missing[0]})")
    t0 = time.perf_counter()
    ext = build_variant(prefetch_source(), "rsparse_cpu_pf")
    print(f"built the prefetching kernel in {time.perf_counter() - t0:.0f} s", flush=True)
    empty = torch.empty(0)
    handles = {n: ext.group_new([m.wt], [m.at], [m.ut], [m.col_scale], [m.tau], [empty if m.bias is None else m.bias])
               for n, m in mods.items()}
    ops = {"plain": lambda n: torch.ops.rsparse_cpu.group_run(inputs[n], mods[n]._handle, mods[n].out_features),
           "prefetch": lambda n: torch.ops.rsparse_cpu_pf.group_run(inputs[n], handles[n], mods[n].out_features)}
    equal = all(torch.equal(ops["plain"](n), ops["prefetch"](n)) for n in mods)
    nbytes = sum(((inputs[n].abs() * m.col_scale > m.tau).sum().item() * m.out_features + m.ut.numel()) * m.wt.element_size()
                 for n, m in mods.items())
    res = alternate({k: (lambda op=op: [op(n) for n in mods]) for k, op in ops.items()}, ROUNDS, nbytes)
    report("kernel", res, f"{len(mods)} projections, {nbytes / 1e6:.0f} MB of kept rows and factors",
           {"model": "smollm2-135m", "sparsity": 0.5, "threads": torch.get_num_threads(), "rounds": ROUNDS,
            "projections": len(mods), "bytes_per_round": nbytes, "outputs_equal": equal, **res,
            "prefetch_speedup": res["plain"]["ms"] / res["prefetch"]["ms"]})

if __name__ == "__main__":
    main()
