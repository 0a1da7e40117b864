"""Plan artifacts: DIR/plan.json (thresholds, ranks, config, model identity) and
DIR/factors.safetensors (U, A of every ranked projection).

Files are written under temporary names and renamed, factors first and plan.json last; plan.json
records the SHA-256 of the factors file, so a truncated or corrupt artifact is refused on load.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic import write_atomic, write_json
from .errors import RSparseError
from .plan import LayerPlan, Plan

FORMAT = "rsparse-plan/1"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(plan: Plan, directory) -> Path:
    from safetensors.torch import save_file

    if not isinstance(plan, Plan):  # before anything is written
        raise RSparseError(f"save_plan takes a Plan, got {type(plan).__name__}")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise RSparseError(f"{d}: exists and is not a directory")
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (U, A) in plan.factors.items():
        tensors[f"{key}.U"] = U.contiguous()
        tensors[f"{key}.A"] = A.contiguous()
    write_atomic(d / "factors.safetensors", lambda p: save_file(tensors, p))
    meta = {"format": FORMAT, **plan.to_json(), "factors_sha256": _sha(d / "factors.safetensors")}
    write_json(d / "plan.json", meta)
    return d


def load(directory) -> Plan:
    from safetensors.torch import load_file

    d = Path(directory)
    pj, fj = d / "plan.json", d / "factors.safetensors"
    if not pj.is_file():
        raise RSparseError(f"{d}: no plan.json (not an rsparse plan directory)")
    try:
        meta = json.loads(pj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RSparseError(f"{pj}: corrupt plan file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RSparseError(f"{pj}: not a {FORMAT} file")
    if not fj.is_file() or _sha(fj) != meta.get("factors_sha256"):
        raise RSparseError(f"{fj}: missing, truncated or modified (checksum does not match plan.json)")
    try:
        layers = {k: LayerPlan(**v) for k, v in meta["layers"].items()}
        tensors = load_file(str(fj))
        factors = {k: (tensors[f"{k}.U"], tensors[f"{k}.A"]) for k, lp in layers.items() if lp.rank}
        plan = Plan(config=meta["config"], model_id=meta["model_id"], fingerprint=meta["fingerprint"],
                    shapes={k: tuple(v) for k, v in meta["shapes"].items()}, layers=layers,
                    calibration=meta.get("calibration", {}), factors=factors, fingerprint_fp16=meta.get("fingerprint_fp16", ""),
                    head_shape=list(meta.get("head_shape", [])))
    except (KeyError, TypeError) as e:
        raise RSparseError(f"{pj}: incomplete plan ({e})") from None
    from .budget import check_sparsity

    check_sparsity(plan.config.get("sparsity", -1), "plan sparsity")
    return plan
