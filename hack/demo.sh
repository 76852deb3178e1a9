#!/usr/bin/env bash
# turnout's demo, on what exists today: the admission webhook on freshly generated certificates,
# answering the AdmissionReviews kube-apiserver would send for a typical day of Deployment updates
# (kubectl-produced objects from tests/fixtures/kubectl). Needs cargo, curl and python3; no cluster.
#
# Usage: hack/demo.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
fixtures="$root/tests/fixtures/kubectl"
work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

say "building turnout"
cargo build --quiet --manifest-path "$root/Cargo.toml" --bin turnout
turnout="$root/target/debug/turnout"

say "turnout certs: a CA and a serving certificate for 127.0.0.1"
"$turnout" certs --dir "$work/certs" --host localhost --host 127.0.0.1

port=$(free_port)
admin=$(free_port)
say "turnout webhook on https://127.0.0.1:$port (admin http://127.0.0.1:$admin)"
"$turnout" webhook --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
  --tls-cert "$work/certs/tls.crt" --tls-key "$work/certs/tls.key" \
  --agent-username system:serviceaccount:turnout-system:turnout --drain-delay 0s 2> "$work/webhook.log" &
pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$admin/ready" > /dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/webhook.log"; exit 1; }
  sleep 0.1
done
curl -sf "http://127.0.0.1:$admin/ready"

# review OPERATION OLD NEW [USER]: what kube-apiserver sends for `kubectl ...` on a Deployment.
review() {
  python3 - "$@" <<'PY'
import json, sys
op, old, new = sys.argv[1:4]
user = sys.argv[4] if len(sys.argv) > 4 else "alice"
load = lambda n: None if n == "none" else json.load(open(n))
print(json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
    "uid": "demo", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
    "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
    "name": "podinfo", "namespace": "test", "operation": op, "userInfo": {"username": user},
    "object": load(new), "oldObject": load(old), "dryRun": False}}))
PY
}

# show TITLE OP OLD NEW [USER]: posts the review over TLS (verifying the CA) and prints the answer.
show() {
  local title=$1
  shift
  say "$title"
  local old=none
  [ "$2" = none ] || old="$fixtures/$2.json"
  review "$1" "$old" "$fixtures/$3.json" "${4:-alice}" \
    | curl -sS --fail-with-body --cacert "$work/certs/ca.crt" -H 'Content-Type: application/json' \
        --data-binary @- "https://127.0.0.1:$port/mutate" \
    | python3 -c '
import base64, json, sys
r = json.load(sys.stdin)["response"]
for w in r.get("warnings", []):
    print("  warning:", w)
ops = json.loads(base64.b64decode(r["patch"])) if r.get("patch") else []
print("  allowed, unchanged" if not ops else f"  allowed with {len(ops)} patch operations:")
for op in ops:
    value = " = " + json.dumps(op["value"]) if "value" in op else ""
    print("    %-7s %s%s" % (op["op"], op["path"], value))'
}

show "kubectl apply -f podinfo.yaml (CREATE)" CREATE none podinfo
show "kubectl scale / edit replicas (template unchanged)" UPDATE stored-v1 scale
show "kubectl set image podinfod=podinfo:6.1.0 (starts release v2)" UPDATE stored-v1 set-image-v2
show "kubectl replace with the manifest, which has no turnout stamps (same template)" UPDATE stored-v1 podinfo
show "kubectl rollout resume during release v2 (the hold stays)" UPDATE held-v2 resume
show "kubectl set image podinfod=podinfo:6.2.0 during release v2 (supersedes)" UPDATE held-v2 set-image-v3
show "kubectl set image back to podinfo:6.0.0 during release v2 (revert)" UPDATE held-v2 revert-v1
show "the agent's own update (admitted unchanged)" UPDATE stored-v1 set-image-v2 system:serviceaccount:turnout-system:turnout

say "a body that is not an AdmissionReview"
curl -sS --cacert "$work/certs/ca.crt" --data-binary '{"hello":"world"}' -o "$work/answer.txt" -w '  HTTP %{http_code}: ' \
  "https://127.0.0.1:$port/mutate"
cat "$work/answer.txt"

say "metrics (http://127.0.0.1:$admin/metrics)"
curl -sf "http://127.0.0.1:$admin/metrics" | grep '^turnout_admission_requests_total' | sed 's/^/  /'

say "SIGTERM: not ready, then a graceful stop"
kill -TERM "$pid"
wait "$pid"
pid=""
grep -E 'shutting down|connections closed|stopped accepting' "$work/webhook.log" | sed 's/^/  /'
say "done: the agent and kubesim (coming next) turn held updates into live releases"
