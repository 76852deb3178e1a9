#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl from the module in this folder into
# target/k8s/bin (never committed). Skipped when the binaries were built from this same go.mod, go.sum
# and build script. Prints what it does and how long it took.
#
#   hack/k8s/build.sh            build if needed
#   hack/k8s/build.sh --print    print the bin directory (building first if needed)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${TURNOUT_K8S_BIN:-$root/target/k8s/bin}
K=$(sed -nE 's#^[[:space:]]*k8s\.io/kubernetes (v[0-9.]+).*#\1#p' "$here/go.mod" | head -1)
minor=${K#v1.}; minor=${minor%%.*}
stamp=$( (cat "$here/go.mod" "$here/go.sum" "$here/build.sh"; go version) | sha256sum | cut -c1-16)
say() { [ "${1:-}" = "" ] || printf '%s\n' "$*" >&2; }

mkdir -p "$out"
# One build at a time (a test run and the demo may both ask).
exec 9> "$out/.lock"
flock 9
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ] \
  && [ -x "$out/etcd" ] && [ -x "$out/kube-apiserver" ] && [ -x "$out/kube-controller-manager" ] && [ -x "$out/kubectl" ]; then
  [ "${1:-}" = "--print" ] && echo "$out"
  exit 0
fi

say "building the Kubernetes $K control plane from Go modules into $out (first build: 10-25 minutes on 2 cores)"
cd "$here"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K -X k8s.io/component-base/version.gitMajor=1 \
-X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean \
-X k8s.io/client-go/pkg/version.gitVersion=$K -X k8s.io/client-go/pkg/version.gitMajor=1 \
-X k8s.io/client-go/pkg/version.gitMinor=$minor"
start=$(date +%s)
say "  go mod download"
go mod download
for cmd in kube-apiserver kube-controller-manager kubectl; do
  t=$(date +%s)
  say "  go build $cmd"
  go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldflags" -o "$out/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
  mv "$out/$cmd.tmp" "$out/$cmd"
  say "    $cmd built in $(( $(date +%s) - t ))s"
done
t=$(date +%s)
say "  go build etcd"
go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3
mv "$out/etcd.tmp" "$out/etcd"
say "    etcd built in $(( $(date +%s) - t ))s"
echo "$stamp" > "$out/.stamp"
say "control plane built in $(( $(date +%s) - start ))s"
[ "${1:-}" = "--print" ] && echo "$out"
exit 0
