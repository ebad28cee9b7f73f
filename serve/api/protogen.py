"""Generate serve/api/_gen/ from protos/lmforge/v1/*.proto: `make protos` (or `python -m serve.api.protogen`).

The generated modules are committed, so serving needs no protoc: only grpcio and protobuf at runtime.
grpcio-tools is pinned exactly in the `dev` extra because the generated text depends on its version, and
tests/serve/api/test_protogen.py regenerates into a temporary directory and compares byte for byte, so a
.proto edited without `make protos` fails the tests.

protoc writes imports by proto path (`from lmforge.v1 import common_pb2`); they are rewritten to the
package path (`from serve.api._gen.lmforge.v1 import common_pb2`), so nothing is added to sys.path.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
GEN_DIR = Path(__file__).resolve().parent / "_gen"
GEN_PACKAGE = "serve.api._gen"
_IMPORT = re.compile(r"^(\s*)from lmforge\.v1 import ", re.MULTILINE)
_HEADER = '"""Generated from protos/lmforge/v1 by `make protos`; never edit by hand."""\n'


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((proto_root / "lmforge" / "v1").glob("*.proto"))


def generate(out_dir: Path = GEN_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """(Re)write `out_dir` with the Python modules of every .proto; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / 'lmforge' / 'v1'}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                *(str(p.relative_to(proto_root)) for p in protos)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[p.name for p in protos]} (see its message above)")
        shutil.rmtree(out_dir, ignore_errors=True)
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            dst = out_dir / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_IMPORT.sub(rf"\1from {GEN_PACKAGE}.lmforge.v1 import ", src.read_text()))
            written.append(dst)
    for package_dir in (out_dir, out_dir / "lmforge", out_dir / "lmforge" / "v1"):
        init = package_dir / "__init__.py"
        init.write_text(_HEADER)
        written.append(init)
    return sorted(written)


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(REPO_ROOT))
    sys.exit(0)
