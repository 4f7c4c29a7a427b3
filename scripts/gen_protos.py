"""Regenerate the Python stubs in orders/v1/ from protos/orders/v1/*.proto.

Run `python scripts/gen_protos.py` after editing a .proto file, and commit the
result. `--check` regenerates into a temporary directory and fails when the
committed stubs differ (CI runs it), so stubs never drift from the protos.
The generator versions are pinned in pyproject.toml's `dev` extra.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("orders") / "v1"


def generate(out_dir: Path) -> None:
    """Writes *_pb2.py, *_pb2_grpc.py and their .pyi stubs under out_dir/orders/v1."""
    (out_dir / PACKAGE).mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    (out_dir / PACKAGE / "__init__.py").write_text('"""Generated gRPC stubs for orders.v1. Do not edit."""\n')


def stub_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in {".py", ".pyi"})


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh, committed = Path(tmp) / PACKAGE, ROOT / PACKAGE
        names = stub_files(fresh)
        _, mismatch, missing = filecmp.cmpfiles(fresh, committed, names, shallow=False)
        extra = set(stub_files(committed)) - set(names)
        if mismatch or missing or extra:
            print(f"stubs out of date: {sorted(mismatch + missing + list(extra))}; run scripts/gen_protos.py")
            return 1
    print("stubs match protos")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are out of date")
    if parser.parse_args().check:
        return check()
    target = ROOT / PACKAGE
    for name in stub_files(target) if target.exists() else []:
        (target / name).unlink()
    generate(ROOT)
    shutil.rmtree(ROOT / PACKAGE / "__pycache__", ignore_errors=True)
    print(f"generated stubs in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
