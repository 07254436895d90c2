#!/usr/bin/env bash
# Builds the TypeScript, Go and C++ clients from proto/ (each generates its own
# stubs), installing what is missing first: Debian packages for Go and C++ (the Go
# build is offline, from Debian's Go sources), npm ci for TypeScript.
# Idempotent: a second run only checks and returns in seconds. Any failure stops
# the script with the step that failed.
#
#   clients/build_all.sh            install if missing, then build all three
#   clients/build_all.sh ts go cpp  build only the named clients
#
# Outputs: clients/typescript/dist/example.js (and video-example.js), clients/go/build/bin/masquerade-anonymize
# (and masquerade-video), clients/cpp/build/masquerade-anonymize (and masquerade-video).
set -euo pipefail
clients="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$clients/.." && pwd)"
step="start"
trap 'echo "build_all.sh: FAILED during: $step" >&2' ERR
log() { echo "[build_all] $*" >&2; }

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(ts go cpp)
wants() { [[ " ${targets[*]} " == *" $1 "* ]]; }

# Debian packages per client. The Go list pins the APIv2 protobuf stack
# (golang-github-golang-protobuf-1-5-dev, protoc-gen-go 1.28): golang-goprotobuf-dev
# would bring protoc-gen-go 1.3, which cannot generate proto3 `optional` fields.
common_pkgs=(protobuf-compiler)
go_pkgs=(golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
  golang-google-genproto-dev protoc-gen-go protoc-gen-go-grpc)
cpp_pkgs=(cmake make g++ pkg-config libprotobuf-dev protobuf-compiler-grpc libgrpc++-dev)
ts_pkgs=()
command -v npm >/dev/null || ts_pkgs=(nodejs npm)

install_missing() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  log "installing Debian packages: ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Newest modification time (epoch seconds) among the given files and directories' files.
newest() { find "$@" -type f -printf '%T@\n' 2>/dev/null | sort -n | tail -1 | cut -d. -f1; }
oldest_output_is_fresh() { # output, then inputs
  local output="$1"; shift
  [[ -e "$output" ]] && [[ $(stat -c %Y "$output") -ge $(newest "$@") ]]
}

step="installing toolchains"
pkgs=("${common_pkgs[@]}")
wants go && pkgs+=("${go_pkgs[@]}")
wants cpp && pkgs+=("${cpp_pkgs[@]}")
wants ts && pkgs+=("${ts_pkgs[@]}")
install_missing "${pkgs[@]}"

if wants ts; then
  step="TypeScript: npm ci"
  cd "$clients/typescript"
  if ! oldest_output_is_fresh node_modules/.package-lock.json package-lock.json package.json; then
    log "TypeScript: npm ci"
    npm ci --no-audit --no-fund --loglevel=error
  fi
  step="TypeScript: npm run build"
  if ! oldest_output_is_fresh dist/example.js ./*.ts tsconfig.json buf.gen.yaml package-lock.json "$repo/proto"; then
    log "TypeScript: generate + compile"
    npm run --silent build
    touch dist/example.js
  fi
  log "TypeScript: clients/typescript/dist/example.js"
fi

if wants go; then
  step="Go: clients/go/build.sh"
  "$clients/go/build.sh" >/dev/null
  log "Go: clients/go/build/bin/masquerade-anonymize"
fi

if wants cpp; then
  step="C++: cmake configure"
  if [[ ! -f "$clients/cpp/build/CMakeCache.txt" ]]; then
    log "C++: cmake configure"
    cmake -S "$clients/cpp" -B "$clients/cpp/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  fi
  step="C++: cmake build"
  cmake --build "$clients/cpp/build" -j"$(nproc)" >/dev/null
  log "C++: clients/cpp/build/masquerade-anonymize"
fi
step="done"
log "all built: ${targets[*]}"
