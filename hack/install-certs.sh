#!/usr/bin/env bash
# Generate turnout's webhook serving certificate and install it into the cluster:
# the Secret turnout-webhook-tls and the caBundle of MutatingWebhookConfiguration turnout.
# Run `hack/install-certs.sh --help` for details.
set -euo pipefail

readonly SECRET_NAME=turnout-webhook-tls
readonly WEBHOOK_CONFIG=turnout
readonly WEBHOOK_NAME=deployments.turnout.dev
readonly SERVICE_NAME=turnout-webhook

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
Usage: hack/install-certs.sh [--force] [--dry-run] [--namespace NS] [--dir DIR] [--host NAME]...

Generates a CA and a serving certificate for turnout's admission webhook with
\`turnout certs\`, stores the serving pair in the Secret ${SECRET_NAME}, and
patches the CA into the caBundle of MutatingWebhookConfiguration
${WEBHOOK_CONFIG}. Apply the manifests first: kubectl apply -k deploy/

Options:
  --force           Generate new certificates even if DIR already has them
                    (rotation). Without it, existing files are reused.
  --dry-run         Generate (or reuse) the local files, print the Secret
                    (private key redacted) and the caBundle patch, and change
                    nothing in the cluster.
  --namespace NS    Namespace turnout runs in (default: turnout-system).
  --dir DIR         Where the files go (default: certs/ in the repository).
  --host NAME       Another DNS name or IP address the serving certificate is
                    valid for, besides the Service's names (e.g. 127.0.0.1
                    when the API server calls the webhook by URL); repeatable.
  -h, --help        Show this help.

Environment:
  TURNOUT_BIN       turnout binary to use (default: cargo run --quiet
                    --release --bin turnout -- , from the repository root).
  KUBECTL           kubectl binary to use (default: kubectl). Select the
                    cluster with KUBECONFIG or the current context.

Rotation: re-run with --force. The webhook reloads the new files without a
restart once the kubelet refreshes the mounted Secret (up to about a minute).
The CA is new, so the caBundle is re-patched; it temporarily trusts both the
new CA and the previous one, so admission calls keep working while the pods
pick up the new certificate. The next rotation drops the older CA.
EOF
}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

force=false
dry_run=false
namespace=turnout-system
dir="${repo_root}/certs"
extra_hosts=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --force) force=true ;;
    --dry-run) dry_run=true ;;
    --host)
      [[ $# -ge 2 ]] || die "--host needs a value"
      extra_hosts+=("$2")
      shift
      ;;
    --namespace)
      [[ $# -ge 2 ]] || die "--namespace needs a value"
      namespace="$2"
      shift
      ;;
    --namespace=*) namespace="${1#*=}" ;;
    --dir)
      [[ $# -ge 2 ]] || die "--dir needs a value"
      dir="$2"
      shift
      ;;
    --dir=*) dir="${1#*=}" ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

[[ -n "$namespace" ]] || die "--namespace must not be empty"
[[ -n "$dir" ]] || die "--dir must not be empty"
# Make DIR absolute: turnout runs from the repository root.
[[ "$dir" = /* ]] || dir="$PWD/$dir"

kubectl_bin="${KUBECTL:-kubectl}"
if [[ -n "${TURNOUT_BIN:-}" ]]; then
  turnout_cmd=("$TURNOUT_BIN")
else
  turnout_cmd=(cargo run --quiet --release --bin turnout --)
fi

kc() { "$kubectl_bin" "$@"; }

ca_crt="$dir/ca.crt"
tls_crt="$dir/tls.crt"
tls_key="$dir/tls.key"
hosts=(
  "${SERVICE_NAME}.${namespace}.svc"
  "${SERVICE_NAME}.${namespace}.svc.cluster.local"
  ${extra_hosts[@]+"${extra_hosts[@]}"}
)

command -v "$kubectl_bin" >/dev/null 2>&1 || die "kubectl not found (set KUBECTL)"

# --- 1. Cluster checks (read-only) ----------------------------------------------------------------------
# Done before generating anything, so that a missing install does not leave half a rotation behind.
if [[ "$dry_run" == false ]]; then
  log "checking namespace ${namespace} and MutatingWebhookConfiguration ${WEBHOOK_CONFIG}"
  kc get namespace "$namespace" >/dev/null ||
    die "namespace ${namespace} not found: apply the manifests first (kubectl apply -k deploy/)"
  first_webhook="$(kc get mutatingwebhookconfiguration "$WEBHOOK_CONFIG" -o jsonpath='{.webhooks[0].name}')" ||
    die "MutatingWebhookConfiguration ${WEBHOOK_CONFIG} not found: apply the manifests first (kubectl apply -k deploy/)"
  [[ "$first_webhook" == "$WEBHOOK_NAME" ]] ||
    die "webhook 0 of ${WEBHOOK_CONFIG} is '${first_webhook}', expected ${WEBHOOK_NAME}"
  if [[ -n "$(kc get mutatingwebhookconfiguration "$WEBHOOK_CONFIG" \
    -o jsonpath='{.metadata.annotations.cert-manager\.io/inject-ca-from}')" ]]; then
    die "${WEBHOOK_CONFIG} is managed by cert-manager (deploy/cert-manager); do not also use this script"
  fi
fi
# The CA currently trusted by the API server, kept in the new caBundle during a rotation (best effort,
# also in --dry-run when a cluster is reachable).
current_bundle_b64="$(kc get mutatingwebhookconfiguration "$WEBHOOK_CONFIG" --request-timeout=10s \
  -o jsonpath='{.webhooks[0].clientConfig.caBundle}' 2>/dev/null || true)"

# --- 2. Local files -------------------------------------------------------------------------------------
have=0
for f in "$ca_crt" "$tls_crt" "$tls_key"; do
  [[ -e "$f" ]] && have=$((have + 1))
done

if [[ "$force" == false && "$have" -eq 3 ]]; then
  log "reusing the certificates in ${dir} (pass --force to rotate them)"
else
  if [[ "$force" == false && "$have" -gt 0 ]]; then
    die "${dir} holds only some of ca.crt, tls.crt, tls.key: pass --force to generate a new set"
  fi
  certs_args=(certs --dir "$dir")
  for h in "${hosts[@]}"; do
    certs_args+=(--host "$h")
  done
  if [[ "$force" == true ]]; then
    certs_args+=(--force)
  fi
  log "generating a CA and a serving certificate for ${hosts[*]} in ${dir}"
  mkdir -p "$dir"
  (cd "$repo_root" && "${turnout_cmd[@]}" "${certs_args[@]}") || die "turnout certs failed"
fi

for f in "$ca_crt" "$tls_crt" "$tls_key"; do
  [[ -s "$f" ]] || die "missing or empty: $f"
done

# --- 3. caBundle ----------------------------------------------------------------------------------------
# New CA first; during a rotation the previous CA (first certificate of the current bundle) follows it.
first_pem_cert() {
  awk '/-----BEGIN CERTIFICATE-----/ { p = 1 } p { print } /-----END CERTIFICATE-----/ { if (p) exit }'
}
new_ca="$(first_pem_cert <"$ca_crt")"
[[ -n "$new_ca" ]] || die "no PEM certificate in $ca_crt"
bundle="$new_ca"
if [[ -n "$current_bundle_b64" ]]; then
  current_bundle="$(printf '%s' "$current_bundle_b64" | base64 -d 2>/dev/null || true)"
  previous_ca="$(printf '%s\n' "$current_bundle" | first_pem_cert || true)"
  if [[ "$previous_ca" == "$new_ca" ]]; then
    # Same CA already installed (re-run without --force): keep the bundle as it is, bridge included.
    bundle="$current_bundle"
  elif [[ -n "$previous_ca" ]]; then
    log "keeping the previous CA in the caBundle while the pods switch to the new certificate"
    bundle="${new_ca}"$'\n'"${previous_ca}"
  fi
fi
ca_bundle_b64="$(printf '%s\n' "$bundle" | base64 | tr -d '\n')"
# "add" also replaces an existing value, and works when the base left caBundle out.
patch="[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"${ca_bundle_b64}\"}]"

secret_yaml() {
  kc create secret tls "$SECRET_NAME" -n "$namespace" \
    --cert "$tls_crt" --key "$tls_key" --dry-run=client -o yaml
}

# --- 4. Apply -------------------------------------------------------------------------------------------
if [[ "$dry_run" == true ]]; then
  log "dry run: Secret ${namespace}/${SECRET_NAME} (tls.key redacted)"
  secret_yaml | sed -E 's/^([[:space:]]*tls\.key:).*/\1 <redacted>/'
  log "dry run: kubectl patch mutatingwebhookconfiguration ${WEBHOOK_CONFIG} --type=json -p"
  printf '%s\n' "$patch"
  log "dry run: nothing was changed in the cluster"
  exit 0
fi

# The caBundle goes in before the Secret: the API server then already trusts the new CA when the pods start
# serving the new certificate (and still trusts the old one until they do).
log "patching caBundle of MutatingWebhookConfiguration ${WEBHOOK_CONFIG} (webhook ${WEBHOOK_NAME})"
kc patch mutatingwebhookconfiguration "$WEBHOOK_CONFIG" --type=json -p "$patch" >/dev/null

log "applying Secret ${namespace}/${SECRET_NAME}"
secret_yaml | kc apply -f - >/dev/null

log "done. The pods load the certificate once the kubelet has synced the Secret; check with:"
log "  ${kubectl_bin} -n ${namespace} get pods -l app.kubernetes.io/name=turnout"
