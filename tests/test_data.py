"""Text sources, splits and windows."""
import pytest
import torch

from rsparse import data
from rsparse.errors import RSparseError


def test_wiki_splits_are_disjoint_and_deterministic():
    calib, ev = data.text("wiki", "calib"), data.text("wiki", "eval")
    assert len(calib) > 1_000_000 and len(ev) > 300_000
    cal_paras = set(p for p in calib.split("\n\n") if len(p) > 200)
    ev_paras = set(p for p in ev.split("\n\n") if len(p) > 200)
    assert cal_paras and ev_paras and not (cal_paras & ev_paras)
    assert data.text("wiki", "eval") == ev


def test_windows_shape_seed_and_errors():
    ids = torch.arange(1000)
    w = data.windows(ids, 100)
    assert w.shape == (10, 100) and torch.equal(w[3], torch.arange(300, 400))
    a, b = data.windows(ids, 100, n=4, seed=7), data.windows(ids, 100, n=4, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, data.windows(ids, 100, n=4, seed=8))
    with pytest.raises(RSparseError, match="has 1000 tokens; 2000 are needed"):
        data.windows(ids, 1000, n=2)
    with pytest.raises(RSparseError, match="at least 2"):
        data.windows(ids, 1)


def test_user_text_files(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 10, encoding="utf-8")
    assert data.text(str(f)).startswith("hello")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(RSparseError, match="not UTF-8"):
        data.text(str(bad))
    with pytest.raises(RSparseError, match="neither a file"):
        data.text(str(tmp_path / "missing.txt"))
    with pytest.raises(RSparseError, match="evaluation text only"):
        data.text("lambada", "calib")


def test_short_text_says_how_many_tokens(smol, tmp_path):
    _, tok = smol()
    f = tmp_path / "short.txt"
    f.write_text("Only a few words here.", encoding="utf-8")
    with pytest.raises(RSparseError, match=r"has \d+ tokens; 1024 are needed"):
        data.token_windows(tok, str(f), "eval", 1024)
    e = tmp_path / "empty.txt"
    e.write_text("  \n", encoding="utf-8")
    with pytest.raises(RSparseError, match="empty"):
        data.token_windows(tok, str(e), "eval", 1024)
