"""Compile protos/ into typed Python stubs under dynamo_grpc/v1/.

The stubs are committed so that `pip install` needs no compiler; `--check` fails when they are stale.
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
PACKAGE_DIR = Path("dynamo_grpc") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def compile_into(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto; return the generated files relative to out_dir."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in (out_dir / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def committed_files() -> list[Path]:
    return sorted(
        p.relative_to(ROOT) for p in (ROOT / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs differ from protos/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_into(Path(tmp))
        if args.check:
            stale = [str(p) for p in fresh if not (ROOT / p).exists() or not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)]
            extra = [str(p) for p in committed_files() if p not in fresh]
            if stale or extra:
                print("stale generated stubs (run: python scripts/gen_protos.py):", *stale, *extra, sep="\n  ")
                return 1
            print(f"{len(fresh)} generated stubs are up to date")
            return 0
        for path in committed_files():
            (ROOT / path).unlink()
        for path in fresh:
            shutil.copyfile(Path(tmp) / path, ROOT / path)
        print(f"wrote {len(fresh)} stubs to {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
