"""The embedded default corpus: the documentation of the running interpreter's standard library.

The demo must run with no user data and no network, and every Python install carries a few
megabytes of carefully written English about a topic a small model can learn: its own stdlib.
Each document is self-describing ("os.path.join(a, *p)\n\nJoin two or more pathname ...") and
keeps `qualname`, `kind`, `signature` and `summary` as fields, so later stages can build
instruction data ("what does os.path.join do?") from the same files.

Sources are read with `ast`, never imported: importing the stdlib has side effects (`antigravity`
opens a browser, `this` prints the Zen, `tkinter` wants a display). The language reference text
comes from `pydoc_data/topics.py`, also parsed, not imported.

The split is a stable hash of the qualname, not a random draw, so one interpreter always gives
the same train/heldout files, and a name is never in both.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sysconfig
import tokenize
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from lifecycle.data.manifest import atomic_write_text, sha256_file
from lifecycle.errors import ConfigError

Kind = Literal["module", "class", "function", "topic"]
# Directories that are tests, tools or vendored packages rather than documented library code.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                       "ensurepip", "__pycache__", "pydoc_data", "__phello__"})
MIN_DOCSTRING_CHARS = 40
# Modules documented under a file name users never write: os.path is posixpath (or ntpath), and
# these private files are the pure-Python source of public modules' documentation.
MODULE_ALIASES = {os.path.__name__: "os.path", "_collections_abc": "collections.abc", "_pydecimal": "decimal",
                  "_pyio": "io", "_pydatetime": "datetime", "_py_abc": "abc"}


@dataclass(frozen=True)
class StdlibDoc:
    """One corpus record; field names are the JSONL keys."""

    text: str
    qualname: str
    kind: Kind
    signature: str
    summary: str


@dataclass(frozen=True)
class CorpusInfo:
    """Where `build_stdlib_corpus` wrote the splits and how big they are."""

    train_path: Path
    heldout_path: Path
    meta_path: Path  # corpus.json: counts, chars, python version, sha256 of each split
    num_train_docs: int
    num_heldout_docs: int
    num_chars: int
    python_version: str

    @property
    def num_docs(self) -> int:
        return self.num_train_docs + self.num_heldout_docs


def summary_of(doc: str) -> str:
    """First paragraph of a cleaned docstring, on one line; a leading reST heading (topics) is skipped."""
    paragraphs = [p for p in doc.strip().split("\n\n") if p.strip()]
    lines = paragraphs[0].splitlines() if paragraphs else []
    if len(paragraphs) > 1 and len(lines) == 2 and set(lines[1].strip()) <= set("*=-~^#"):
        paragraphs.pop(0)
    return " ".join(paragraphs[0].split()) if paragraphs else ""


def is_private(name: str) -> bool:
    """`_helper` is private; `__init__` (dunder) is public API."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(stdlib: Path, path: Path) -> str | None:
    """The dotted name users import, or None when the file is not public API."""
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    name = ".".join(parts)
    if name in MODULE_ALIASES:
        return MODULE_ALIASES[name]
    # Not importable (`config-3.11-x86_64-linux-gnu/python-config.py`) or private: not public API.
    return name if all(p.isidentifier() and not is_private(p) for p in parts) else None


def iter_source_files(stdlib: Path) -> Iterator[Path]:
    """Every documented .py file under `stdlib`, in sorted (deterministic) order."""
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(root) / name


def _signature(qualname: str, node: ast.FunctionDef | ast.AsyncFunctionDef, *, drop_first: bool = False) -> str:
    args = node.args
    if drop_first:  # a class is called without `self`: show its __init__ that way
        num_left = len(args.posonlyargs) + len(args.args) - 1
        args = ast.arguments(posonlyargs=args.posonlyargs[1:], args=args.args[0 if args.posonlyargs else 1:],
                             vararg=args.vararg, kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults,
                             kwarg=args.kwarg, defaults=args.defaults[-num_left:] if num_left > 0 else [])
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None and not drop_first else ""
    return f"{qualname}({ast.unparse(args)}){returns}"


def _doc(qualname: str, kind: Kind, signature: str, docstring: str | None) -> StdlibDoc | None:
    if docstring is None or len(docstring.strip()) < MIN_DOCSTRING_CHARS:
        return None
    docstring = docstring.strip()
    header = {"module": f"module {qualname}", "class": f"class {signature or qualname}",
              "function": signature, "topic": f"Python language reference: {qualname.removeprefix('topic:')}"}[kind]
    return StdlibDoc(text=f"{header}\n\n{docstring}", qualname=qualname, kind=kind, signature=signature,
                     summary=summary_of(docstring))


def _definitions(body: list[ast.stmt]) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    """Defs in a module or class body, including those under `if`/`try` (platform-specific APIs)."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield stmt
        elif isinstance(stmt, ast.If):
            yield from _definitions(stmt.body)
            yield from _definitions(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                yield from _definitions(block)


def docs_from_module(name: str, tree: ast.Module) -> Iterator[StdlibDoc]:
    """Module docstring, then classes (with their methods) and functions; nested functions are
    local helpers and are left out."""
    if doc := _doc(name, "module", "", ast.get_docstring(tree)):
        yield doc

    def walk(prefix: str, body: list[ast.stmt]) -> Iterator[StdlibDoc]:
        for node in _definitions(body):
            if is_private(node.name):
                continue
            qualname = f"{prefix}.{node.name}"
            if isinstance(node, ast.ClassDef):
                init = next((n for n in _definitions(node.body)
                             if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                signature = _signature(qualname, init, drop_first=True) if init else ""
                if doc := _doc(qualname, "class", signature, ast.get_docstring(node)):
                    yield doc
                yield from walk(qualname, node.body)
            elif doc := _doc(qualname, "function", _signature(qualname, node), ast.get_docstring(node)):
                yield doc

    yield from walk(name, tree.body)


def docs_from_topics(topics_py: Path) -> Iterator[StdlibDoc]:
    """The language reference sections pydoc shows for `help("assert")`: `topics = {...}` literal."""
    tree = ast.parse(topics_py.read_text(encoding="utf-8"), filename=str(topics_py))
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in stmt.targets):
            topics = ast.literal_eval(stmt.value)
            for key in sorted(topics):
                if doc := _doc(f"topic:{key}", "topic", "", topics[key]):
                    yield doc


def collect_docs(stdlib: Path) -> tuple[list[StdlibDoc], int]:
    """All documents (first occurrence of each qualname wins) and the number of unparsable files."""
    docs: dict[str, StdlibDoc] = {}
    num_unparsed = 0
    for path in iter_source_files(stdlib):
        if (name := module_name(stdlib, path)) is None:
            continue
        try:
            with tokenize.open(path) as fh:  # honours a `# -*- coding: ... -*-` cookie
                tree = ast.parse(fh.read(), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            num_unparsed += 1  # e.g. a file kept for a newer or older grammar
            continue
        for doc in docs_from_module(name, tree):
            docs.setdefault(doc.qualname, doc)
    if (topics_py := stdlib / "pydoc_data" / "topics.py").is_file():
        for doc in docs_from_topics(topics_py):
            docs.setdefault(doc.qualname, doc)
    return list(docs.values()), num_unparsed


def is_heldout(qualname: str, heldout_fraction: float, seed: int) -> bool:
    """Stable across runs and machines (unlike `hash()`, which is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{qualname}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def _jsonl(docs: list[StdlibDoc]) -> str:
    return "".join(json.dumps(asdict(doc), ensure_ascii=False) + "\n" for doc in docs)


def build_stdlib_corpus(out_dir: str | Path, *, heldout_fraction: float = 0.02, seed: int = 0,
                        stdlib: str | Path | None = None) -> CorpusInfo:
    """Write `train.jsonl`, `heldout.jsonl` and `corpus.json` into `out_dir` (each atomically).

    `stdlib` defaults to the running interpreter's; tests pass a small fake tree.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    stdlib = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs, num_unparsed = collect_docs(stdlib)
    splits: dict[str, list[StdlibDoc]] = {"train": [], "heldout": []}
    for doc in docs:
        splits["heldout" if is_heldout(doc.qualname, heldout_fraction, seed) else "train"].append(doc)
    split_meta: dict[str, dict[str, object]] = {}
    for split, split_docs in splits.items():
        path = out_dir / f"{split}.jsonl"
        atomic_write_text(path, _jsonl(split_docs))
        split_meta[split] = {"path": path.name, "num_docs": len(split_docs),
                             "num_chars": sum(len(d.text) for d in split_docs), "sha256": sha256_file(path)}
    meta = {
        "name": "python-stdlib-docs",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "num_files_unparsed": num_unparsed,
        "num_docs_by_kind": dict(sorted(Counter(doc.kind for doc in docs).items())),
        "splits": split_meta,
    }
    meta_path = out_dir / "corpus.json"
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return CorpusInfo(train_path=out_dir / "train.jsonl", heldout_path=out_dir / "heldout.jsonl",
                      meta_path=meta_path, num_train_docs=len(splits["train"]),
                      num_heldout_docs=len(splits["heldout"]), num_chars=sum(len(d.text) for d in docs),
                      python_version=platform.python_version())
