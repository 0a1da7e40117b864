"""The A/B variants `rsparse bench --device cuda` compiles beside its dense and sparse steps, and the
switches they set while a step is traced (all are read at trace time and reach the graph: as
dynamo-level choices or as arguments of our ops). The harness compiles with inductor's FX graph
cache and AOTAutograd's cache off (`uncached_compiles`): one step compiled several ways must never
reuse another variant's code.
"""
import contextlib

from .errors import RSparseError
from .kernels import triton_gemv as tg


# The dense step with inductor's coordinate-descent tuning on (gpt-fast's setting): inductor then lowers a
# one-row matmul to a Triton reduction of its own instead of a cuBLAS call (torch/_inductor/decomposition.py,
# `mm`: only where the left operand has one row, i.e. batch 1; larger batches stay on cuBLAS, so the
# variant is compiled at batch 1 only). Session 16 (one run, H200,
# Llama-3-8B shapes, batch 1, compiled in our CUDA graph): 221.1 tok/s against cuBLAS's 192.5, 15%
# faster, where the sparse step with the same setting did not move (317.5 vs 317.3: its projections
# are our kernels). Until then every "x dense" of the GPU bench was against cuBLAS alone.
DENSE_GEMV = {"coordinate_descent_tuning": True}


def compiled_variants(args, label_c, sparse, groups, B):
    """(label, modules, groups, options) of the compiled steps: dense and sparse, and the A/B variants
    asked for (--compare-reduce: the partials summed by our epilogue kernel instead of by inductor in
    the consumer, and inductor summing them only where TUNED has no one-launch kernel; --inductor-ab: dense
    and sparse compiled under other inductor settings, e.g. combo_kernels=1; --masked-dense,
    batch > 1: every projection as cuBLAS on its masked input instead of the gather kernels;
    --compare-rank MODES: the rank terms computed each listed way, `triton_gemv.RANK_TERMS`;
    --compare-attention: dense and sparse with the other decode attention, `decode.GraphDecoder`).
    At batch 1, unless --no-gemv-dense: "dense-gemv", the dense step with inductor's own Triton GEMV
    (`DENSE_GEMV`), the faster of the two dense baselines on an H200."""
    out = [("dense", {}, {}, {}), (label_c, sparse, groups, {})]
    if getattr(args, "gemv_dense", True) and B == 1:
        out.insert(1, ("dense-gemv", {}, {}, {"inductor": DENSE_GEMV}))
    if getattr(args, "compare_reduce", False) and B == 1:
        out.append((f"{label_c}-epilogue", sparse, groups, {"consumer_reduce": "none"}))
        out.append((f"{label_c}-non-splitk", sparse, groups, {"consumer_reduce": "non-splitk"}))
    for tag, patch in inductor_patches(args):
        out += [(f"dense-{tag}", {}, {}, {"inductor": patch}), (f"{label_c}-{tag}", sparse, groups, {"inductor": patch})]
    if getattr(args, "masked_dense", False) and B > 1:
        out.append((f"{label_c}-masked-dense", sparse, groups, {"kernel_rows": 0}))
    for mode in rank_modes(args):
        out.append((f"{label_c}-rank-{mode}", sparse, groups, {"rank_terms": mode}))
    if getattr(args, "compare_attention", False):
        other = "triton" if getattr(args, "attention", "triton") == "sdpa" else "sdpa"
        out += [(f"dense-attn-{other}", {}, {}, {"attention": other}), (f"{label_c}-attn-{other}", sparse, groups, {"attention": other})]
    return out


def rank_modes(args) -> list:
    """--compare-rank's comma list, checked against `triton_gemv.RANK_MODES`."""
    modes = [m for m in (getattr(args, "compare_rank", None) or "").split(",") if m]
    bad = [m for m in modes if m not in tg.RANK_MODES]
    if bad:
        raise RSparseError(f"--compare-rank: unknown rank mode(s) {bad}; choose from {list(tg.RANK_MODES)}")
    return modes


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def inductor_patches(args) -> list:
    """--inductor-ab's settings (each occurrence "key=value[,key=value]": one more pair of compiled
    steps) as [(tag, {inductor config key: value})], every key checked against torch._inductor.config
    and every value of a boolean key read as a boolean ("combo_kernels=1")."""
    import torch
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    out = []
    for spec in getattr(args, "inductor_ab", None) or []:
        patch = {}
        for item in (i.strip() for i in spec.split(",") if i.strip()):
            key, eq, text = item.partition("=")
            if not eq or not key:
                raise RSparseError(f"--inductor-ab {spec!r}: expected key=value items, got {item!r}")
            if key not in known:
                raise RSparseError(f"--inductor-ab: torch {torch.__version__}'s inductor has no option {key!r}")
            value = _value(text)
            patch[key] = bool(value) if isinstance(known[key], bool) else value
        if not patch:
            raise RSparseError("--inductor-ab: give key=value items, e.g. combo_kernels=1")
        out.append(("+".join(k.split(".")[-1] for k in patch), patch))
    return out


def fresh_step(dec):
    """dec.step as a bound method over a copy of its code object, for torch.compile under other
    inductor settings: dynamo keeps compiled code per code object and its guards never read inductor's
    config, so compiling dec.step again in the same process reused the first variant's code (session 16
    found it: the --inductor-ab variants, and session 6's --pdl, "compiled in 0s" and timed the
    baseline). A new code object (renamed) has no cache entry: dynamo traces it afresh."""
    import types

    fn = type(dec).step
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_variant")
    fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(fresh, dec)


def uncached_compiles() -> None:
    """Turn off inductor's FX graph cache and AOTAutograd's cache for this process. The benchmarks
    compile one step several ways, and some choices are read inside our ops at trace time (`TUNED`
    configurations, `--tuned`) where those caches' keys do not see them: a variant could reuse the
    code of the one compiled before it (session 8's rank-mode A/B did; the modes are op arguments now).
    Triton's own kernel cache stays on."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = False


@contextlib.contextmanager
def compile_options(dec, consumer_reduce="all", inductor=None, kernel_rows=None, rank_terms=None, attention=None):
    """Set while dec's compiled step is traced and captured (all are read at trace time only)."""
    from .kernels import module as km

    saved = km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS, tg.RANK_TERMS, dec.attention
    dec.use_attention(attention or saved[3])  # first: a bad name raises before any switch is set
    km.REDUCE_IN_CONSUMER = consumer_reduce
    km.KERNEL_MAX_ROWS = saved[1] if kernel_rows is None else kernel_rows
    tg.RANK_TERMS = saved[2] if rank_terms is None else rank_terms
    try:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(inductor or {}):
            yield
    finally:
        km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS, tg.RANK_TERMS = saved[:3]
        dec.use_attention(saved[3])
