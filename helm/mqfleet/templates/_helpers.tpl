{{- define "mqfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mqfleet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mqfleet.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mqfleet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The store URL; with a password Secret, `$(MQFLEET_REDIS_PASSWORD)` is expanded by Kubernetes. */}}
{{- define "mqfleet.store" -}}
{{- if eq .Values.redis.mode "bundled" -}}
redis://{{ include "mqfleet.fullname" . }}-redis:6379
{{- else if .Values.redis.external.passwordSecret.name -}}
{{ regexReplaceAll "^([a-z+]+)://" .Values.redis.external.url "${1}://:$(MQFLEET_REDIS_PASSWORD)@" }}
{{- else -}}
{{ .Values.redis.external.url }}
{{- end -}}
{{- end -}}

{{- define "mqfleet.redisPasswordEnv" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.passwordSecret.name }}
- name: MQFLEET_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.passwordSecret.name }}
      key: {{ .Values.redis.external.passwordSecret.key }}
{{- end }}
{{- end -}}

{{- define "mqfleet.tlsSecret" -}}
{{- if .Values.tls.certManager.enabled -}}
{{ include "mqfleet.fullname" . }}-tls
{{- else -}}
{{ .Values.tls.existingSecret }}
{{- end -}}
{{- end -}}

{{- define "mqfleet.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "mqfleet.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The proxy listeners behind the PROXY protocol: every enabled client port. */}}
{{- define "mqfleet.proxyProtocolListeners" -}}
{{- $p := .Values.service.ports -}}
{{- $l := list -}}
{{- if $p.mqtt.enabled }}{{ $l = append $l "mqtt" }}{{ end -}}
{{- if and .Values.tls.enabled $p.mqtts.enabled }}{{ $l = append $l "mqtts" }}{{ end -}}
{{- if $p.ws.enabled }}{{ $l = append $l "ws" }}{{ end -}}
{{- if and .Values.tls.enabled $p.wss.enabled }}{{ $l = append $l "wss" }}{{ end -}}
{{- join "," $l -}}
{{- end -}}
