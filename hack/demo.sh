#!/usr/bin/env bash
# turnout's demo on the test bed: the real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager and kubectl, built from the Kubernetes Go modules on first use: 10-25 minutes
# once, seconds after), with kubesim's node agent running the pods and its Istio-like mesh whose
# proxies apply changes late. No cluster needed.
#
# Installs turnout as the README says (kubectl apply -k deploy/, then hack/install-certs.sh), runs
# `turnout run` (webhook + agent) with a token of its ServiceAccount, a real Prometheus when one is
# installed, and constant HTTP load through the mesh. Then, with the pinned kubectl:
#   1. a healthy release (kubectl set image): canary steps, analysis, hand-off, promotion;
#   2. a bad release (5 in 10 requests fail): rolled back automatically, `kubectl rollout status` fails;
#   3. the same update in a namespace that did not opt in: a native rolling update, for comparison.
# It prints the release's progress every second and ends with the failed-request counts and a chart of
# requests per version over time (target/demo/requests.svg, or $DEMO_OUT/requests.svg).
#
# Usage: hack/demo.sh          (needs cargo, go, curl and python3; Prometheus is optional)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*" >&2; "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS CMD...: polls CMD until it succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@" > /dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || {
      echo "timed out waiting for: $*" >&2
      tail -n 30 "$work"/*.log >&2 || true
      exit 1
    }
    sleep 0.2
  done
}
# Load NAME ($1) over its last second, e.g. "v1 16, v2 4, failed 0".
load_now() {
  python3 - "$work/load-$1.jsonl" << 'EOF'
import json, sys
try:
    lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
except OSError:
    lines = []
if not lines:
    print("no answers yet"); sys.exit()
last = max(l["t"] for l in lines)
ok, failed = {}, 0
for l in lines:
    if l["t"] == last:
        failed += l["failed"]
        for v, n in l["ok"].items():
            ok[v] = ok.get(v, 0) + n
print(", ".join(f"{v} {n}" for v, n in sorted(ok.items())) + f", failed {failed}")
EOF
}
# Totals of load NAME ($1): "N requests, F failed (P %), by version {...}".
load_total() {
  python3 - "$work/load-$1.jsonl" << 'EOF'
import json, sys
ok, failed = {}, 0
for l in open(sys.argv[1]):
    if l.strip():
        l = json.loads(l)
        failed += l["failed"]
        for v, n in l["ok"].items():
            ok[v] = ok.get(v, 0) + n
total = sum(ok.values()) + failed
print(f"{total} requests, {failed} failed ({100 * failed / max(total, 1):.2f} %), answered by {ok}")
EOF
}
load=""      # the running load's name
load_pid=""
start_load() { # start_load NAME NS: 40 requests/s to podinfo.NS, counted in load-NAME.jsonl
  load=$1
  python3 "$root/hack/load.py" --mesh "$mesh" --host "podinfo.$2" --rate 40 --out "$work/load-$1.jsonl" &
  load_pid=$!
  pids+=("$load_pid")
  wait_for 20 test -s "$work/load-$1.jsonl"
}
stop_load() { # ends the load and waits for its last answers
  kill "$load_pid" 2> /dev/null || true
  wait "$load_pid" 2> /dev/null || true
}
# Follows the release of shop/podinfo until its phase is one of $@, printing a line per second.
follow() {
  local started=$SECONDS phase=""
  while :; do
    local ann
    ann=$(kubectl get -n shop deployment podinfo -o jsonpath='{.metadata.annotations.turnout\.dev/phase}|{.metadata.annotations.turnout\.dev/weight}|{.metadata.annotations.turnout\.dev/message}')
    IFS='|' read -r phase weight message <<< "$ann"
    echo "$(date +%s.%N) ${phase:-Held} ${weight:-0}" >> "$work/phases.txt"
    printf '  %3ss  %-11s canary %3s%%  requests/s: %-26s %s\n' "$((SECONDS - started))" "${phase:-Held}" "${weight:-0}" "$(load_now "$load")" "$message"
    for want in "$@"; do [ "$phase" = "$want" ] && return 0; done
    [ $((SECONDS - started)) -lt 240 ] || { echo "the release did not end within 240 s" >&2; exit 1; }
    sleep 1
  done
}

say "building the Kubernetes control plane (skipped when built), turnout and kubesim"
"$root/hack/k8s/build.sh"
bin=${TURNOUT_K8S_BIN:-${CARGO_TARGET_DIR:-$root/target}/k8s/bin}
# The pinned kubectl, the same version as the control plane.
export PATH="$bin:$PATH"
cargo build --quiet --manifest-path "$root/Cargo.toml" -p turnout -p kubesim --bins
turnout="${CARGO_TARGET_DIR:-$root/target}/debug/turnout"
kubesim="${CARGO_TARGET_DIR:-$root/target}/debug/kubesim"

port=$(free_port)
admin=$(free_port)
say "the test bed: etcd, kube-apiserver, kube-controller-manager $(kubectl version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'); a node agent; a mesh whose proxies apply each change up to 500ms late, as Envoys do"
TURNOUT_K8S_BIN="$bin" "$kubesim" up --dir "$work/cluster" --pod-ready-delay 300ms --max-propagation-delay 500ms \
  > "$work/kubesim.log" 2>&1 &
pids+=($!)
wait_for 120 test -s "$work/cluster/endpoints.json"
export KUBECONFIG="$work/cluster/kubeconfig"
endpoints() { python3 -c "import json,sys; print(json.load(open('$work/cluster/endpoints.json'))['$1'])"; }
mesh=$(endpoints mesh | sed 's#^http://##')
metrics=$(endpoints metrics | sed -e 's#^http://##' -e 's#/metrics$##')
run kubectl apply -f "$root/../shared/crds/istio/" > /dev/null
established() { [ "$(kubectl get crd "$1" -o jsonpath='{.status.conditions[?(@.type=="Established")].status}')" = True ]; }
wait_for 60 established virtualservices.networking.istio.io
wait_for 60 established destinationrules.networking.istio.io
echo "Istio CRDs applied"

prometheus_flag=()
if command -v prometheus > /dev/null; then
  prom=$(free_port)
  cat > "$work/prometheus.yml" << EOF
global: { scrape_interval: 1s, evaluation_interval: 1s }
scrape_configs:
  - job_name: kubesim-mesh
    metrics_path: /metrics
    static_configs: [{ targets: ['$metrics'] }]
EOF
  say "Prometheus on 127.0.0.1:$prom, scraping the mesh's Istio metrics every second"
  prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$prom" --log.level=warn > "$work/prometheus.log" 2>&1 &
  pids+=($!)
  wait_for 30 curl -sf "http://127.0.0.1:$prom/-/ready"
  prometheus_flag=(--prometheus "http://127.0.0.1:$prom")
else
  say "Prometheus is not installed: analysis checks candidate readiness only (apt-get install prometheus)"
fi

say "install turnout: the manifests, then the certificates"
run kubectl apply -k "$root/deploy"
TURNOUT_BIN="$turnout" run "$root/hack/install-certs.sh" --dir "$work/certs" --host 127.0.0.1
# The test bed has no cluster network: the API server calls the webhook by URL, and this script's
# turnout process stands in for deploy/'s pods.
run kubectl patch mutatingwebhookconfiguration turnout --type=json \
  -p "[{\"op\":\"remove\",\"path\":\"/webhooks/0/clientConfig/service\"},{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/url\",\"value\":\"https://127.0.0.1:$port/mutate\"}]"
run kubectl scale -n turnout-system deployment/turnout --replicas=0

say "turnout run: webhook + agent, with a token of the ServiceAccount turnout-system/turnout (deploy/'s RBAC)"
token=$(kubectl create token turnout -n turnout-system --duration=2h)
echo "kubectl create token turnout -n turnout-system: a token of ${#token} characters"
cp "$KUBECONFIG" "$work/agent.kubeconfig"
KUBECONFIG="$work/agent.kubeconfig" kubectl config set-credentials turnout --token="$token" > /dev/null
KUBECONFIG="$work/agent.kubeconfig" kubectl config set-context --current --user=turnout > /dev/null
KUBECONFIG="$work/agent.kubeconfig" "$turnout" run --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
  --tls-cert "$work/certs/tls.crt" --tls-key "$work/certs/tls.key" \
  --agent-username system:serviceaccount:turnout-system:turnout --drain-delay 0s \
  --steps 20,50,100 --interval 3s --threshold 2 --propagation-delay 1s --drain 1s "${prometheus_flag[@]}" \
  2> "$work/turnout.log" &
pids+=($!)
wait_for 30 curl -sf "http://127.0.0.1:$admin/ready"
echo "release settings: steps 20,50,100; analysis 3s after each step; 2 failed checks roll back"

service() {
  kubectl apply -f - << EOF
apiVersion: v1
kind: Service
metadata: { name: podinfo, namespace: $1 }
spec:
  selector: { app: podinfo }
  ports: [{ name: http, port: 9898, targetPort: 9898 }]
EOF
}

say "opt a namespace in; deploy the podinfo sample (2 replicas) behind a Service; start 40 requests/s"
run kubectl create namespace shop
run kubectl label namespace shop turnout.dev/rollout=enabled
wait_for 30 kubectl get -n shop serviceaccount default
run kubectl apply -n shop -f "$root/../shared/fixtures/podinfo/deployment.yaml"
run kubectl scale -n shop deployment/podinfo --replicas=2
service shop
run kubectl rollout status -n shop deployment/podinfo --timeout=60s
start_load healthy shop

say "1. a healthy release: kubectl set image"
run kubectl set image -n shop deployment/podinfo podinfod=ghcr.io/stefanprodan/podinfo:6.1.0
follow Succeeded Failed
run kubectl rollout status -n shop deployment/podinfo --timeout=60s
run kubectl get -n shop deployments,pods -L version
run kubectl get -n shop virtualservice podinfo -o jsonpath='VirtualService: {.spec.http[0].route}{"\n"}'

stop_load

say "2. a bad release: 5 in 10 requests of the new version fail"
start_load bad shop
run kubectl set env -n shop deployment/podinfo KUBESIM_ERROR_RATE=0.5
follow Failed Succeeded
status=$(kubectl rollout status -n shop deployment/podinfo --timeout=30s 2>&1) && {
  echo "kubectl rollout status should have failed" >&2
  exit 1
}
printf '\033[2m$ kubectl rollout status -n shop deployment/podinfo\033[0m\n%s\n' "$status"
# Rolled back: traffic returns to v2, then the candidate goes.
wait_for 60 sh -c "! kubectl get -n shop deployment podinfo-v3"
run kubectl get -n shop deployments,pods -L version
echo "events:"
kubectl get -n shop events --field-selector involvedObject.name=podinfo --sort-by=.eventTime -o jsonpath='{range .items[?(@.source.component=="turnout")]}  {.type} {.reason}: {.message}{"\n"}{end}'
stop_load

say "3. for comparison: the same update in a namespace that did not opt in (a native rolling update)"
run kubectl create namespace plain
wait_for 30 kubectl get -n plain serviceaccount default
run kubectl apply -n plain -f "$root/../shared/fixtures/podinfo/deployment.yaml"
run kubectl scale -n plain deployment/podinfo --replicas=2
service plain
run kubectl rollout status -n plain deployment/podinfo --timeout=60s
start_load native plain
run kubectl set image -n plain deployment/podinfo podinfod=ghcr.io/stefanprodan/podinfo:6.1.0
run kubectl rollout status -n plain deployment/podinfo --timeout=60s
sleep 2
stop_load

say "summary"
echo "  1. turnout, healthy release:             $(load_total healthy)"
echo "  2. turnout, bad release rolled back:      $(load_total bad)"
echo "     (its failures are the 500s of the canary's 20 % share, before the rollback)"
echo "  3. native rolling update, same mesh:      $(load_total native)"
chart_dir=${DEMO_OUT:-$root/target/demo}
mkdir -p "$chart_dir"
python3 "$root/hack/chart.py" --out "$chart_dir/requests.svg" --phases "$work/phases.txt" \
  --title "shop/podinfo: requests per second by version (healthy release, then a bad one)" \
  "$work/load-healthy.jsonl" "$work/load-bad.jsonl"
echo "  chart of requests per version over time: $chart_dir/requests.svg"
echo
echo "turnout's metrics (http://127.0.0.1:$admin/metrics):"
curl -sf "http://127.0.0.1:$admin/metrics" | grep -E '^turnout_(releases_total|analysis_checks_total|release_phase)' | sed 's/^/  /'
