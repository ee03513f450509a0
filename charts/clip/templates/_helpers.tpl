{{/*
Names, labels, images and the Redis settings shared by the node plugin and the controller.
*/}}

{{/* The CSI driver name: compiled into the node plugin (driver/src/csi/identity.rs). */}}
{{- define "clip.driverName" -}}
csi.clip.dev
{{- end }}

{{- define "clip.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: "<release>-<chart>", or the release name when it already
contains the chart name. Truncated so that suffixes such as "-controller" still fit in 63.
*/}}
{{- define "clip.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "clip.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "clip.labels" -}}
helm.sh/chart: {{ include "clip.chart" . }}
app.kubernetes.io/name: {{ include "clip.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: clip
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "node"). Never change them: selectors are immutable. */}}
{{- define "clip.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clip.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's objects: common labels plus the component. */}}
{{- define "clip.componentLabels" -}}
{{ include "clip.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
An image reference from {repository, tag, pullPolicy}. For the chart's own images ("own":
true) an empty tag falls back to image.tag, then to the chart's appVersion.
*/}}
{{- define "clip.image" -}}
{{- $tag := .image.tag | toString }}
{{- if .own }}
{{- $tag = .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion | toString }}
{{- end }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}

{{- define "clip.node.fullname" -}}
{{- printf "%s-node" (include "clip.fullname" .) }}
{{- end }}

{{- define "clip.keeper.fullname" -}}
{{- printf "%s-keeper" (include "clip.node.fullname" .) }}
{{- end }}

{{/*
The keeper's socket: in the node plugin's state directory (the hostPath node.stateDir), which
the plugin and the keeper both mount at /var/lib/clip, so that they see the same socket file.
*/}}
{{- define "clip.keeper.socket" -}}
/var/lib/clip/keeper.sock
{{- end }}

{{- define "clip.controller.fullname" -}}
{{- printf "%s-controller" (include "clip.fullname" .) }}
{{- end }}

{{- define "clip.redis.fullname" -}}
{{- printf "%s-redis" (include "clip.fullname" .) }}
{{- end }}

{{- define "clip.node.serviceAccountName" -}}
{{- if .Values.node.serviceAccount.create }}
{{- default (include "clip.node.fullname" .) .Values.node.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.node.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "clip.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (include "clip.controller.fullname" .) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "clip.controller.leaseName" -}}
{{- default (include "clip.controller.fullname" .) .Values.controller.leaderElection.leaseName }}
{{- end }}

{{/*
"true" when a Redis Cluster is configured (external seeds or the quickstart one), else "".
Without one the controller is not installed: it publishes every index to Redis and cannot
run without it. The node plugin then serves `image:` volumes only, indexing them itself.
*/}}
{{- define "clip.redis.enabled" -}}
{{- if or .Values.redis.seeds .Values.redis.deploy.enabled }}true{{ end }}
{{- end }}

{{/* Fails rendering on contradictory settings that the schema cannot express. */}}
{{- define "clip.validate" -}}
{{- if and .Values.redis.seeds .Values.redis.deploy.enabled }}
{{- fail "redis: set either redis.seeds (an existing Redis Cluster) or redis.deploy.enabled (a quickstart one), not both" }}
{{- end }}
{{- if and .Values.redis.deploy.enabled .Values.redis.tls.enabled }}
{{- fail "redis: the quickstart Redis Cluster (redis.deploy.enabled) does not serve TLS; redis.tls is for an existing cluster" }}
{{- end }}
{{- if and .Values.redis.tls.caSecret.name (not .Values.redis.tls.enabled) }}
{{- fail "redis: redis.tls.caSecret is set but redis.tls.enabled is false" }}
{{- end }}
{{- if and (gt (int .Values.controller.replicas) 1) (not .Values.controller.leaderElection.enabled) }}
{{- fail "controller: more than one replica needs controller.leaderElection.enabled, or the replicas would index the same ClipImages at once" }}
{{- end }}
{{- end }}

{{/* Seed nodes, comma-separated: the external ones, or every pod of the quickstart cluster. */}}
{{- define "clip.redis.seeds" -}}
{{- if .Values.redis.deploy.enabled }}
{{- $name := include "clip.redis.fullname" . }}
{{- $seeds := list }}
{{- range $i := until 6 }}
{{- $seeds = append $seeds (printf "%s-%d.%s-headless.%s.svc.%s:6379" $name $i $name $.Release.Namespace $.Values.clusterDomain) }}
{{- end }}
{{- join "," $seeds }}
{{- else }}
{{- join "," .Values.redis.seeds }}
{{- end }}
{{- end }}

{{/* Command-line flags for Redis, common to `clip node` and `clip-controller`. */}}
{{- define "clip.redis.args" -}}
- --redis={{ include "clip.redis.seeds" . }}
- --redis-ttl={{ .Values.redis.ttl }}
{{- with .Values.redis.username }}
- --redis-username={{ . }}
{{- end }}
{{- if .Values.redis.tls.enabled }}
- --redis-tls
{{- end }}
{{- if .Values.redis.tls.caSecret.name }}
- --redis-ca-file=/etc/clip/redis-ca/ca.crt
{{- end }}
{{- end }}

{{/* Environment for Redis: the password from its Secret and, with a private CA, where to find it. */}}
{{- define "clip.redis.env" -}}
{{- with .Values.redis.passwordSecret.name }}
- name: CLIP_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.passwordSecret.key }}
{{- end }}
{{- end }}

{{- define "clip.redis.caVolumeMount" -}}
{{- if .Values.redis.tls.caSecret.name }}
- name: redis-ca
  mountPath: /etc/clip/redis-ca
  readOnly: true
{{- end }}
{{- end }}

{{- define "clip.redis.caVolume" -}}
{{- if .Values.redis.tls.caSecret.name }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.tls.caSecret.name }}
    items:
      - key: {{ .Values.redis.tls.caSecret.key }}
        path: ca.crt
{{- end }}
{{- end }}

{{/*
An init container that waits (at most five minutes) for the quickstart Redis Cluster to be
formed, so the first start does not crash-loop while the cluster-create Job runs. After the
deadline the main container starts anyway and reports the real error.
*/}}
{{- define "clip.redis.waitInitContainer" -}}
{{- if .Values.redis.deploy.enabled }}
- name: wait-for-redis
  image: {{ include "clip.image" (dict "image" .Values.redis.deploy.image "ctx" .) }}
  imagePullPolicy: {{ .Values.redis.deploy.image.pullPolicy }}
  command:
    - sh
    - -c
    - |
      deadline=$(( $(date +%s) + 300 ))
      until redis-cli -h "$SEED" -p 6379 cluster info 2>/dev/null | grep -q '^cluster_state:ok'; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
          echo "Redis Cluster at $SEED is not formed yet; starting anyway"
          exit 0
        fi
        echo "waiting for the Redis Cluster at $SEED"
        sleep 3
      done
  env:
    - name: SEED
      value: {{ include "clip.redis.fullname" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
    {{- with .Values.redis.passwordSecret.name }}
    - name: REDISCLI_AUTH
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $.Values.redis.passwordSecret.key }}
    {{- end }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  securityContext:
    {{- include "clip.restrictedSecurityContext" (dict "uid" 999) | nindent 4 }}
{{- end }}
{{- end }}

{{/* A container security context for the unprivileged containers: non-root, read-only root, no capabilities. */}}
{{- define "clip.restrictedSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}
