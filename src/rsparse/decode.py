"""A lean decode loop for Llama-family models: static KV cache, one token per step, no framework
overhead beyond the projections themselves, so that decode speed reflects the bytes each layer reads.

Math per block (pre-norm Llama): h += o(attn(rope(q(n1 h)), rope(k(n1 h)), v(n1 h))); h += mlp(n2 h).
The projections and the MLP are the model's own modules, called as modules, so a sparsified model
(RSparseLinear or a faster backend swapped in by `sparsify_`) decodes sparse with no change here.
Where a backend attached a fused module for projections that share an input (`families.groups`:
q/k/v, gate/up), the decoder calls it once instead of the members; a gate|up group that offers
`silu_mul` computes the SiLU MLP's SiLU(gate) * up itself (only when the model's activation is
SiLU and no sparse activation, e.g. CATS, replaced it).
The cache is one K and one V tensor per layer, [batch, kv_heads, max_len, head_dim] each (not views
of one big tensor: torch.compile turns an in-place write into a view of a graph input into a copy
of the whole base tensor, 32 x 33 MB per step on Llama-3-8B shapes); attention uses SDPA with GQA.
Prompts are prefilled through `dense_view` (prefill is compute-bound: it stays dense).
What a family changes in that block comes from its row in `families.FAMILIES` (Qwen3's and OLMo2's
q/k norms, which norms sit before and after each sublayer (OLMo2, Gemma 2/3), Granite's and Gemma's
scalars and soft-capping, SmolLM3's blocks without the rotary embedding, Gemma 3's rotary tables per
layer type) and each block's sliding window (`families.windows`). Attention itself is `attend.py`.
"""
from __future__ import annotations

import itertools
import types

import torch

from .apply import dense_view
from .attend import ATTENTION, attention, attention_splits, default_attention, kernel_head_dim, paths, rope, window_mask
from .families import (blocks, check_decodable, family_of, final_logits, get_group, rope_types, rotary_dim, rotates,
                       scalars, submodule, text_config, text_model, unfuse_, windows)
from .kernels.counters import counters  # torch only: Triton stays optional here
from .linear import ThresholdedActivation

# inductor settings for a decode step compiled on a GPU (`stream_graphed(compile=True)`, the GPU bench's
# steps): coordinate-descent tuning (gpt-fast's setting) lowers a one-row matmul to a Triton reduction
# of its own instead of cuBLAS, combo_kernels fuses independent small kernels into one launch. Session 17
# (H200, Llama-3-8B shapes, batch 1, one run, `gpu_decode_s17_combo_cdt.json`): dense 192.1 tok/s
# with inductor's defaults (cuBLAS) -> 232.0, the 50% sparse step 316.1 -> 329.6.
GPU_INDUCTOR = {"coordinate_descent_tuning": True, "combo_kernels": True}


def gpu_inductor(version: tuple | None = None) -> dict:
    """GPU_INDUCTOR less what the installed torch cannot take: options its inductor does not know, and
    combo_kernels before torch 2.9 (automatic combo kernels landed in 2.5 and had scheduler failures
    fixed up to 2.9; measured on 2.11 only). Imports inductor's config (~2 s): call it when compiling."""
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    major, minor = version or tuple(int(p) for p in torch.__version__.split(".")[:2])
    return {k: v for k, v in GPU_INDUCTOR.items() if k in known and not (k == "combo_kernels" and (major, minor) < (2, 9))}


_FRESH = itertools.count()


def fresh_step(dec):
    """dec.step as a bound method over a copy of its code object, renamed: compile this, never
    dec.step itself. Dynamo keeps compiled code per code object, so every decoder's `step` shares one
    cache, and its guards never read inductor's config. Two defects came from that: the second compile
    of dec.step under other inductor settings returned the first one's code (session 16: the GPU
    bench's inductor A/Bs and session 6's --pdl timed the baseline), and with guard checks skipped
    (`CompiledDecoder(skip_guards=True)`) a decoder ran the code compiled for another decoder's model
    (session 17: the CPU bench's compiled dense step ran the sparse model's graph and read 47-51 tok/s,
    the sparse step's speed). A code object of its own per compile keeps each cache to one decoder."""
    fn = type(dec).step
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_FRESH)}")
    fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(fresh, dec)


class StaticDecoder:
    def __init__(self, model, max_len: int = 512, batch: int = 1):
        cfg = text_config(model)
        self.model, self.layers, self.family = model, blocks(model), family_of(model)
        self.inner = text_model(model)  # embed_tokens, rotary_emb, norm (a VLM's language_model)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.max_len, self.pos, self.batch = max_len, 0, batch
        self.silu = getattr(cfg, "hidden_act", None) == "silu"
        check_decodable(model)
        self.windows, self.rope_types = windows(model), rope_types(model)  # per block
        unfuse_(model)  # Phi-3: the parts, where the family table (and a plan) expects them
        self.rotates = rotates(model)  # False: a block without the rotary embedding (SmolLM3)
        self.rotary_dim = rotary_dim(model, self.head_dim)
        self.qk_norm, self.pre_norm, self.post_norm = self.family.qk_norm, self.family.pre_norm, self.family.post_norm
        self.scalars = scalars(model)
        # Granite's and Gemma's attention scale as a factor on q (before the rotation, which is linear),
        # so every attention path (SDPA, the Triton kernels) keeps its default 1/sqrt(head dim)
        a = self.scalars.attention
        self.q_scale = 1.0 if a is None else a * self.head_dim ** 0.5

    def _qkv(self, layer, x, joined: bool = False):
        """q, k, v [batch, heads, T, head_dim] of the normed input x, before the rotary embedding; with
        `joined`, where the layer's q|k|v group gives one (`TritonGroup.joined`), its unsplit output
        [batch, T, (heads + 2 kv_heads) * head_dim] instead."""
        B, T, _ = x.shape
        fused = get_group(self.family, layer, "qkv")
        plain = not self.qk_norm and self.q_scale == 1.0  # the joined buffer goes to attention as it is
        y = fused.joined(x) if joined and plain and hasattr(fused, "joined") else None
        if y is not None:
            return y
        q, k, v = fused(x) if fused is not None else (self._proj(layer, p)(x) for p in "qkv")
        whole = self.qk_norm and not self.family.qk_norm_per_head
        if whole:
            q, k = submodule(layer, self.qk_norm[0])(q), submodule(layer, self.qk_norm[1])(k)
        q = q.view(B, T, self.heads, self.head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim)
        if self.qk_norm and not whole:
            q, k = submodule(layer, self.qk_norm[0])(q), submodule(layer, self.qk_norm[1])(k)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return q.transpose(1, 2), k.transpose(1, 2), v

    def _proj(self, layer, short: str):
        """Projection `short` ("q" .. "down") of a block, where the family table puts it."""
        return submodule(layer, self.family.proj[short])

    def _o(self, layer, o):
        """The attention's output projection of o [batch, heads, T, head_dim]."""
        B, _, T, _ = o.shape
        return self._proj(layer, "o")(o.transpose(1, 2).reshape(B, T, -1))

    def _mlp(self, layer, x):
        """The MLP's output for the normed input x (the residual add is the caller's)."""
        mlp = layer.mlp
        fused = get_group(self.family, layer, "gate_up")
        if fused is None:
            return mlp(x)
        act, down = submodule(layer, self.family.act), self._proj(layer, "down")
        if self.silu and hasattr(fused, "silu_mul") and not isinstance(act, ThresholdedActivation):
            return down(fused.silu_mul(x))
        g, u = fused(x)
        return down(act(g) * u)

    def _pre(self, layer, which: int, h):
        """The input of sublayer `which` (0 attention, 1 MLP): the residual stream h, normed where the
        family norms sublayer inputs (all but OLMo2)."""
        return submodule(layer, self.pre_norm[which])(h) if self.pre_norm else h

    def _block(self, i, layer, h, cos, sin):
        q, k, v = self._qkv(layer, self._pre(layer, 0, h))
        if self.rotates[i]:
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        T = h.shape[1]
        end = self.pos + T
        self.k_cache[i][:, :, self.pos:end] = k
        self.v_cache[i][:, :, self.pos:end] = v
        w, cap = self.windows[i], self.scalars.attn_softcap
        first = 0 if w is None or T > 1 else max(0, end - w)  # one query: its window is a slice of the cache
        mask = window_mask(self.pos, T, end, w, h.device) if w is not None and T > 1 else None
        o = attention(q, self.k_cache[i][:, :, first:end], self.v_cache[i][:, :, first:end], mask, cap,
                      causal=T > 1 and self.pos == 0)
        h = h + self._residual(self._o(layer, o), layer, 0)
        return h + self._residual(self._mlp(layer, self._pre(layer, 1, h)), layer, 1)

    def _residual(self, d, layer, which: int):
        """Sublayer `which`'s (0 attention, 1 MLP) output d as added to the residual stream: normed
        where the family norms outputs (OLMo2, Gemma 2/3), scaled where it scales them (Granite)."""
        if self.post_norm:
            d = submodule(layer, self.post_norm[which])(d)
        return d if self.scalars.residual == 1.0 else d * self.scalars.residual

    def _embed(self, ids):
        h = self.inner.embed_tokens(ids)
        return h if self.scalars.embed == 1.0 else h * self.scalars.embed

    def _logits(self, x):
        return final_logits(self.scalars, self.model.lm_head(x))

    def _rotary(self, h, positions):
        """{layer type: (cos, sin)} per block kind (`rope_types`; one entry, None, but for Gemma 3),
        each [1, 1, T, rotary dims] for positions [1, T]."""
        rot = self.inner.rotary_emb
        out = {}
        for t in dict.fromkeys(self.rope_types):
            cos, sin = rot(h, positions) if t is None else rot(h, positions, t)
            out[t] = cos[:, None], sin[:, None]
        return out

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the last position for ids [batch, T] appended at the current position."""
        B, T = ids.shape
        if T > 1 and self.pos > 0:
            raise ValueError("multi-token input is supported only as a prefill at position 0")
        if self.pos + T > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; {self.pos + T} needed")
        inner = self.inner
        h = self._embed(ids)
        tables = self._rotary(h, torch.arange(self.pos, self.pos + T, device=ids.device)[None])
        for i, layer in enumerate(self.layers):
            h = self._block(i, layer, h, *tables[self.rope_types[i]])
        self.pos += T
        return self._logits(inner.norm(h[:, -1]))

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.pos = 0
        with dense_view(self.model):
            return self.forward(ids)

    def stream_greedy(self, prompt: torch.Tensor, new_tokens: int):
        """Greedy tokens [batch, 1], one per step, after prefilling prompt [batch, T]."""
        logits = self.prefill(prompt)
        for _ in range(new_tokens):
            tok = logits.argmax(-1, keepdim=True)
            yield tok
            logits = self.forward(tok)

    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return torch.cat(list(self.stream_greedy(prompt, new_tokens)), 1)


def cuda_graph(step, *inputs):
    """`step(*inputs)` captured in a CUDA graph, after 3 warm-up calls on a side stream (which run the
    step for real: for a decode step they write the cache slot it will write anyway); returns the
    graph and its output tensor, both tied to the inputs' addresses (change them in place)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.inference_mode():
        for _ in range(3):
            step(*inputs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(g):
        out = step(*inputs)
    g.static = (inputs, out)  # the graph reads and writes these addresses: keep them alive
    return g, out


NORMS = ("torch", "fused")
# norms whose forward is `weight * (x * rsqrt(mean(x^2) + variance_epsilon)).to(dtype)` (the fused kernel's math)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _step_norms(family, layers, final) -> list:
    """The norms of a decode step in order: each block's attention and MLP input norms (None where the
    family has none), then the final one."""
    pre = family.pre_norm
    return [submodule(layer, pre[w]) if pre else None for layer in layers for w in (0, 1)] + [final]


def _norms_fit(model) -> str | None:
    """None if every norm of the decoder's step is one the fused kernel computes, else why not."""
    try:
        from .kernels.rmsnorm import MAX_WIDTH
    except ImportError:
        return "Triton is not installed"
    if family_of(model).post_norm:
        return f"{model.config.model_type!r} norms its sublayers' outputs (the kernel norms the residual sum)"
    dtype = next(model.parameters()).dtype
    for m in _step_norms(family_of(model), blocks(model), text_model(model).norm):
        if type(m).__name__ not in RMS_NORMS or m.weight.dtype != dtype or m.weight.shape[0] > MAX_WIDTH:
            return f"{type(m).__name__} {tuple(m.weight.shape)} {m.weight.dtype} (fused: {', '.join(RMS_NORMS)} in the model dtype)"
    return None


def default_norm(model, device: torch.device) -> str:
    """"fused" on a CUDA device with Triton where every norm fits the kernel (`kernels.rmsnorm`), else
    "torch". It changes only eager steps (and their CUDA graphs): compiled steps keep the expression."""
    import importlib.util

    ok = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    return "fused" if ok and _norms_fit(model) is None else "torch"


class GraphDecoder(StaticDecoder):
    """A decode step with static shapes, for CUDA graphs and torch.compile(mode="reduce-overhead"):
    the position is a 1-element tensor, K/V are written with index_copy_, and attention reads the
    cache up to pos, so every step replays the same kernels. attention: "sdpa" (`masked_attention`:
    the whole cache under a mask), "triton" (`kernels.attention`: only the filled slots, the valid
    length read inside the kernel; its cache slots split over about 128 programs), "fused" (the same
    kernel also applying the rotary embedding and writing the new K and V: one launch per layer for
    what the others leave to three or four of inductor's kernels around index_copy_) or "auto"
    (`default_attention`: fused on CUDA where it can, else sdpa). norm: "torch" (the model's norm
    modules and residual adds), "fused" (eager steps add the residual and norm in one launch,
    `kernels.rmsnorm`; compiled steps keep the PyTorch expression for inductor to fuse) or "auto"
    (`default_norm`: fused on CUDA where every norm fits)."""

    def __init__(self, model, max_len: int = 512, batch: int = 1, attention: str = "auto", norm: str = "auto"):
        if attention not in ATTENTION + ("auto",):
            raise ValueError(f"attention must be one of {ATTENTION + ('auto',)}, got {attention!r}")
        if norm not in NORMS + ("auto",):
            raise ValueError(f"norm must be one of {NORMS + ('auto',)}, got {norm!r}")
        super().__init__(model, max_len, batch)
        cache = self.k_cache[0]
        self.use_norm(default_norm(model, cache.device) if norm == "auto" else norm)
        # the fused attention's split counters (zeroed once, left zeroed by every call), owned here for
        # the decoder's life: a CUDA graph holds no reference to what it captured, and counters that
        # died with a replaced attend (use_attention) had their memory reused while graphs still
        # replayed onto it (session 23: a position tensor overwritten, every step garbage)
        self.attn_lock = counters(batch * self.kv_heads, cache.device)
        if attention == "auto":  # the fused kernel rotates whole heads: a partial rotary embedding takes "triton"
            attention = default_attention(cache.device, self.head_dim, cache.dtype)
            attention = "triton" if attention == "fused" and self.rotary_dim < self.head_dim else attention
        self.use_attention(attention)
        # the step mutates the cache in place: marked static, inductor's CUDA graphs may capture it
        for t in self.k_cache + self.v_cache + [self.attn_lock]:
            torch._dynamo.mark_static_address(t)

    def use_norm(self, norm: str) -> str:
        """Switch the norm the next eager call or capture of `step` uses; returns the previous one."""
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if norm == "fused" and (why := _norms_fit(self.model)) is not None:
            raise ValueError(f"norm 'fused' cannot compute this model's norms: {why}; use 'torch'")
        previous, self.norm = getattr(self, "norm", None), norm
        return previous

    def use_attention(self, attention: str) -> str:
        """Switch the attention the next trace or capture of `step` uses (graphs captured before keep
        theirs); returns the previous one. attend(q, k, v, cos, sin, k_cache, v_cache, pos, ctx), q and k
        unrotated, writes the new K and V to slot pos and returns the attention; ctx = step_context(pos,
        window), computed once per step for each window the blocks have (`attend.paths`)."""
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if attention != "sdpa" and not kernel_head_dim(self.head_dim):
            raise ValueError(f"attention {attention!r} needs a head dim that is a power of two from 16, this model's is "
                             f"{self.head_dim}; use 'sdpa'")
        if attention == "fused" and self.rotary_dim < self.head_dim:
            raise ValueError(f"attention 'fused' rotates whole heads; this model rotates {self.rotary_dim} of each head's "
                             f"{self.head_dim} dims; use 'triton' or 'sdpa'")
        previous, self.attention = getattr(self, "attention", None), attention
        # attend_qkv(qkv, cos, sin, k_cache, v_cache, pos, ctx), fused only: q|k|v as one buffer
        self.step_context, self.attend, self.attend_qkv = paths(
            attention, self.max_len, attention_splits(self.batch, self.kv_heads), self.attn_lock, self.scalars.attn_softcap)
        return previous

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits for ids [batch, 1] at position `pos` (long tensor [1]); `prefill` first."""
        inner = self.inner
        h = self._embed(ids)
        tables = self._rotary(h, pos[None])
        ctxs = {w: self.step_context(pos, w) for w in dict.fromkeys(self.windows)}
        # a block without the rotary embedding gets the identity rotation, which every attention path takes
        cos = next(iter(tables.values()))[0]
        still = None if all(self.rotates) else (torch.ones_like(cos), torch.zeros_like(cos))
        # each block's attention and MLP input norms, then the final one: after each residual add the
        # norm of what comes next (families without input norms: the sublayers read the stream itself)
        norms = _step_norms(self.family, self.layers, inner.norm)
        h, x = self._add_norm(h, None, norms[0])
        for i, layer in enumerate(self.layers):
            qkv = self._qkv(layer, x, joined=self.attend_qkv is not None)
            c, s = tables[self.rope_types[i]] if self.rotates[i] else still
            ctx = ctxs[self.windows[i]]
            if torch.is_tensor(qkv):  # one buffer: compiled, one kernel writes it instead of one per view
                o = self.attend_qkv(qkv, c, s, self.k_cache[i], self.v_cache[i], pos, ctx)
            else:
                o = self.attend(*qkv, c, s, self.k_cache[i], self.v_cache[i], pos, ctx)
            h, x = self._add_norm(h, self._residual(self._o(layer, o), layer, 0), norms[2 * i + 1])
            h, x = self._add_norm(h, self._residual(self._mlp(layer, x), layer, 1), norms[2 * i + 2])  # the next block's input norm, or the final one
        return self._logits(x[:, -1])

    def _add_norm(self, h, d, norm):
        """(s, norm(s)) for s = h + d (d None: s = h). With the fused norm, eager calls run one launch
        (`kernels.rmsnorm`); traced by torch.compile, the PyTorch expression, which inductor fuses with
        its neighbours (the partials' sum, the residual add) better than an opaque op would allow."""
        if self.norm == "fused" and not torch.compiler.is_compiling():
            from .kernels.rmsnorm import add_rms_norm, rms_norm

            if d is None:
                return h, rms_norm(h, norm.weight, norm.variance_epsilon)
            return add_rms_norm(h, d, norm.weight, norm.variance_epsilon)
        s = h if d is None else h + d
        return s, s if norm is None else norm(s)

    def compile_step(self, backend: str = "inductor"):
        """`step` compiled by torch.compile for static shapes. On the CPU with inductor's C++ wrapper:
        the compiled graph's ~400 calls per step (kernels, SDPA, lm_head, allocations) are made from C++
        instead of Python; on SmolLM2-135M at 50% one step took 23.2 ms against 25.9 with the Python
        wrapper (session 15, `benchmarks/cpu_compile_wrapper.py`, alternated in one run)."""
        cpu = self.k_cache[0].device.type == "cpu"
        return torch.compile(fresh_step(self), dynamic=False, backend=backend,
                             options={"cpp_wrapper": True} if cpu and backend == "inductor" else None)

    @torch.inference_mode()
    def stream_graphed(self, prompt: torch.Tensor, new_tokens: int, compile: bool = False):
        """`stream_greedy`'s tokens, each decode step a replay of one CUDA graph of `step` (compiled by
        torch.compile first if `compile`, under `gpu_inductor()`): no per-kernel launch cost from Python.
        CUDA only."""
        if prompt.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; {prompt.shape[1] + new_tokens} needed")
        logits = self.prefill(prompt)
        if new_tokens <= 0:
            return
        ids = logits.argmax(-1, keepdim=True)
        yield ids.clone()
        pos = torch.tensor([self.pos], device=ids.device)
        graph, out = cuda_graph(torch.compile(fresh_step(self), options=gpu_inductor()) if compile else self.step, ids, pos)
        for _ in range(new_tokens - 1):
            graph.replay()
            ids.copy_(out.argmax(-1, keepdim=True))
            self.pos += 1
            pos.fill_(self.pos)
            yield ids.clone()


class CompiledDecoder(GraphDecoder):
    """A drop-in for StaticDecoder's decode loop (`forward`, `greedy`, `stream_greedy`) whose decode
    steps run `step` compiled by torch.compile (`compile_step`; no CUDA graph: on a GPU
    `stream_graphed` replays one). For the CPU, where inductor turns the ~50 small ops per layer
    around the projections into a few C++ loops: eager, they cost ~15 ms per token on SmolLM2-135M,
    as much as the projections. Prefill stays eager (dense, `prefill`). The first decode step
    compiles (~1 min on 2 cores for a 30-layer model; inductor caches it on disk). On the CPU
    attention reads every cache slot under a mask (`masked_attention`), so size max_len to the job;
    in float32 that attention rounds differently from StaticDecoder's sliced one, enough to flip a
    channel sitting at its threshold, so greedy text can part from the eager decoder's after a few
    tokens (as the uncompiled `step` does). backend: torch.compile's (tests trace with "aot_eager",
    which skips the C++ build).
    skip_guards: after the first compiled step, run the steps without dynamo's guard checks
    (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`): the decode loop calls one graph with
    inputs of fixed shapes, so the checks only cost time (SmolLM2-135M, 2 threads, two runs of session
    16: dense +2.7 / +4.5%, the 50% plan +4.8 / +6.9%, the same tokens; `benchmarks/cpu_compile_guards.py`). Unsafe where the model
    changes after the first step (modules swapped, thresholds' shapes, dtype): the old code would run on;
    for a decoder whose model stays as it is, e.g. `rsparse generate --compile` and the CPU bench."""

    def __init__(self, model, max_len: int = 512, batch: int = 1, backend: str = "inductor", skip_guards: bool = False):
        super().__init__(model, max_len, batch)
        self._step = self.compile_step(backend)
        self.skip_guards, self._warm = skip_guards, False

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > 1 or self.pos == 0:  # the prompt: StaticDecoder's eager path (prefill)
            return super().forward(ids)
        if self.pos + 1 > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; {self.pos + 1} needed")
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=self.skip_guards and self._warm):
            logits = self._step(ids, torch.tensor([self.pos], device=ids.device))
        self._warm = True  # compiled (the first call), guards built: later calls may skip them
        self.pos += 1
        return logits
