{{/* Names, labels and the values every template shares. */}}

{{- define "clipserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "clipserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "clipserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "clipserve.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* `<fullname>-<suffix>`, within the 63 characters of a DNS label. */}}
{{- define "clipserve.component" -}}
{{- printf "%s-%s" (include "clipserve.fullname" .root | trunc (int (sub 62 (len .name)))) .name | trimSuffix "-" -}}
{{- end -}}

{{- define "clipserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "clipserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: clipserve
{{- end -}}

{{/* Selector labels of one component (api, redis, postgresql, train). */}}
{{- define "clipserve.selector" -}}
app.kubernetes.io/name: {{ include "clipserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "clipserve.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The API's image: the GPU image when gpu.enabled. */}}
{{- define "clipserve.apiImage" -}}
{{- include "clipserve.image" (dict "root" . "image" (ternary .Values.gpu.image .Values.image .Values.gpu.enabled)) -}}
{{- end -}}

{{/* The chart's Secret of API keys, or the one the user keeps. */}}
{{- define "clipserve.authSecret" -}}
{{- .Values.auth.existingSecret | default (include "clipserve.component" (dict "root" . "name" "auth")) -}}
{{- end -}}

{{- define "clipserve.authEnabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.apiKeys -}}true{{- end -}}
{{- end -}}

{{/* The Secret holding the stores' URL and DSN: the chart's, or the user's for each. */}}
{{- define "clipserve.storesSecret" -}}
{{- include "clipserve.component" (dict "root" . "name" "stores") -}}
{{- end -}}

{{- define "clipserve.redisHost" -}}
{{- include "clipserve.component" (dict "root" . "name" "redis") -}}
{{- end -}}

{{- define "clipserve.postgresqlHost" -}}
{{- include "clipserve.component" (dict "root" . "name" "postgresql") -}}
{{- end -}}

{{/* The in-chart PostgreSQL password: as given, else the one already in the cluster, else a new one,
kept in the values so that every template of this render uses the same. */}}
{{- define "clipserve.postgresqlPassword" -}}
{{- if not .Values.postgresql.auth.password -}}
{{- $password := randAlphaNum 24 -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "clipserve.postgresqlHost" .) -}}
{{- if and $existing $existing.data (index $existing.data "password") -}}
{{- $password = index $existing.data "password" | b64dec -}}
{{- end -}}
{{- $_ := set .Values.postgresql.auth "password" $password -}}
{{- end -}}
{{- .Values.postgresql.auth.password -}}
{{- end -}}

{{/* Where the models come from: a PersistentVolumeClaim's name (pvc source). */}}
{{- define "clipserve.modelsClaim" -}}
{{- .Values.models.persistence.existingClaim | default (include "clipserve.component" (dict "root" . "name" "models")) -}}
{{- end -}}

{{/* Refusals: settings that cannot work, stopped at render time with one line that says what to do. */}}
{{- define "clipserve.refusals" -}}
{{- if eq .Values.collections.backend "embedded" -}}
{{- if gt (int .Values.replicaCount) 1 -}}
{{- fail (printf "collections.backend=embedded keeps collections in one process, so replicaCount must be 1 (it is %d): use collections.backend=pgvector for more replicas" (int .Values.replicaCount)) -}}
{{- end -}}
{{- if .Values.autoscaling.enabled -}}
{{- fail "collections.backend=embedded keeps collections in one process, so it cannot autoscale: set autoscaling.enabled=false, or use collections.backend=pgvector" -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.collections.backend "pgvector") (not .Values.postgresql.enabled) (not .Values.postgresql.dsn) (not .Values.postgresql.existingSecret) -}}
{{- fail "collections.backend=pgvector needs a PostgreSQL: set postgresql.dsn or postgresql.existingSecret (external), or postgresql.enabled=true (in the chart)" -}}
{{- end -}}
{{- if and .Values.postgresql.enabled (or .Values.postgresql.dsn .Values.postgresql.existingSecret) -}}
{{- fail "postgresql.enabled=true runs a PostgreSQL in the chart, and postgresql.dsn / postgresql.existingSecret name an external one: choose one" -}}
{{- end -}}
{{- if and .Values.redis.enabled (or .Values.redis.url .Values.redis.existingSecret) -}}
{{- fail "redis.enabled=true runs a Redis in the chart, and redis.url / redis.existingSecret name an external one: choose one" -}}
{{- end -}}
{{- if and (eq .Values.models.source "image") (not .Values.models.image.repository) -}}
{{- fail "models.source=image needs models.image.repository (and models.image.tag): an image built from docker/Dockerfile.model" -}}
{{- end -}}
{{- if and .Values.training.enabled (ne .Values.models.source "pvc") -}}
{{- fail "training.enabled=true publishes into the models volume, so it needs models.source=pvc (it is image: a model image is published by building a new one)" -}}
{{- end -}}
{{- if and (eq .Values.autoscaling.mode "keda") .Values.autoscaling.enabled (not .Values.autoscaling.keda.serverAddress) -}}
{{- fail "autoscaling.mode=keda needs autoscaling.keda.serverAddress: the Prometheus that scrapes the API (e.g. http://prometheus-operated.monitoring:9090)" -}}
{{- end -}}
{{- end -}}

{{/* The API container's variables from Secrets: the stores' URL and DSN, the admin key. */}}
{{- define "clipserve.apiEnv" -}}
{{- if .Values.redis.existingSecret }}
- name: CLIPSERVE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else if or .Values.redis.enabled .Values.redis.url }}
- name: CLIPSERVE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "clipserve.storesSecret" . }}
      key: redis-url
{{- end }}
{{- if eq .Values.collections.backend "pgvector" }}
- name: CLIPSERVE_POSTGRES_DSN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.postgresql.existingSecret | default (include "clipserve.storesSecret" .) }}
      key: {{ ternary .Values.postgresql.existingSecretKey "postgres-dsn" (ne .Values.postgresql.existingSecret "") }}
{{- end }}
{{- if include "clipserve.authEnabled" . }}
- name: CLIPSERVE_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "clipserve.authSecret" . }}
      key: admin-key
      optional: true
{{- end }}
{{- with .Values.extraEnv }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end -}}
