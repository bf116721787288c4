{{- define "portcullis.labels" -}}
app.kubernetes.io/part-of: portcullis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Replicas the limits are divided among: see limits.replicas in values.yaml. */}}
{{- define "portcullis.limitReplicas" -}}
{{- if .Values.limits.replicas -}}
{{ .Values.limits.replicas | int64 }}
{{- else if .Values.dataplane.autoscaling.enabled -}}
{{ .Values.dataplane.autoscaling.maxReplicas | int64 }}
{{- else -}}
{{ .Values.dataplane.replicas | int64 }}
{{- end -}}
{{- end -}}
