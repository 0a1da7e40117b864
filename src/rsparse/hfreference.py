"""Hugging Face `generate` on the benchmark's dense model: a reference row for `rsparse bench --device
cuda`, never its baseline. The baseline is our own static-cache step compiled and captured in a CUDA
graph (cuBLAS matmuls), the fastest dense decode we have; `generate` runs the same weights through
the model's own forward. Issue 5 quotes 19 tok/s eager and 81 tok/s compiled on an H200 for it, against
~190 for our dense step: this row lets a reader see both on the same machine in the same run.

Modes: "eager" (dynamic cache, `disable_compile`) and "compiled" (static cache; transformers then
compiles the forward itself with its CompileConfig, mode "reduce-overhead", on CUDA). tok/s = rows x
new tokens / wall time of one `generate` call after a warm-up call (which also compiles), prompt
prefill included (a 4-token prompt: a few ms next to seconds of decoding). Greedy, exactly `tokens`
new tokens per row (min = max, so an end-of-text token cannot stop it early).
"""
import time

import torch

HF_MODES = ("eager", "compiled")


def hf_modes(spec: str | None) -> list:
    """--hf-reference's comma list ("" or "none": no reference row)."""
    modes = [m for m in (spec or "").split(",") if m and m != "none"]
    bad = [m for m in modes if m not in HF_MODES]
    if bad:
        from .errors import RSparseError

        raise RSparseError(f"--hf-reference: unknown mode(s) {bad}; choose from {list(HF_MODES)} (comma list) or none")
    return modes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_generate(model, prompt: torch.Tensor, tokens: int, mode: str) -> torch.Tensor:
    """`model.generate` greedily for exactly `tokens` new tokens per row; returns the new ids."""
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    if mode == "eager":
        kw["disable_compile"] = True
    elif mode == "compiled":
        kw["cache_implementation"] = "static"
    else:
        raise ValueError(f"mode must be one of {HF_MODES}, got {mode!r}")
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    return out[:, prompt.shape[1]:]


def hf_generate_tok_s(model, batch: int, tokens: int, mode: str) -> dict:
    """{"hf_generate_<mode>_tok_s": ..., "hf_generate_<mode>_first_call_s": ...} for `batch` rows of
    distinct 4-token prompts (the first call includes any compile)."""
    device = next(model.parameters()).device
    prompt = (torch.arange(batch * 4, device=device).reshape(batch, 4) * 7919 + 11) % model.config.vocab_size
    t0 = time.perf_counter()
    hf_generate(model, prompt, tokens, mode)
    _sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = hf_generate(model, prompt, tokens, mode)
    _sync(device)
    dt = time.perf_counter() - t0
    if new.shape != (batch, tokens):  # min = max new tokens: a short result is a bug, not a timing
        raise RuntimeError(f"generate returned {tuple(new.shape)} new ids, expected {(batch, tokens)}")
    return {f"hf_generate_{mode}_tok_s": batch * tokens / dt, f"hf_generate_{mode}_first_call_s": first}
