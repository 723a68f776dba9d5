{{/*
Names are fixed, not prefixed with the release: the CRD, the ClusterRoles and the webhook
configurations are cluster-wide, so one chscale runs per cluster (ADR 0012), and the
names match deploy/ so that moving between the two keeps the objects.
*/}}

{{/* Labels helm adds to every object, beside app.kubernetes.io/name. */}}
{{- define "chscale.labels" -}}
app.kubernetes.io/part-of: chscale
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "chscale.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The container fields every component shares: image, pull policy. */}}
{{- define "chscale.imageFields" -}}
image: {{ include "chscale.image" . }}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end -}}

{{/* Pod-level scheduling fields of a component's values (nodeSelector, tolerations, affinity). */}}
{{- define "chscale.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "chscale.pullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The certificate mode, checked once. */}}
{{- define "chscale.certMode" -}}
{{- $mode := .Values.webhook.certificates.mode -}}
{{- if not (has $mode (list "certManager" "secret")) -}}
{{- fail (printf "webhook.certificates.mode: must be certManager or secret, got %q" $mode) -}}
{{- end -}}
{{- if and (eq $mode "secret") (not .Values.webhook.certificates.caBundle) -}}
{{- fail "webhook.certificates.caBundle: required when mode is secret (the base64 PEM of the CA that signed the Secret's certificate)" -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{/* What the webhook configurations need to trust the webhook: an annotation for
cert-manager's CA injector, or the CA bundle given. */}}
{{- define "chscale.caInjection" -}}
{{- if eq (include "chscale.certMode" .) "certManager" }}
annotations:
  cert-manager.io/inject-ca-from: {{ .Release.Namespace }}/chscale-webhook
{{- end }}
{{- end -}}

{{- define "chscale.caBundle" -}}
{{- if eq (include "chscale.certMode" .) "certManager" -}}
""
{{- else -}}
{{ .Values.webhook.certificates.caBundle | quote }}
{{- end -}}
{{- end -}}
