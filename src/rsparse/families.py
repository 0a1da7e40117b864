"""Model-family table: where the decoder blocks and the seven projections live.

Every stage (calibration, plans, module swap, kernels) finds layers through `locate(model)` and
nothing else, so supporting a new Llama-like family is one row in `FAMILIES`. Names are relative
to the decoder block. `act` is the MLP activation module (CATS thresholds its output).
`groups` names the projections that read the same input (q/k/v; gate/up) and where a backend may
attach one fused module for them (`set_group`); decoders call it instead of the members when present.
The last fields say what rsparse's decode loops (`decode.py`) must change in a pre-norm Llama block
for the family: q/k norms before the rotary embedding, per head (Qwen3, Gemma 3) or over the whole
projection (OLMo2), which norms sit before each sublayer (none in OLMo2) and which on its output
(OLMo2; Gemma 2/3 have both: "sandwich" norms), the config's scalar multipliers (Granite), blocks
without the rotary embedding (SmolLM3), the config's sliding attention window (per block where the
config lists `layer_types`), Gemma's attention scale and tanh soft-capping of attention scores and
logits, and rotary tables per layer type (Gemma 3: local and global bases). `inner` is the text
decoder (embeddings, rotary embedding, final norm, blocks): a vision-language model's language_model
(Gemma 3 from 4B up), whose config is `text_config`; it is run on text alone. Calibration and
evaluation run the model's own forward and need none of them, except that the blocks' keyword
arguments (masks, rotary tables) differ by layer type: `calibrate.block_inputs` keeps each block's.
`fused` names projections stored as one layer (Phi-3's q|k|v and gate|up), split into their parts
(`SplitLinear`) the first time `locate` sees the model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .errors import RSparseError

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Family:
    proj: dict  # short name -> path inside a block
    act: str  # path of the MLP activation module inside a block
    inner: str = "model"  # the text decoder: embed_tokens, rotary_emb, norm and the blocks (a VLM's language_model)
    # group name -> (member projections, attribute path of the fused module inside a block)
    groups: tuple = (("qkv", ("q", "k", "v"), "self_attn.rsparse_qkv"), ("gate_up", ("gate", "up"), "mlp.rsparse_gate_up"))
    qk_norm: tuple = ()  # (q norm, k norm) paths inside a block, applied before the rotary embedding
    qk_norm_per_head: bool = True  # each head's q and k normed alone (Qwen3), or q and k whole (OLMo2)
    pre_norm: tuple = ("input_layernorm", "post_attention_layernorm")  # (attention, MLP) input norms; () none
    post_norm: tuple = ()  # (attention, MLP) output norms: h += norm(sublayer(x)) (OLMo2, Gemma 2/3)
    multipliers: bool = False  # the config's embedding_multiplier, residual_multiplier, attention_multiplier, logits_scaling
    rope_switch: str = ""  # attribute inside a block saying whether it rotates q and k (SmolLM3's NoPE blocks: False)
    window: bool = False  # the config's sliding_window applies (to the blocks `layer_types` marks, if it has them)
    # Gemma: embeddings times sqrt(hidden) by the embedding module itself (transformers 5; 4.x did it in the model's
    # forward), attention scale query_pre_attn_scalar^-1/2, the config's attention and logit soft-capping
    gemma: bool = False
    rope_by_type: bool = False  # the rotary embedding takes the block's layer type (Gemma 3: two bases)
    # fused projections split into their parts at first use (`unfuse_`): (path, part names, widths rule)
    fused: tuple = ()

    @property
    def blocks(self) -> str:  # attribute path of the ModuleList of decoder blocks
        return f"{self.inner}.layers"


_LLAMA = Family(
    proj={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    act="mlp.act_fn",
)

_SANDWICH = dict(pre_norm=("input_layernorm", "pre_feedforward_layernorm"),
                 post_norm=("post_attention_layernorm", "post_feedforward_layernorm"))

_GEMMA3 = replace(_LLAMA, **_SANDWICH, window=True, gemma=True, rope_by_type=True, qk_norm=("self_attn.q_norm", "self_attn.k_norm"))

# model_type (from the HF config) -> family. Llama-style gated-MLP decoders share one layout; each
# row is checked against the family's own forward in float64 (tests/test_families.py).
FAMILIES = {
    "llama": _LLAMA,
    "gemma": replace(_LLAMA, gemma=True),
    **{name: replace(_LLAMA, window=True) for name in ("mistral", "qwen2")},
    "qwen3": replace(_LLAMA, qk_norm=("self_attn.q_norm", "self_attn.k_norm"), window=True),
    "granite": replace(_LLAMA, multipliers=True),
    "smollm3": replace(_LLAMA, rope_switch="self_attn.use_rope", window=True),
    # Phi-3: q|k|v and gate|up are one nn.Linear each; split, their parts sit under the fused layer's name
    "phi3": replace(_LLAMA, act="mlp.activation_fn", proj={
        **_LLAMA.proj, "q": "self_attn.qkv_proj.q_proj", "k": "self_attn.qkv_proj.k_proj", "v": "self_attn.qkv_proj.v_proj",
        "gate": "mlp.gate_up_proj.gate_proj", "up": "mlp.gate_up_proj.up_proj"},
        fused=(("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"), "heads"), ("mlp.gate_up_proj", ("gate_proj", "up_proj"), "halves")),
        window=True),
    "olmo2": replace(_LLAMA, qk_norm=("self_attn.q_norm", "self_attn.k_norm"), qk_norm_per_head=False, pre_norm=(),
                     post_norm=("post_attention_layernorm", "post_feedforward_layernorm")),
    "gemma2": replace(_LLAMA, **_SANDWICH, window=True, gemma=True),
    "gemma3_text": _GEMMA3,
    # Gemma 3 4B and up: a vision-language model whose text decoder is model.language_model (text in, text out)
    "gemma3": replace(_GEMMA3, inner="model.language_model"),
}


def submodule(root: nn.Module, path: str):
    """The module at dotted `path` under `root`, or None."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def family_of(model: nn.Module) -> Family:
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    fam = FAMILIES.get(mtype)
    if fam is None:
        raise RSparseError(
            f"unsupported architecture {mtype!r}: rsparse knows {sorted(FAMILIES)} "
            "(decoder blocks at model.layers with q/k/v/o_proj and gate/up/down_proj)"
        )
    return fam


def text_config(model: nn.Module):
    """The text decoder's config: the model's own, or a vision-language model's text_config."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def text_model(model: nn.Module) -> nn.Module:
    """The text decoder module (embed_tokens, rotary_emb, norm, layers): `Family.inner`."""
    return submodule(model, family_of(model).inner)


def blocks(model: nn.Module) -> nn.ModuleList:
    fam = family_of(model)
    layers = submodule(model, fam.blocks)
    if not isinstance(layers, nn.ModuleList):
        raise RSparseError(f"model of type {model.config.model_type!r} has no decoder blocks at {fam.blocks!r}")
    return layers


class SplitLinear(nn.Module):
    """A fused projection (Phi-3's qkv_proj, gate_up_proj) as its parts: each an nn.Linear of its own
    over its rows of the fused weight (copied once; the fused layer is dropped), so every stage finds,
    calibrates and swaps the parts like any other projection. forward: the parts' outputs side by
    side, what the fused layer returned, so the model's own forward runs unchanged."""

    def __init__(self, lin: nn.Linear, parts: dict):
        super().__init__()
        start = 0
        for name, rows in parts.items():
            # normal tensors even when the first `locate` runs under inference mode (calibration does): an
            # inference-tensor weight cannot be transposed into a backend's layout later (found on the GPU)
            with torch.inference_mode(False), torch.no_grad():
                part = nn.Linear(lin.in_features, rows, bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
                part.weight.copy_(lin.weight[start:start + rows])
                if lin.bias is not None:
                    part.bias.copy_(lin.bias[start:start + rows])
            part.requires_grad_(lin.weight.requires_grad)
            self.add_module(name, part)
            start += rows
        if start != lin.out_features:
            raise RSparseError(f"a fused projection of {lin.out_features} outputs does not split into {dict(parts)}")

    def forward(self, x):
        return torch.cat([m(x) for m in self.children()], dim=-1)


def _widths(cfg, names: tuple, rule: str, out_features: int) -> dict:
    if rule == "heads":  # q, k, v of a grouped-query attention
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return dict(zip(names, (cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d)))
    return {n: out_features // len(names) for n in names}  # "halves": gate and up


def _put(root: nn.Module, path: str, module) -> nn.Module:
    """Set the module at dotted `path` under `root` to `module`; returns the one it replaces."""
    parent_path, _, attr = path.rpartition(".")
    parent = submodule(root, parent_path) if parent_path else root
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


def unfuse_(model: nn.Module) -> None:
    """Split the family's fused projections (`Family.fused`) into SplitLinear parts, in place; a no-op
    where they are split already or the family has none. `locate` calls it, so every stage sees parts."""
    fam = family_of(model)
    for block in blocks(model) if fam.fused else ():
        for path, names, rule in fam.fused:
            lin = submodule(block, path)
            if type(lin) is nn.Linear:
                _put(block, path, SplitLinear(lin, _widths(text_config(model), names, rule, lin.out_features)))


def locate(model: nn.Module) -> dict[str, nn.Module]:
    """Return {"<block>.<proj>": module} for every projection, e.g. "3.gate"; checks all exist."""
    fam = family_of(model)
    unfuse_(model)
    out = {}
    for i, block in enumerate(blocks(model)):
        for short, path in fam.proj.items():
            mod = submodule(block, path)
            if mod is None:
                raise RSparseError(f"block {i} has no projection {path!r} ({short}); the model layout is not Llama-like")
            out[f"{i}.{short}"] = mod
    return out


HEAD = "head"  # the lm_head's key beside the blocks' "i.p" (plans, sparse modules, calibration statistics)


def swappable(model: nn.Module) -> dict[str, nn.Module]:
    """`locate(model)` and the lm_head under HEAD, where the model has one: every module a plan may swap."""
    head = getattr(model, "lm_head", None)
    return {**locate(model), **({HEAD: head} if head is not None else {})}


def set_module(model: nn.Module, key: str, new: nn.Module) -> nn.Module:
    """Replace the module at a `locate` key ("3.gate"), an activation key ("3.act") or "head" (the
    lm_head); returns the old one."""
    if key == HEAD:
        return _put(model, "lm_head", new)
    fam = family_of(model)
    i, short = key.split(".")
    return _put(blocks(model)[int(i)], fam.act if short == "act" else fam.proj[short], new)


def get_act(model: nn.Module, i: int) -> nn.Module:
    return submodule(blocks(model)[i], family_of(model).act)


def get_group(family: Family, block: nn.Module, name: str):
    """The fused module attached for group `name` in `block`, or None."""
    return submodule(block, next(path for n, _, path in family.groups if n == name))


def set_group(model: nn.Module, i: int, name: str, module) -> None:
    """Attach (module) or detach (None) the fused module of group `name` in block i."""
    path = next(path for n, _, path in family_of(model).groups if n == name)
    parent_path, _, attr = path.rpartition(".")
    parent = submodule(blocks(model)[i], parent_path)
    if module is None:
        if hasattr(parent, attr):
            delattr(parent, attr)
    else:
        setattr(parent, attr, module)


def group_members(model: nn.Module, modules: dict) -> dict:
    """{(block, group name): [members]} for every block whose group members are all in `modules`
    ({"i.p": module}), in block order; backends build their fused module from each list."""
    out = {}
    for i in sorted({int(k.split(".")[0]) for k in modules if k != HEAD}):
        for name, members, _ in family_of(model).groups:
            mods = [modules.get(f"{i}.{p}") for p in members]
            if all(m is not None for m in mods):
                out[(i, name)] = mods
    return out


def attached_groups(model: nn.Module) -> dict:
    """{(block, group name): fused module} for every group attached in `model`."""
    fam = family_of(model)
    out = {}
    for i, block in enumerate(blocks(model)):
        for name, _, _ in fam.groups:
            m = get_group(fam, block, name)
            if m is not None:
                out[(i, name)] = m
    return out


@dataclass(frozen=True)
class Scalars:
    """The scalars of a family's forward (1 / None elsewhere): Granite's config multipliers (embeddings
    times `embed`, each sublayer's output times `residual` before its residual add, logits divided by
    `logits`), the attention scores' scale `attention` instead of 1/sqrt(head dim) (Granite's
    attention_multiplier, Gemma's query_pre_attn_scalar^-1/2; None: that default), and Gemma 2's
    soft-capping c * tanh(s / c) of attention scores (`attn_softcap`) and logits (`logit_softcap`)."""
    embed: float = 1.0
    residual: float = 1.0
    attention: float | None = None
    logits: float = 1.0
    attn_softcap: float | None = None
    logit_softcap: float | None = None


def scalars(model: nn.Module) -> Scalars:
    fam, cfg = family_of(model), text_config(model)
    if fam.multipliers:
        return Scalars(float(getattr(cfg, "embedding_multiplier", 1.0)), float(getattr(cfg, "residual_multiplier", 1.0)),
                       getattr(cfg, "attention_multiplier", None), float(getattr(cfg, "logits_scaling", 1.0)))
    if fam.gemma:
        q = getattr(cfg, "query_pre_attn_scalar", None)
        return Scalars(attention=None if q is None else float(q) ** -0.5,
                       attn_softcap=getattr(cfg, "attn_logit_softcapping", None) or None,
                       logit_softcap=getattr(cfg, "final_logit_softcapping", None) or None)
    return Scalars()


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def final_logits(s: Scalars, y: torch.Tensor) -> torch.Tensor:
    """The lm_head's output y as the family's forward returns it (Granite's division, Gemma 2's cap)."""
    return softcap(y if s.logits == 1.0 else y / s.logits, s.logit_softcap)


def rotates(model: nn.Module) -> list:
    """Per block, whether it applies the rotary embedding to q and k (`Family.rope_switch`)."""
    switch = family_of(model).rope_switch
    return [bool(submodule(b, switch)) if switch else True for b in blocks(model)]


def rope_types(model: nn.Module) -> list:
    """Per block, the layer type its rotary table is computed for (`Family.rope_by_type`), else None."""
    n = len(blocks(model))
    return list(text_config(model).layer_types)[:n] if family_of(model).rope_by_type else [None] * n


def windows(model: nn.Module) -> list:
    """Per block, the number of latest positions (itself included) its attention sees, or None for
    all: the config's sliding_window where the family applies it (`Family.window`), on the blocks its
    `layer_types` marks "sliding_attention" or, without them, on every block unless use_sliding_window
    is False."""
    cfg, n = text_config(model), len(blocks(model))
    w = getattr(cfg, "sliding_window", None)
    if not (family_of(model).window and w):
        return [None] * n
    types_ = getattr(cfg, "layer_types", None)
    if types_ is None:
        return [int(w) if getattr(cfg, "use_sliding_window", True) else None] * n
    return [int(w) if t == "sliding_attention" else None for t in types_[:n]]


def check_decodable(model: nn.Module) -> None:
    """Refuse, by name, a model whose transformers version lays out what the decode loops call differently
    from transformers 5 (which they follow): Gemma's embedding scale inside the embedding module, and Gemma
    3's rotary embedding taking the layer type. Calibration and evaluation run the model's own forward
    and need neither."""
    import inspect

    fam, inner = family_of(model), text_model(model)
    old = None
    if fam.gemma and not hasattr(inner.embed_tokens, "embed_scale"):
        old = "embeddings scaled in the model's forward, not by the embedding module"
    elif fam.rope_by_type and "layer_type" not in inspect.signature(inner.rotary_emb.forward).parameters:
        old = "one rotary embedding per base, not one taking the layer type"
    if old:
        raise RSparseError(f"rsparse's decode loops follow transformers 5's {model.config.model_type!r} model; this one "
                           f"({old}) is from an older transformers: upgrade it to decode (calibrate and eval work as they are)")


def rotary_dim(model: nn.Module, head_dim: int) -> int:
    """How many of each head's dims the rotary embedding turns (all, but for a partial_rotary_factor)."""
    cfg = text_config(model)
    factor = getattr(cfg, "partial_rotary_factor", None) or (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor")
    return int(head_dim * factor) if factor else head_dim
