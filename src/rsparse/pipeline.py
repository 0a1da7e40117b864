"""High-level verbs: observe -> decide -> apply in one call, for the CLI and for users.

    model, tok = rsparse.load("smollm2-135m")
    plan = rsparse.calibrate(model, tok, RSparseConfig(sparsity=0.5))
    rsparse.save_plan(plan, "out/plan50")          # or later: rsparse.load_sparsified(model, "out/plan50")
    rsparse.sparsify_(model, plan)
"""
from __future__ import annotations

from . import artifact, data
from .apply import sparsify_
from .calibrate import Stats, collect
from .errors import RSparseError
from .plan import Plan, RSparseConfig, build_plan

DEFAULT_CALIB_TOKENS = 65536
DEFAULT_CALIB_LENGTH = 1024


def calibration_windows(tokenizer, source: str = "wiki", tokens: int = DEFAULT_CALIB_TOKENS,
                        length: int = DEFAULT_CALIB_LENGTH, seed: int = 0):
    if tokens < length:
        raise RSparseError(f"calibration needs at least one window: {tokens} tokens < window length {length}")
    return data.token_windows(tokenizer, source, "calib" if source in data.SOURCES else "eval", length, n=tokens // length, seed=seed)


def observe(model, tokenizer, source: str = "wiki", tokens: int = DEFAULT_CALIB_TOKENS,
            length: int = DEFAULT_CALIB_LENGTH, seed: int = 0, progress: bool = True, **collect_kw) -> Stats:
    stats = collect(model, calibration_windows(tokenizer, source, tokens, length, seed), progress=progress, **collect_kw)
    stats.config.update(source=source, seed=seed)
    return stats


def calibrate(model, tokenizer, config: RSparseConfig, stats: Stats | None = None, **observe_kw) -> Plan:
    """A plan for `model` under `config`; pass `stats` to reuse one calibration for many plans."""
    if config.method == "dense":
        stats = stats or Stats(proj={}, act={}, tokens=0, config={})
    elif stats is None:
        if config.method in ("teal", "cats") or config.score == "abs":
            observe_kw.setdefault("scores", ("abs",))
        elif config.score == "wnorm":
            observe_kw.setdefault("scores", ("wnorm",))
        stats = observe(model, tokenizer, **observe_kw)
    return build_plan(model, stats, config)


def save_plan(plan: Plan, directory):
    return artifact.save(plan, directory)


def load_sparsified(model, directory):
    """Restore a saved plan onto `model` (checked against its weights) without recalibration."""
    return sparsify_(model, artifact.load(directory))
