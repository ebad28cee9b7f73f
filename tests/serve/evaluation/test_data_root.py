"""The server's data root: nothing outside it is opened — absolute paths, '..', symlink escapes, no root at all."""

from __future__ import annotations

import os

import pytest

from lifecycle.errors import LmforgeError
from serve.evaluation.data_root import DataRoot, PathRefused


@pytest.fixture()
def root(tmp_path):
    base = tmp_path / "root"
    (base / "eval").mkdir(parents=True)
    (base / "eval" / "a.jsonl").write_text("{}\n")
    (base / "eval" / "b.jsonl").write_text("{}\n")
    (tmp_path / "secret.txt").write_text("s")
    os.symlink(tmp_path / "secret.txt", base / "eval" / "escape.jsonl")
    os.symlink(tmp_path, base / "up")
    (base / "eval" / "inside.jsonl").symlink_to(base / "eval" / "a.jsonl")
    return base


def test_confined_resolves_inside(root):
    dr = DataRoot(root, confined=True)
    assert dr.resolve("eval/a.jsonl", "data") == [root / "eval" / "a.jsonl"]
    assert dr.resolve("eval/inside.jsonl", "data") == [root / "eval" / "a.jsonl"]  # a link that stays inside
    assert [p.name for p in dr.resolve("eval/[ab].jsonl", "data")] == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize("pattern, code", [
    ("/etc/passwd", "INVALID_ARGUMENT"), ("../secret.txt", "INVALID_ARGUMENT"), ("eval/../../secret.txt", "INVALID_ARGUMENT"),
    ("~/x", "INVALID_ARGUMENT"), ("", "INVALID_ARGUMENT"), ("eval/escape.jsonl", "PERMISSION_DENIED"),
    ("up/secret.txt", "PERMISSION_DENIED"), ("eval/*.jsonl", "PERMISSION_DENIED"),  # the glob matches the escape
    ("eval/none.jsonl", "NOT_FOUND"), ("eval", "NOT_FOUND"),
])
def test_confined_refuses(root, pattern, code):
    with pytest.raises(PathRefused) as err:
        DataRoot(root, confined=True).resolve(pattern, "data")
    assert err.value.code == code and "data" in str(err.value)


def test_no_root_opens_nothing(root):
    with pytest.raises(PathRefused) as err:
        DataRoot(None, confined=True).resolve("eval/a.jsonl", "data")
    assert err.value.code == "FAILED_PRECONDITION"


def test_local_mode_uses_root_then_fallback(root, tmp_path):
    assert DataRoot(root).resolve("eval/a.jsonl", "data") == [root / "eval" / "a.jsonl"]
    assert DataRoot(None, fallback=root / "eval").resolve("b.jsonl", "data") == [root / "eval" / "b.jsonl"]
    assert DataRoot(root).resolve(str(tmp_path / "secret.txt"), "data") == [tmp_path / "secret.txt"]
    # With a data root, a task's own files beside it are still found (the root is tried first).
    assert DataRoot(root, fallback=tmp_path).resolve("secret.txt", "data") == [tmp_path / "secret.txt"]
    with pytest.raises(LmforgeError, match="--data-root"):
        DataRoot(None, fallback=tmp_path).resolve("eval/a.jsonl", "data")
