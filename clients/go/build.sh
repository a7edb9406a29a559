#!/usr/bin/env bash
# Build clients/go/build/dynamo-generate offline against Debian's Go sources (golang-google-grpc-dev and
# friends under /usr/share/gocode): GOPATH mode, since no module proxy is needed or reached that way.
set -euo pipefail
cd "$(dirname "$0")"
gopath="$PWD/build/gopath"
mkdir -p "$gopath/src/dynamo-grpc/clients"
ln -sfn "$PWD" "$gopath/src/dynamo-grpc/clients/go"
GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOFLAGS= \
  go build -o build/dynamo-generate dynamo-grpc/clients/go/cmd/dynamo-generate
