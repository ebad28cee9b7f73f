"""The embedded default corpus: builds from the real stdlib, deterministic, sane split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifecycle.data.stdlib_corpus import CorpusInfo, build_stdlib_corpus, summary_of
from lifecycle.errors import ConfigError


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    return build_stdlib_corpus(tmp_path_factory.mktemp("stdlib"))


def test_builds_with_known_entries(built: CorpusInfo) -> None:
    assert built.num_train_docs > 2000 and built.num_chars > 500_000
    docs = {d["qualname"]: d for d in load(built.train_path) + load(built.heldout_path)}
    join = docs["os.path.join"]
    assert join["kind"] == "function" and join["signature"] == "os.path.join(a, *p)"
    assert join["summary"].startswith("Join two or more pathname components")
    assert join["text"].startswith("os.path.join(a, *p)\n\nJoin two or more pathname components")
    assert docs["json"]["kind"] == "module"
    assert docs["collections.OrderedDict"]["kind"] == "class"
    assert docs["topic:assert"]["kind"] == "topic" and "assert" in docs["topic:assert"]["summary"]
    assert not any(q.split(".")[0] in {"test", "idlelib", "lib2to3", "turtledemo", "ensurepip"} for q in docs)
    assert "antigravity.geohash" in docs  # parsed, never imported (importing opens a browser)
    assert all(len(d["text"]) >= 40 and set(d) == {"text", "qualname", "kind", "signature", "summary"}
               for d in docs.values())


def test_split_disjoint_nonempty_and_meta(built: CorpusInfo) -> None:
    train = {d["qualname"] for d in load(built.train_path)}
    heldout = {d["qualname"] for d in load(built.heldout_path)}
    assert heldout and not train & heldout
    assert len(train) == built.num_train_docs and len(heldout) == built.num_heldout_docs
    meta = json.loads(built.meta_path.read_text())
    assert meta["python_version"] == built.python_version
    assert meta["splits"]["heldout"]["num_docs"] == built.num_heldout_docs
    assert len(meta["splits"]["train"]["sha256"]) == 64


def test_deterministic(built: CorpusInfo, tmp_path: Path) -> None:
    again = build_stdlib_corpus(tmp_path)
    for name in ("train.jsonl", "heldout.jsonl", "corpus.json"):
        assert (tmp_path / name).read_bytes() == (built.train_path.parent / name).read_bytes(), name
    assert again.num_chars == built.num_chars
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_fake_stdlib_is_parsed_not_imported(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "tests").mkdir()
    doc = "A docstring that is long enough to be kept in the corpus."
    # Importing this would raise; parsing it must not.
    (lib / "boom.py").write_text(f'"""{doc}"""\nraise SystemExit("imported!")\n'
                                 f'class Box:\n    """{doc}"""\n    def __init__(self, size, /, *, lid=True):\n'
                                 f'        """{doc}"""\n    def _private(self):\n        """{doc}"""\n')
    (lib / "pkg" / "__init__.py").write_text(f'"""Short."""\ndef run(x: int = 1) -> int:\n    """{doc}\n\nMore."""\n')
    (lib / "tests" / "t.py").write_text(f'"""{doc}"""\n')
    (lib / "_private.py").write_text(f'"""{doc}"""\n')
    (lib / "broken.py").write_text("def (:\n")
    info = build_stdlib_corpus(tmp_path / "out", stdlib=lib, heldout_fraction=0.0)
    docs = {d["qualname"]: d for d in load(info.train_path)}
    assert sorted(docs) == ["boom", "boom.Box", "boom.Box.__init__", "pkg.run"]
    assert docs["boom.Box"]["signature"] == "boom.Box(size, /, *, lid=True)"
    assert docs["pkg.run"]["text"].startswith("pkg.run(x: int=1) -> int\n\n")
    assert docs["pkg.run"]["summary"] == doc
    assert json.loads(info.meta_path.read_text())["num_files_unparsed"] == 1
    assert info.num_heldout_docs == 0


def test_summary_and_fraction_checks(tmp_path: Path) -> None:
    assert summary_of("Title\n*****\n\nFirst  para\ncontinues.\n\nSecond.") == "First para continues."
    assert summary_of("One line.") == "One line."
    with pytest.raises(ConfigError, match="heldout_fraction"):
        build_stdlib_corpus(tmp_path, heldout_fraction=1.0)
