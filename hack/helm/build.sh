#!/usr/bin/env bash
# Builds helm from the module in this folder (helm.sh/helm/v4, fetched through the Go module proxy) into
# target/helm/bin (never committed; $TURNOUT_HELM_BIN, or $CARGO_TARGET_DIR/helm/bin, when set), for the
# chart in deploy/helm/turnout and its tests (tests/helm.rs).
# Skipped when the binary was built from this same go.mod, go.sum and build script. Prints what it does
# and how long it took.
#
#   hack/helm/build.sh            build if needed
#   hack/helm/build.sh --print    print the bin directory (building first if needed)
#
# To move to another helm release: cd hack/helm && go get -tool helm.sh/helm/v4/cmd/helm@vX.Y.Z && go mod tidy
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${TURNOUT_HELM_BIN:-${CARGO_TARGET_DIR:-$root/target}/helm/bin}
H=$(sed -nE 's#^[[:space:]]*helm\.sh/helm/v4 (v[0-9.]+).*#\1#p' "$here/go.mod" | head -1)
[ -n "$H" ] || { echo "no helm.sh/helm/v4 version in $here/go.mod" >&2; exit 1; }
stamp=$( (cat "$here/go.mod" "$here/go.sum" "$here/build.sh"; go version) | sha256sum | cut -c1-16)
say() { [ "${1:-}" = "" ] || printf '%s\n' "$*" >&2; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
# One build at a time (a test run and CI may both ask).
exec 9> "$out/.lock"
flock 9
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ] && [ -x "$out/helm" ]; then
  [ "${1:-}" = "--print" ] && echo "$out"
  exit 0
fi

say "building helm $H from Go modules into $out (first build: a few minutes on 2 cores)"
cd "$here"
export CGO_ENABLED=0 GOFLAGS=-mod=readonly
# What helm's own release build sets, so that `helm version` reports $H rather than a bare minor.
ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$H -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
start=$(date +%s)
say "  go mod download"
go mod download
say "  go build helm"
go build -trimpath -ldflags "$ldflags" -o "$out/helm.tmp" helm.sh/helm/v4/cmd/helm
mv "$out/helm.tmp" "$out/helm"
echo "$stamp" > "$out/.stamp"
say "helm $H built in $(( $(date +%s) - start ))s"
[ "${1:-}" = "--print" ] && echo "$out"
exit 0
