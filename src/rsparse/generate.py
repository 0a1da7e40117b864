"""Greedy text generation with a KV cache: the prompt is prefilled dense (decode protocol), each
new token runs through the sparse modules, and text is yielded as it is produced. `generate_ids`
runs the model's own (Hugging Face) forward; `decoder_ids` runs the lean static-cache decoder
(`decode.StaticDecoder`), the loop the fast backends (C++, Triton) are built and benchmarked for, or on
a GPU (`graphed`) its static-shape step replayed from a CUDA graph (`decode.GraphDecoder`), or on the
CPU (`compile`) that step compiled by torch.compile (`decode.CompiledDecoder`)."""
from __future__ import annotations

import torch

from .apply import dense_view
from .decode import CompiledDecoder, GraphDecoder, StaticDecoder
from .evaluate import _cache_of, _with_cache


@torch.inference_mode()
def generate_ids(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None):
    dev = next(model.parameters()).device
    with dense_view(model):
        out = model(prompt_ids[None].to(dev), use_cache=True)
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        yield nxt
        if nxt == eos_id:
            return
        out = _with_cache(model, torch.tensor([[nxt]], device=dev), _cache_of(out))


@torch.inference_mode()
def decoder_ids(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None, graphed: bool = False,
                compile: bool = False):
    """graphed: every decode step a CUDA graph replay (compiled by torch.compile first if `compile`);
    compile without graphed: the step compiled by torch.compile alone (the CPU's fast path)."""
    max_len = len(prompt_ids) + max_new_tokens + 1
    prompt = prompt_ids[None].to(next(model.parameters()).device)
    if graphed:
        steps = GraphDecoder(model, max_len=max_len).stream_graphed(prompt, max_new_tokens, compile)
    elif compile:
        steps = CompiledDecoder(model, max_len=max_len, skip_guards=True).stream_greedy(prompt, max_new_tokens)
    else:
        steps = StaticDecoder(model, max_len=max_len).stream_greedy(prompt, max_new_tokens)
    for tok in steps:
        nxt = int(tok)
        yield nxt
        if nxt == eos_id:
            return


def stream(model, tokenizer, prompt: str, max_new_tokens: int = 64, ids_fn=generate_ids):
    """Text pieces as they are produced; ids_fn: generate_ids (HF forward) or decoder_ids."""
    ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id])
    new, shown = [], ""
    for tok in ids_fn(model, ids, max_new_tokens, tokenizer.eos_token_id):
        if tok == tokenizer.eos_token_id:
            break
        new.append(tok)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for multi-byte characters to complete
            yield text[len(shown):]
            shown = text
