#!/usr/bin/env bash
# Build loco-kube (etcd, kube-apiserver, kube-controller-manager, kube-scheduler in one binary) into a
# cache outside the clone, keyed by the hash of this module's sources: a second build is a file test.
# Prints the binary's path. loco_local.controlplane.kube_binary() computes the same path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(cd "$here" && cat go.mod go.sum main.go | sha256sum | cut -c1-16)
cache=${LOCO_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loco/kube}
out=$cache/$key/loco-kube
if [ -x "$out" ]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { echo "make kube: 'go' is not on PATH (Go 1.26 builds the control plane)" >&2; exit 1; }
free_kb=$(df -Pk "$(go env GOMODCACHE | xargs dirname)" | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt $((6 * 1024 * 1024)) ]; then
  echo "make kube: $((free_kb / 1024)) MiB free for the Go module and build caches; the cold build needs about 6 GiB" >&2
  exit 1
fi
mkdir -p "$cache/$key"
start=$(date +%s)
echo "building the Kubernetes control plane (cold: several minutes on 2 cores) ..." >&2
(cd "$here" && go build -mod=readonly -trimpath -ldflags='-s -w' -o "$out.tmp" .)
mv "$out.tmp" "$out"
echo "built $out in $(( $(date +%s) - start )) s" >&2
echo "$out"
