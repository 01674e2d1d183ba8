#!/usr/bin/env bash
# Build loco-kube (etcd, kube-apiserver, kube-controller-manager, kube-scheduler in one binary) and helm
# (helm/, a module of its own) into a cache outside the clone, keyed by the hash of both modules'
# sources: a second build is a file test. Prints the directory that holds the two binaries;
# loco_local.controlplane.kube_bin_dir() computes the same path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(cd "$here" && cat go.mod go.sum main.go helm/go.mod helm/go.sum helm/main.go build.sh | sha256sum | cut -c1-16)
cache=${LOCO_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loco/kube}
out=$cache/$key
if [ -x "$out/loco-kube" ] && [ -x "$out/helm" ]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { echo "make kube: 'go' is not on PATH (Go 1.26 builds the control plane)" >&2; exit 1; }
# a fresh machine has no module cache yet: create it so df measures the disk it will fill
modcache=$(go env GOMODCACHE)
mkdir -p "$modcache"
free_kb=$(df -Pk "$modcache" | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt $((6 * 1024 * 1024)) ]; then
  echo "make kube: $((free_kb / 1024)) MiB free for the Go module and build caches; the cold build needs about 6 GiB" >&2
  exit 1
fi
mkdir -p "$out"
start=$(date +%s)
echo "building the Kubernetes control plane and helm (cold: about 10 minutes on 2 cores) ..." >&2
# the version the components report (kubectl version, Helm's kubeVersion check), as Kubernetes' own build sets it
kube_version=$(cd "$here" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
major=${kube_version#v}; minor=${major#*.}; major=${major%%.*}; minor=${minor%%.*}
version_flags=""
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  version_flags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
(cd "$here" && go build -mod=readonly -trimpath -ldflags="-s -w$version_flags" -o "$out/loco-kube.tmp" .)
helm_version=$(cd "$here/helm" && go list -m -f '{{.Version}}' helm.sh/helm/v4)
(cd "$here/helm" && go build -mod=readonly -trimpath \
  -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version" -o "$out/helm.tmp" .)
mv "$out/loco-kube.tmp" "$out/loco-kube"
mv "$out/helm.tmp" "$out/helm"
echo "built $out/loco-kube and $out/helm in $(( $(date +%s) - start )) s" >&2
echo "$out"
