#!/usr/bin/env bash
# Regenerates tests/fixtures/kubectl/*.json: Deployment objects as the real kubectl produces them for
# each kind of update, and the stored objects turnout's webhook leaves behind, chained from the podinfo
# sample. The admission tests wrap them into AdmissionReviews and assert the exact patched objects.
#
# Usage: hack/gen-admission-fixtures.sh        (needs go, python3 and cargo; no cluster; the kubectl is the
#                                               pinned one hack/k8s/build.sh builds)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/tests/fixtures/kubectl"
sample="${PODINFO_SAMPLE:-$root/../shared/fixtures/podinfo/deployment.yaml}"
export KUBECONFIG=/dev/null # --local never talks to a cluster; make sure of it

[ -f "$sample" ] || { echo "podinfo sample not found at $sample (set PODINFO_SAMPLE)" >&2; exit 1; }
"$root/hack/k8s/build.sh"
export PATH="${TURNOUT_K8S_BIN:-${CARGO_TARGET_DIR:-$root/target}/k8s/bin}:$PATH"
cargo build --quiet --manifest-path "$root/Cargo.toml" --bin turnout
turnout="$root/target/debug/turnout"
mkdir -p "$out"
k() { kubectl "$@" --local -o json; }

# Wraps OLD (file or "none") and NEW into an AdmissionReview, runs `turnout mutate`, applies the patch
# with `kubectl patch --local --type json` and prints the object the apiserver would store.
admit() {
  local op=$1 old=$2 new=$3
  local patch
  patch=$(python3 - "$op" "$old" "$new" <<'PY' | "$turnout" mutate | python3 -c '
import base64, json, sys
r = json.load(sys.stdin)["response"]
print(base64.b64decode(r["patch"]).decode() if r.get("patch") else "[]")'
import json, sys
op, old, new = sys.argv[1:]
obj = json.load(open(new))
req = {"uid": "fixture", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
       "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
       "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"], "operation": op,
       "userInfo": {"username": "alice"}, "object": obj, "dryRun": False}
if old != "none":
    req["oldObject"] = json.load(open(old))
print(json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}))
PY
)
  kubectl patch --local --type json -p "$patch" -f "$new" -o json
}

# The user's manifest, in namespace test (what `kubectl apply` sends, without last-applied noise).
# `set image` is a typed round trip, so quantities come out canonical ("2000m" -> "2"), as the apiserver
# stores and sends them; it prints nothing when nothing changes, hence there and back again.
k patch -f "$sample" --type merge -p '{"metadata":{"namespace":"test"}}' \
  | k set image -f - podinfod=canonical \
  | k set image -f - podinfod=ghcr.io/stefanprodan/podinfo:6.0.0 > "$out/podinfo.json"
# Stored after CREATE through turnout.
admit CREATE none "$out/podinfo.json" > "$out/stored-v1.json"

# User actions on the stored object at rest.
k set image -f "$out/stored-v1.json" podinfod=ghcr.io/stefanprodan/podinfo:6.1.0 > "$out/set-image-v2.json"
# `kubectl scale` goes through the scale subresource, which the webhook is not registered for; the same
# change as a Deployment UPDATE (kubectl edit, apply of a new replica count):
k patch -f "$out/stored-v1.json" --type merge -p '{"spec":{"replicas":5}}' > "$out/scale.json"
k annotate -f "$out/stored-v1.json" team=payments > "$out/annotate.json"
# What `kubectl rollout restart` sends (it has no --local mode).
k patch -f "$out/stored-v1.json" --type merge \
  -p '{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":"2026-11-21T10:00:00Z"}}}}}' \
  > "$out/restart.json"
# A `kubectl replace` / GitOps sync of the manifest with a new image: no turnout stamps at all.
k set image -f "$out/podinfo.json" podinfod=ghcr.io/stefanprodan/podinfo:6.1.0 > "$out/replace-v2.json"

# Stored while release v2 is in flight.
admit UPDATE "$out/stored-v1.json" "$out/set-image-v2.json" > "$out/held-v2.json"

# User actions during the release.
k set image -f "$out/held-v2.json" podinfod=ghcr.io/stefanprodan/podinfo:6.0.0 > "$out/revert-v1.json"
k set image -f "$out/held-v2.json" podinfod=ghcr.io/stefanprodan/podinfo:6.2.0 > "$out/set-image-v3.json"
# What `kubectl rollout resume` sends.
k patch -f "$out/held-v2.json" --type merge -p '{"spec":{"paused":false}}' > "$out/resume.json"

# A Pod, for the "other kinds" row.
k label app=podinfo -f - > "$out/pod.json" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: podinfo, namespace: test}
spec:
  containers: [{name: podinfod, image: ghcr.io/stefanprodan/podinfo:6.0.0}]
YAML

kubectl version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])' \
  > "$out/KUBECTL_VERSION"
echo "wrote $(ls "$out" | wc -l) files to ${out#"$root"/} with kubectl $(cat "$out/KUBECTL_VERSION")"
