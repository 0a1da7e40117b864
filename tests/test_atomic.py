"""Whole-or-nothing file writes (`rsparse.atomic`)."""
import json

import pytest

from rsparse.atomic import write_atomic, write_bytes, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "plan.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def half_then_fail(tmp):
        open(tmp, "w").write('{"a": ')
        raise KeyboardInterrupt  # an interrupted run, not only an exception

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_fail)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    write_bytes(target, b"[2]")
    assert target.read_bytes() == b"[2]" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
