"""The committed generated code is exactly what `make protos` writes from protos/ (no hand edits, no stale .proto)."""

from __future__ import annotations

import pytest

from serve.api import protogen


def test_regenerating_yields_the_committed_files(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) generates the code")
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in protogen.generate(tmp_path / "_gen")}
    fresh = {path.relative_to("_gen"): data for path, data in fresh.items()}
    committed = {p.relative_to(protogen.GEN_DIR): p.read_bytes() for p in protogen.GEN_DIR.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(map(str, fresh)) == sorted(map(str, committed)), "run `make protos` and commit serve/api/_gen"
    stale = [str(path) for path, data in fresh.items() if committed[path] != data]
    assert not stale, f"serve/api/_gen is stale for {stale}: run `make protos` and commit the result"


def test_every_proto_is_in_the_versioned_package():
    for path in protogen.proto_files():
        text = path.read_text()
        assert "package lmforge.v1;" in text and 'syntax = "proto3";' in text, path.name
