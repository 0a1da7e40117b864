"""Observe: calibration statistics, streamed block by block.

The calibration windows are embedded once, then pushed through one decoder block at a time
(inputs captured at block 0 with every block's keyword arguments, outputs of block i become inputs
of block i+1), so only one block's activations exist at a time. For every projection p of the block we collect:
- log-binned histograms of the channel scores |x_j| ("abs") and |x_j| * ||W[:, j]|| ("wnorm")
  over all calibration tokens: a threshold tau for any kept fraction is a histogram quantile;
- error tables on a token sample: for kept fraction kappa (grid KEEPS) and rank r (grid RANKS, or
  rank 0 alone for methods without rank terms),
  the relative output error ||W x_notS - U_r A_r x_notS||^2 / ||W x||^2 with plain SVD factors.
  With W = U S V^T, ||(W - U_r A_r) z||^2 = sum_{i >= r} s_i^2 (v_i^T z)^2, so one product Z V
  per kappa gives the error of every rank at once;
- a sensitivity weight: the block-output error caused by sparsifying p alone at a probe setting
  (half the channels, r = 0), divided by p's own relative output error there. It puts the seven
  projections of a block on one scale for the allocation search (see `plan`);
- for CATS, the histogram of |act(gate x)|;
- for the lm_head, the score histograms of its input (the final norm of the last block's output),
  from the hidden states the block stream ends with: no extra forward.
`Stats` holds all of it (plus the token sample, kept in memory for activation-aware factors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .families import PROJECTIONS, blocks, get_act, locate, text_model
from .linear import SCORES, column_norms

KEEPS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
RANKS = (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class Histogram:
    """Counts of non-negative float32 values binned by their top 16 bits (sign, exponent and 7
    mantissa bits): log-spaced bins 0.8% wide covering every float, from an integer shift and a
    bincount (3x faster than log10 + histc, which matters at 64k tokens x 210 projections)."""

    _SHIFT, _NKEYS = 16, 1 << 15

    def __init__(self):
        self.counts = torch.zeros(self._NKEYS, dtype=torch.float64)

    def add(self, values: torch.Tensor) -> None:
        keys = values.detach().float().abs().contiguous().view(torch.int32) >> self._SHIFT
        self.counts += torch.bincount(keys.reshape(-1), minlength=self._NKEYS).double()

    @classmethod
    def _edge(cls, key: int) -> float:
        return torch.tensor([key << cls._SHIFT], dtype=torch.int32).view(torch.float32).item()

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the observations lie (linear inside a bin)."""
        if q <= 0.0:
            return -math.inf
        if q >= 1.0:
            return math.inf
        cum = torch.cumsum(self.counts, 0)
        target = q * cum[-1].item()
        i = min(int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64)).item()), self._NKEYS - 2)
        below = cum[i - 1].item() if i > 0 else 0.0
        frac = min(max((target - below) / max(self.counts[i].item(), 1e-30), 0.0), 1.0)
        lo, hi = self._edge(i), self._edge(i + 1)
        return lo + frac * (hi - lo)

    def fraction_above(self, tau: float) -> float:
        """Fraction of observations > tau (bin-resolution estimate)."""
        if tau < 0:
            return 1.0
        key = int(torch.tensor([tau], dtype=torch.float32).view(torch.int32).item()) >> self._SHIFT
        return float(self.counts[key + 1 :].sum() / self.counts.sum())


@dataclass
class ProjStats:
    shape: tuple  # (out, in)
    hist: dict = field(default_factory=lambda: {s: Histogram() for s in SCORES})
    err: dict = field(default_factory=dict)  # score -> tensor [len(KEEPS), len(ranks)]
    ranks: tuple = ()
    sample: list = field(default_factory=list)  # token rows (float32), for aware factors
    weight: float = 1.0  # block-output error per unit of relative output error (sensitivity)


@dataclass
class Stats:
    proj: dict  # "i.p" -> ProjStats
    act: dict  # "i.act" -> Histogram
    tokens: int
    config: dict
    head: ProjStats | None = None  # the lm_head's input (histograms only)


def _add_scores(store: ProjStats, x: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Both score histograms of input rows x; returns x as float32 rows."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    store.hist["abs"].add(x.abs())
    store.hist["wnorm"].add(x.abs() * col)
    return x


def _input_hook(store: ProjStats, col: torch.Tensor, every: int):
    def hook(_mod, args):
        store.sample.append(_add_scores(store, args[0], col)[::every].clone())

    return hook


def _act_hook(hist: Histogram):
    def hook(_mod, _args, out):
        hist.add(out.detach().abs())

    return hook


def spectrum(W: torch.Tensor) -> tuple:
    """(singular values, right singular vectors) of W in float32, for `error_table`: one SVD per
    projection, shared by its score tables. Float32 is plenty for an error estimate; the factors
    themselves come from a float64 SVD."""
    _, s, vh = torch.linalg.svd(W.float(), full_matrices=False)
    return s, vh


def error_table(W: torch.Tensor, X: torch.Tensor, hist: Histogram, col: torch.Tensor, ranks, svd: tuple | None = None) -> torch.Tensor:
    """[len(KEEPS), len(ranks)] relative output errors of (kappa, r) on token rows X (see module doc).
    svd: `spectrum(W)`, computed here if not given and some rank is > 0; with only rank 0 there is
    no SVD: the error is ||W z||^2 itself."""
    W = W.float()
    if svd is None and any(r > 0 for r in ranks):
        svd = spectrum(W)
    X = X.float()
    total = (X @ W.T).pow(2).sum().double().clamp_min(1e-30)
    scores = X.abs() * col.float()
    out = torch.empty(len(KEEPS), len(ranks), dtype=torch.float64)
    for a, keep in enumerate(KEEPS):
        tau = hist.quantile(1.0 - keep) if keep < 1.0 else -math.inf
        Z = torch.where(scores > tau, 0.0, X)
        if svd is None:  # rank 0 only
            out[a] = (Z @ W.T).pow(2).sum().double() / total
            continue
        s, vh = svd
        energy = ((Z @ vh.T).pow(2).sum(0) * s.pow(2)).double()  # per singular direction
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[r] = sum_{i>=r}
        tail = torch.cat([tail, tail.new_zeros(1)])
        out[a] = torch.stack([tail[min(r, len(s))] for r in ranks]) / total
    return out.float()


def layer_out(layer, hs, kw):
    out = layer(hs, **kw)
    return out[0] if isinstance(out, tuple) else out


_PROBE_KEEP = 0.5


def _sensitivities(model, b: int, layer, probe, stats: dict) -> None:
    """Set stats[p].weight = block-output error / own relative error, p sparsified alone."""
    from .families import set_module
    from .linear import RSparseLinear

    hs, kw = probe
    ref = layer_out(layer, hs, kw)
    denom = ref.double().pow(2).sum().clamp_min(1e-30)
    projs = locate(model)
    for p, st in stats.items():
        key = f"{b}.{p}"
        lin = projs[key]
        tau = st.hist["abs"].quantile(1.0 - _PROBE_KEEP)
        set_module(model, key, RSparseLinear.from_linear(lin, tau, "abs"))
        try:
            out = layer_out(layer, hs, kw)
        finally:
            set_module(model, key, lin)
        block_err = ((out.double() - ref.double()).pow(2).sum() / denom).item()
        X, W = st.sample[0], lin.weight.float()
        own = (torch.where(X.abs() > tau, 0.0, X) @ W.T).pow(2).sum() / (X @ W.T).pow(2).sum().clamp_min(1e-30)
        st.weight = block_err / max(own.item(), 1e-30)


class _Recorder(nn.Module):
    """Stands in for a decoder block while `block_inputs` runs the model: keeps the block's keyword
    arguments and passes the hidden states on (the last one stops the forward)."""

    def __init__(self, last: bool):
        super().__init__()
        self.last, self.seen = last, None

    def forward(self, hidden_states, *args, **kwargs):
        self.seen = hidden_states, {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if self.last:
            raise _Stop
        return hidden_states


class _Stop(Exception):
    pass


@torch.inference_mode()
def block_inputs(model, windows: torch.Tensor, batch: int = 4) -> list:
    """[(hidden states of block 0, (keyword arguments of block 0, 1, ...))] for each batch of
    `windows`: the kwargs carry the masks and rotary tables, which differ by layer type (Gemma 2/3's
    sliding and full blocks, Gemma 3's two rotary bases), so every block keeps its own. The blocks are
    swapped for recorders while the model's forward runs up to the last one (no block computes)."""
    layers = blocks(model)
    originals = list(layers)
    recorders = [_Recorder(i == len(layers) - 1) for i in range(len(layers))]
    captured = []
    try:
        for i, rec in enumerate(recorders):
            layers[i] = rec
        for i in range(0, len(windows), batch):
            try:
                model(windows[i : i + batch], use_cache=False)
            except _Stop:
                pass
            captured.append((recorders[0].seen[0], tuple(rec.seen[1] for rec in recorders)))
    finally:
        for i, block in enumerate(originals):
            layers[i] = block
    return captured


@torch.inference_mode()
def collect(model, windows: torch.Tensor, batch: int = 4, sample_tokens: int = 768, scores=SCORES,
            progress: bool = True, ranks=RANKS) -> Stats:
    """Calibration statistics of `model` on token `windows` ([n, L]); error tables for `scores` at
    `ranks` (ranks=(0,) for methods without rank terms: no SVDs; TEAL's collection 1.35-1.5x faster,
    `benchmarks/calibration_time.py`)."""
    if 0 not in ranks:
        raise ValueError(f"ranks must include 0 (the kept columns alone), got {ranks}")
    layers = blocks(model)
    projs = locate(model)
    n_tok = windows.numel()
    every = max(1, n_tok // sample_tokens)

    captured = block_inputs(model, windows, batch)

    # a probe batch (one window) on which each projection's effect on its block output is measured;
    # captured apart, so that its masks have the probe's batch size. Only the error tables read the
    # sensitivities, so a collection without tables (scores=()) skips both.
    probe = block_inputs(model, windows[:1], 1)[0] if scores else None
    proj_stats, act_stats = {}, {}
    for b, layer in enumerate(tqdm(layers, desc="calibrate", disable=not progress, leave=False)):
        hooks = []
        for p in PROJECTIONS:
            key = f"{b}.{p}"
            W = projs[key].weight
            st = ProjStats(shape=tuple(W.shape))
            proj_stats[key] = st
            hooks.append(projs[key].register_forward_pre_hook(_input_hook(st, column_norms(W), every)))
        act_stats[f"{b}.act"] = Histogram()
        hooks.append(get_act(model, b).register_forward_hook(_act_hook(act_stats[f"{b}.act"])))
        try:
            for j, (hs, kws) in enumerate(captured):
                captured[j] = (layer_out(layer, hs, kws[b]), kws)
        finally:
            for hk in hooks:
                hk.remove()
        for p in PROJECTIONS:
            st = proj_stats[f"{b}.{p}"]
            st.sample = [torch.cat(st.sample)]
            W = projs[f"{b}.{p}"].weight
            st.ranks = tuple(r for r in sorted(ranks) if r <= min(W.shape))
            col = column_norms(W)
            svd = spectrum(W) if scores and st.ranks[-1] > 0 else None
            for score in scores:  # error tables are the costly part: only the scores asked for
                c = col if score == "wnorm" else torch.ones_like(col)
                st.err[score] = error_table(W, st.sample[0], st.hist[score], c, st.ranks, svd)
        if probe is not None:
            _sensitivities(model, b, layer, (probe[0], probe[1][b]), {p: proj_stats[f"{b}.{p}"] for p in PROJECTIONS})
            probe = (layer_out(layer, probe[0], probe[1][b]), probe[1])
    config = {"windows": list(windows.shape), "sample_every": every, "scores": list(scores), "ranks": sorted(ranks)}
    return Stats(proj=proj_stats, act=act_stats, tokens=n_tok, config=config, head=_head_stats(model, captured))


def head_inputs(model, captured):
    """The lm_head's input for each batch of `captured` ([(last block's output, kwargs)]): the final norm."""
    norm = text_model(model).norm
    return (norm(hs) for hs, _ in captured)


def _head_stats(model, captured) -> ProjStats | None:
    """The lm_head's input score histograms from the last block's outputs `captured`."""
    head = getattr(model, "lm_head", None)
    if head is None:
        return None
    st, col = ProjStats(shape=tuple(head.weight.shape)), column_norms(head.weight)
    for x in head_inputs(model, captured):
        _add_scores(st, x, col)  # no sample: the head's plan has no rank term to whiten
    return st
