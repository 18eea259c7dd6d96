{{/* Names, labels and the pieces of pod specs that several workloads share. */}}

{{- define "distillgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "distillgate.fullname" -}}
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

{{- define "distillgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "gateway"). */}}
{{- define "distillgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distillgate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "distillgate.labels" -}}
helm.sh/chart: {{ include "distillgate.chart" .ctx }}
{{ include "distillgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: distillgate
{{- end }}

{{- define "distillgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "distillgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "distillgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "distillgate.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) }}
{{- end }}

{{- define "distillgate.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "distillgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "distillgate.postgresql.secretName" -}}
{{- default (include "distillgate.postgresql.fullname" .) .Values.postgresql.auth.existingSecret }}
{{- end }}

{{- define "distillgate.adaptersClaim" -}}
{{- default (printf "%s-adapters" (include "distillgate.fullname" .)) .Values.adapters.persistence.existingClaim }}
{{- end }}

{{/*
The database URL. In-chart PostgreSQL: the URL carries no password; libpq reads PGPASSWORD,
so the password never appears in a URL, a log line or a process listing.
*/}}
{{- define "distillgate.databaseEnv" -}}
{{- if .Values.postgresql.enabled -}}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "distillgate.postgresql.secretName" . }}
      key: {{ .Values.postgresql.auth.passwordKey }}
- name: DISTILLGATE_DATABASE_URL
  value: {{ printf "postgresql+psycopg://%s@%s:5432/%s" .Values.postgresql.auth.username (include "distillgate.postgresql.fullname" .) .Values.postgresql.auth.database | quote }}
{{- else -}}
- name: DISTILLGATE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "postgresql.enabled=false needs database.existingSecret (a Secret holding the database URL)" .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
{{- end }}
{{- end }}

{{/* The teacher key and any extra secret variables (gateway, worker, trainer). */}}
{{- define "distillgate.secretEnv" -}}
{{- $secret := required "secrets.existingSecret is required: the chart takes credentials only by reference" .Values.secrets.existingSecret -}}
- name: {{ .Values.secrets.teacherApiKey.envName }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secrets.teacherApiKey.key }}
{{- range .Values.secrets.extraEnv }}
- name: {{ .envName }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .key }}
{{- end }}
{{- end }}

{{/* config.yaml: the user's `config` with the settings the chart's layout depends on. */}}
{{- define "distillgate.config" -}}
{{- $fixed := dict
  "host" "0.0.0.0"
  "port" 8000
  "ops_port" 8001
  "policy_file" "/etc/distillgate/policy/policy.yaml"
  "adapters_dir" .Values.adaptersPath
  "shutdown_grace_s" .Values.gateway.shutdownGraceSeconds
  "run_scheduler" false
  "migrate_on_start" (not .Values.migrations.enabled)
  "recorder" (dict "spool_dir" "/var/lib/distillgate/spool")
}}
{{- $config := mustMergeOverwrite (deepCopy .Values.config) $fixed }}
{{- toYaml $config }}
{{- end }}

{{- define "distillgate.policy" -}}
{{- tpl (toYaml .Values.policy) . }}
{{- end }}

{{/* Volumes and mounts for the config and policy ConfigMaps. */}}
{{- define "distillgate.configVolumes" -}}
- name: config
  configMap:
    name: {{ include "distillgate.fullname" . }}-config
- name: policy
  configMap:
    name: {{ include "distillgate.fullname" . }}-policy
- name: tmp
  emptyDir: {}
{{- end }}

{{/* Mounted as directories, not subPath files, so the kubelet can update the policy in place. */}}
{{- define "distillgate.configMounts" -}}
- name: config
  mountPath: /etc/distillgate/config.yaml
  subPath: config.yaml
  readOnly: true
- name: policy
  mountPath: /etc/distillgate/policy
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Resources with the GPU limit added: include with (dict "resources" .x.resources "gpus" .x.gpus). */}}
{{- define "distillgate.gpuResources" -}}
{{- $res := deepCopy (default (dict) .resources) }}
{{- if gt (int .gpus) 0 }}
{{- $limits := default (dict) (get $res "limits") }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* NVLink multicast off in NCCL, PyTorch and NVSHMEM for every process that may train on
several GPUs (trainer.distributed.NO_MULTICAST sets the same in each torchrun launch). */}}
{{- define "distillgate.noMulticastEnv" -}}
- name: NCCL_NVLS_ENABLE
  value: "0"
- name: TORCH_SYMM_MEM_DISABLE_MULTICAST
  value: "1"
- name: NVSHMEM_DISABLE_NVLS
  value: "1"
{{- end }}
