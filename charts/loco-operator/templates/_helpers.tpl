{{/*
Naming and labels shared by every template.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "loco.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or <release> when it already contains the chart name. */}}
{{- define "loco.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select the operator pods (immutable once installed). */}}
{{- define "loco.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loco.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "loco.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "loco.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loco
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "loco.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loco.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name an existing ServiceAccount" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Operator image reference; the tag defaults to the chart's appVersion. */}}
{{- define "loco.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* True (non-empty) when several replicas run with Kopf peering. */}}
{{- define "loco.peering" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* Arguments of `loco operator run`, one per line as a YAML list. */}}
{{- define "loco.args" -}}
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
- --metrics-port={{ .Values.metrics.port }}
- --liveness=http://0.0.0.0:{{ .Values.health.port }}/healthz
- --node-lost-grace-seconds={{ .Values.nodeLostGraceSeconds }}
{{- if .Values.faultIsolation.cordonNodes }}
- --cordon-nodes
{{- end }}
{{- if .Values.networkPolicy.enabled }}
- --network-policy={{ include "loco.networkPolicyPeers" . }}
{{- end }}
{{- if eq .Values.logLevel "debug" }}
- --verbose
{{- end }}
{{- if include "loco.peering" . }}
- --peering={{ .Values.peering.name }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Who may reach a job's workers besides the job's own pods (--network-policy): this operator's pods, in the
release namespace, and networkPolicy.from (e.g. a Prometheus), as one line of JSON.
*/}}
{{- define "loco.networkPolicyPeers" -}}
{{- $operator := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (include "loco.selectorLabels" . | fromYaml)) -}}
{{- prepend (.Values.networkPolicy.from | default list) $operator | toJson -}}
{{- end }}
