"""Compile protos/ into the committed stubs: Python (typed) under dynamo_grpc/v1/, and with --clients the
TypeScript and Go clients' under clients/ too.

Stubs are committed so that `pip install`, `npm ci` and `go build` need no compiler; `--check` fails when
they are stale. Python needs only grpcio-tools. --clients runs `buf generate` (buf.gen.yaml: local
plugins, Python's byte for byte the same as here) and needs what `scripts/setup.sh` installs.
C++ stubs are not committed: they must match the installed libprotobuf, so clients/cpp's build makes them.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("dynamo_grpc") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
CLIENT_STUB_DIRS = (Path("clients/typescript/src/gen"), Path("clients/go/gen"))
"""Written whole by buf.gen.yaml's TypeScript and Go plugins."""
BUF_GENERATE_TOOLS = {  # what buf.gen.yaml runs, and how to get it
    "buf": "pip install -e '.[dev]'",
    str(ROOT / "clients/typescript/node_modules/.bin/protoc-gen-es"): "npm ci --prefix clients/typescript",
    "protoc-gen-go": "apt-get install protoc-gen-go",
    "protoc-gen-go-grpc": "apt-get install protoc-gen-go-grpc",
    "protoc": "apt-get install protobuf-compiler",
    "grpc_cpp_plugin": "apt-get install protobuf-compiler-grpc",
}


def compile_into(out_dir: Path) -> None:
    """Run protoc on every .proto for Python."""
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


def buf_generate_into(out_dir: Path) -> None:
    """Run `buf generate` with buf.gen.yaml, writing under out_dir instead of the tree."""
    missing = [f"{Path(tool).name} ({fix})" for tool, fix in BUF_GENERATE_TOOLS.items() if not shutil.which(tool)]
    if missing:
        raise SystemExit("--clients needs these (bash scripts/setup.sh installs them all): "
                         + ", ".join(missing))
    command = ["buf", "generate", "--template", "buf.gen.yaml", "-o", str(out_dir)]
    subprocess.run(command, cwd=ROOT, check=True)


def stubs_under(root: Path, clients: bool) -> list[Path]:
    """The generated files under root (the tree or a fresh output), relative to it."""
    found = [p for p in (root / PACKAGE_DIR).glob("*") if p.name.endswith(GENERATED_SUFFIXES)]
    if clients:
        found += [p for d in CLIENT_STUB_DIRS for p in (root / d).rglob("*") if p.is_file()]
    return sorted(p.relative_to(root) for p in found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="fail if the committed stubs differ from protos/")
    parser.add_argument("--clients", action="store_true",
                        help="the TypeScript and Go clients' stubs too, all through `buf generate`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.clients:
            buf_generate_into(out)
        else:
            compile_into(out)
        fresh = stubs_under(out, args.clients)
        committed = stubs_under(ROOT, args.clients)
        if args.check:
            stale = [str(p) for p in fresh
                     if not (ROOT / p).exists() or not filecmp.cmp(out / p, ROOT / p, shallow=False)]
            extra = [str(p) for p in committed if p not in fresh]
            if stale or extra:
                command = "python scripts/gen_protos.py" + (" --clients" if args.clients else "")
                print(f"stale generated stubs (run: {command}):", *stale, *extra, sep="\n  ")
                return 1
            print(f"{len(fresh)} generated stubs are up to date")
            return 0
        for path in committed:
            (ROOT / path).unlink()
        for path in fresh:
            (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / path, ROOT / path)
        print(f"wrote {len(fresh)} stubs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
