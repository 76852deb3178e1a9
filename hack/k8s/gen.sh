#!/usr/bin/env bash
# Regenerates go.mod/go.sum of the module that builds the Kubernetes control plane:
# requires k8s.io/kubernetes at $K and replaces every staging module it pins at v0.0.0 with v0.<minor>.<patch>.
set -euo pipefail
cd "$(dirname "$0")"
K=${K:-v1.37.2}
S=v0.${K#v1.}
rm -f go.mod go.sum
go mod init turnout.dev/hack/k8s > /dev/null 2>&1
MOD=$(go mod download -json "k8s.io/kubernetes@$K" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
for m in $(sed -nE 's#^[[:space:]]*(k8s\.io/[A-Za-z0-9._-]+) v0\.0\.0( //.*)?$#\1#p' "$MOD" | sort -u); do
  go mod edit -replace="$m=$m@$S"
done
go get "k8s.io/kubernetes@$K"
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K" "k8s.io/kubernetes/cmd/kube-controller-manager@$K" "k8s.io/kubernetes/cmd/kubectl@$K"
# etcd at the version k8s.io/kubernetes itself pins (its server module's root package is the etcd main).
ETCD=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
go get -tool "go.etcd.io/etcd/server/v3@$ETCD"
# Never `go get -u`: the newest kube-openapi and structured-merge-diff need a newer Go.
go mod tidy
