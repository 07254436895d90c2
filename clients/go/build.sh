#!/usr/bin/env bash
# Generates the Go stubs from proto/ into gen/ and builds build/bin/masquerade-anonymize,
# offline, from Debian's Go packages (golang-go, golang-google-grpc-dev,
# golang-google-protobuf-dev, protoc-gen-go, protoc-gen-go-grpc): GOPATH mode over
# /usr/share/gocode, with this directory linked in as import path "masquerade/clients/go"
# (proto's go_package is masquerade/clients/go/gen/masquerade/v1).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
proto="$repo/proto/masquerade/v1/anonymizer.proto"

mkdir -p "$here/gen" "$here/build/bin" "$here/build/gopath/src"
if [[ ! "$here/gen/masquerade/v1/anonymizer.pb.go" -nt "$proto" || ! "$here/gen/masquerade/v1/anonymizer_grpc.pb.go" -nt "$proto" ]]; then
  protoc -I "$repo/proto" \
    --go_out="$here" --go_opt=module=masquerade/clients/go \
    --go-grpc_out="$here" --go-grpc_opt=module=masquerade/clients/go \
    "$proto"
fi
# Link the Go packages one by one: a link to the repository itself would make a
# directory cycle (build/ lives inside it) for tools that follow links.
gosrc="$here/build/gopath/src/masquerade/clients/go"
mkdir -p "$gosrc"
for pkg in gen masquerade retryenv cmdline cmd; do ln -sfn "$here/$pkg" "$gosrc/$pkg"; done

export GO111MODULE=off GOFLAGS= GOPATH="$here/build/gopath:/usr/share/gocode"
export GOCACHE="${GOCACHE:-$here/build/gocache}"
cd "$gosrc"
go vet ./masquerade ./retryenv ./cmdline ./cmd/...
go build -o "$here/build/bin/masquerade-anonymize" ./cmd/masquerade-anonymize
go build -o "$here/build/bin/masquerade-video" ./cmd/masquerade-video
echo "built $here/build/bin/masquerade-anonymize and masquerade-video"
