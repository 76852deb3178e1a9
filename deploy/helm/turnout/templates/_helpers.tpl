{{/*
The objects' name: fullnameOverride, else the release name when it contains "turnout", else
<release>-turnout.
*/}}
{{- define "turnout.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The labels every object carries: deploy/'s two, then Helm's. */}}
{{- define "turnout.labels" -}}
app.kubernetes.io/name: turnout
app.kubernetes.io/part-of: turnout
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The pods' selector: never a label that changes with the release or the chart. */}}
{{- define "turnout.selectorLabels" -}}
app.kubernetes.io/name: turnout
{{- end -}}

{{- define "turnout.serviceAccountName" -}}
{{- if .Values.serviceAccount.name -}}
{{- .Values.serviceAccount.name -}}
{{- else -}}
{{- include "turnout.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* The username of the agent's requests, which the webhook admits unchanged. */}}
{{- define "turnout.agentUsername" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "turnout.serviceAccountName" . }}
{{- end -}}

{{- define "turnout.serviceName" -}}
{{- include "turnout.fullname" . }}-webhook
{{- end -}}

{{- define "turnout.tlsSecretName" -}}
{{- .Values.tls.secretName | default (printf "%s-webhook-tls" (include "turnout.fullname" .)) -}}
{{- end -}}

{{- define "turnout.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/*
One TURNOUT_* variable, from (list NAME VALUE), or nothing when VALUE is null, "" or an empty list (the
binary's default applies). A list is joined with commas; whole numbers print as such (values files give
every number as a float).
*/}}
{{- define "turnout.env" -}}
{{- $name := index . 0 -}}
{{- $value := index . 1 -}}
{{- if not (or (kindIs "invalid" $value) (eq (toString $value) "") (and (kindIs "slice" $value) (eq (len $value) 0))) -}}
- name: {{ $name }}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}
  value: {{ int64 $value | toString | quote }}
{{- else if kindIs "slice" $value }}
  value: {{ join "," $value | quote }}
{{- else }}
  value: {{ toString $value | quote }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* The variables of turnout's optional settings, those that are set (see values.yaml). */}}
{{- define "turnout.settingsEnv" -}}
{{- $r := .Values.release -}}
{{- $w := .Values.webhook -}}
{{- $l := .Values.leaderElection -}}
{{- $hooks := list -}}
{{- range $kind, $url := $r.hooks -}}
{{- $hooks = append $hooks (printf "%s=%s" $kind $url) -}}
{{- end -}}
{{- $settings := list
  (list "TURNOUT_PROMETHEUS" $r.prometheus)
  (list "TURNOUT_STEPS" $r.steps)
  (list "TURNOUT_INTERVAL" $r.interval)
  (list "TURNOUT_THRESHOLD" $r.threshold)
  (list "TURNOUT_PROGRESS_DEADLINE" $r.progressDeadline)
  (list "TURNOUT_PROPAGATION_DELAY" $r.propagationDelay)
  (list "TURNOUT_DRAIN" $r.drain)
  (list "TURNOUT_SUCCESS_RATE_MIN" $r.successRateMin)
  (list "TURNOUT_LATENCY_P99_MAX" $r.latencyP99Max)
  (list "TURNOUT_NO_DATA" $r.noData)
  (list "TURNOUT_HOOKS" $hooks)
  (list "TURNOUT_HOOK_TIMEOUT" $r.hookTimeout)
  (list "TURNOUT_HOOK_RETRIES" $r.hookRetries)
  (list "TURNOUT_PROVIDER" $r.provider)
  (list "TURNOUT_TLS_RELOAD_INTERVAL" $w.tlsReloadInterval)
  (list "TURNOUT_MAX_BODY_BYTES" $w.maxBodyBytes)
  (list "TURNOUT_HEADER_READ_TIMEOUT" $w.headerReadTimeout)
  (list "TURNOUT_DRAIN_DELAY" $w.drainDelay)
  (list "TURNOUT_SHUTDOWN_TIMEOUT" $w.shutdownTimeout)
  (list "TURNOUT_LEADER_ELECT" $l.enabled)
  (list "TURNOUT_LEASE_NAME" $l.leaseName)
  (list "TURNOUT_LEASE_DURATION" $l.leaseDuration)
  (list "TURNOUT_RELEASE_PAGE" .Values.releasePage)
-}}
{{- range $settings -}}
{{- with include "turnout.env" . }}
{{ . }}
{{- end -}}
{{- end -}}
{{- end -}}
