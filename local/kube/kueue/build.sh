#!/usr/bin/env bash
# Build the Kueue manager (sigs.k8s.io/kueue, a released module: no go.mod of ours) into a cache outside the
# clone, next to the control plane's, and copy its CRDs beside it so the tests need no Go at run time.
# A second run is a file test. Prints the directory (kueue, crds/*.yaml); loco_local.kueue computes the same path.
set -euo pipefail
version=v0.17.0
cache=${LOCO_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loco/kube}
out=$cache/kueue-$version
if [ -x "$out/kueue" ] && [ -s "$out/crds/kueue.x-k8s.io_workloads.yaml" ]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { echo "make kube: 'go' is not on PATH (Go 1.26 builds Kueue)" >&2; exit 1; }
# a fresh machine has no module cache yet: create it so df measures the disk it will fill
modcache=$(go env GOMODCACHE)
mkdir -p "$modcache"
free_kb=$(df -Pk "$modcache" | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt $((4 * 1024 * 1024)) ]; then
  echo "make kube: $((free_kb / 1024)) MiB free for the Go module and build caches; Kueue's cold build needs about 4 GiB" >&2
  exit 1
fi
start=$(date +%s)
echo "building Kueue $version (cold: about 5 minutes on 2 cores) ..." >&2
rm -rf "$out/bin.tmp" && mkdir -p "$out/bin.tmp"
GOBIN=$out/bin.tmp go install -trimpath \
  -ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$version" "sigs.k8s.io/kueue/cmd/kueue@$version"
# the CRDs as Kueue's release installs them (config/components/crd; loco_local.kueue adds the conversion webhook)
rm -rf "$out/crds" && mkdir -p "$out/crds"
install -m 0644 "$modcache/sigs.k8s.io/kueue@$version"/config/components/crd/bases/*.yaml "$out/crds/"
mv "$out/bin.tmp/kueue" "$out/kueue"
rmdir "$out/bin.tmp"
echo "built $out/kueue in $(( $(date +%s) - start )) s" >&2
echo "$out"
