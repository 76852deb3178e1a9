#!/usr/bin/env bash
# turnout's demo on kubesim (the Kubernetes emulator in hack/kubesim), with what exists today: the
# admission webhook. It installs turnout as the README says (kubectl apply -k deploy/, then
# hack/install-certs.sh), opts a namespace in, and makes the updates a team makes every day with the
# real kubectl, showing what turnout does to each. Needs cargo, kubectl and curl; no cluster.
#
# Usage: hack/demo.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*" >&2; "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS CMD...: polls CMD until it succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@" > /dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "timed out waiting for: $*" >&2; exit 1; }
    sleep 0.2
  done
}

say "building turnout and kubesim"
cargo build --quiet --manifest-path "$root/Cargo.toml" -p turnout -p kubesim --bins
turnout="$root/target/debug/turnout"
kubesim="$root/target/debug/kubesim"

port=$(free_port)
admin=$(free_port)
say "kubesim up, with the webhook Service turnout-system/turnout-webhook reaching 127.0.0.1:$port"
"$kubesim" up --dir "$work/cluster" --pod-ready-delay 300ms \
  --service "turnout-system/turnout-webhook=127.0.0.1:$port" > "$work/kubesim.log" 2>&1 &
pids+=($!)
wait_for 30 test -s "$work/cluster/endpoints.json"
export KUBECONFIG="$work/cluster/kubeconfig"
run kubectl get namespaces

say "install turnout: the manifests, then the certificates"
run kubectl apply -k "$root/deploy"
TURNOUT_BIN="$turnout" run "$root/hack/install-certs.sh" --dir "$work/certs"

say "turnout webhook (here a local process; in a cluster, the turnout Deployment's pods)"
"$turnout" webhook --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
  --tls-cert "$work/certs/tls.crt" --tls-key "$work/certs/tls.key" \
  --agent-username system:serviceaccount:turnout-system:turnout --drain-delay 0s 2> "$work/webhook.log" &
pids+=($!)
wait_for 30 curl -sf "http://127.0.0.1:$admin/ready"

say "opt a namespace in, and deploy the podinfo sample"
run kubectl create namespace shop --dry-run=client -o yaml | kubectl apply -f -
run kubectl label namespace shop turnout.dev/rollout=enabled
run kubectl apply -n shop -f "$root/../shared/fixtures/podinfo/deployment.yaml"
run kubectl rollout status -n shop deployment/podinfo --timeout=60s
run kubectl get -n shop deployment podinfo -o jsonpath='revision {.metadata.annotations.turnout\.dev/revision}, template labels {.spec.template.metadata.labels}{"\n"}'

say "kubectl set image: turnout holds the update as release v2 (the agent, coming next, runs it)"
run kubectl set image -n shop deployment/podinfo podinfod=ghcr.io/stefanprodan/podinfo:6.1.0
run kubectl get -n shop deployment podinfo -o jsonpath='paused {.spec.paused}, stable v{.metadata.annotations.turnout\.dev/stable-revision}, template v{.spec.template.metadata.labels.turnout\.dev/revision}, image {.spec.template.spec.containers[0].image}{"\n"}'
run kubectl get -n shop replicasets,pods
echo "(the old pods keep serving: no new ReplicaSet while the release is held)"

say "kubectl rollout resume during the release: the hold stays"
run kubectl rollout resume -n shop deployment/podinfo
run kubectl get -n shop deployment podinfo -o jsonpath='paused {.spec.paused}{"\n"}'

say "git revert / set image back: the stable template is restored, nothing restarts"
run kubectl set image -n shop deployment/podinfo podinfod=ghcr.io/stefanprodan/podinfo:6.0.0
run kubectl rollout status -n shop deployment/podinfo --timeout=60s
run kubectl get -n shop replicasets

say "a namespace that did not opt in: an ordinary rolling update"
run kubectl create namespace plain --dry-run=client -o yaml | kubectl apply -f -
run kubectl apply -n plain -f "$root/../shared/fixtures/podinfo/deployment.yaml"
run kubectl set image -n plain deployment/podinfo podinfod=ghcr.io/stefanprodan/podinfo:6.1.0
run kubectl rollout status -n plain deployment/podinfo --timeout=60s

say "the webhook's metrics (http://127.0.0.1:$admin/metrics)"
curl -sf "http://127.0.0.1:$admin/metrics" | grep '^turnout_admission_requests_total' | sed 's/^/  /'

say "done: the agent (next) turns held updates like this one into zero-downtime releases"
