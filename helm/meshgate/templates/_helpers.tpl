{{/* Chart name. */}}
{{- define "meshgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name, <release>-meshgate unless the release already contains it. 58 chars leave room for "-peer". */}}
{{- define "meshgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 58 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 58 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 58 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "meshgate.peerServiceName" -}}
{{- printf "%s-peer" (include "meshgate.fullname" .) }}
{{- end }}

{{/* :authority the peer client sends so the sidecar matches pod-IP calls (STRICT mTLS). */}}
{{- define "meshgate.peerAuthority" -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "meshgate.peerServiceName" .) .Release.Namespace (int .Values.gateway.grpcPort) }}
{{- end }}

{{- define "meshgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meshgate.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "meshgate.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meshgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "meshgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "meshgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Seconds: preStop sleep + drain window + slack for Kafka flush, presence removal, deregistration. */}}
{{- define "meshgate.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.lifecycle.terminationGracePeriodSeconds }}
{{- add .Values.lifecycle.preStopSleepSeconds .Values.gateway.drainSeconds .Values.lifecycle.shutdownSlackSeconds }}
{{- else }}
{{- $min := add .Values.lifecycle.preStopSleepSeconds .Values.gateway.drainSeconds }}
{{- if lt (int .Values.lifecycle.terminationGracePeriodSeconds) (int $min) }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%v) must be at least preStopSleepSeconds + gateway.drainSeconds (%v)" .Values.lifecycle.terminationGracePeriodSeconds $min) }}
{{- end }}
{{- .Values.lifecycle.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding a credential, or "" if none. Args: (list $ctx "jwt"|"redis"|"consul") */}}
{{- define "meshgate.secretName" -}}
{{- $ctx := index . 0 }}
{{- $v := index $ctx.Values (index . 1) }}
{{- if $v.existingSecret }}{{ $v.existingSecret }}{{ else }}{{ include "meshgate.fullname" $ctx }}{{ end }}
{{- end }}

{{- define "meshgate.secretKey" -}}
{{- $ctx := index . 0 }}
{{- $v := index $ctx.Values (index . 1) }}
{{- if $v.existingSecret }}{{ $v.existingSecretKey }}{{ else }}{{ index . 2 }}{{ end }}
{{- end }}

{{- define "meshgate.hasJWT" -}}
{{- if or .Values.jwt.secret .Values.jwt.publicKey .Values.jwt.existingSecret .Values.jwt.jwksUrl }}true{{ end }}
{{- end }}

{{/* Where client JWT keys come from: JWKS (jwt.jwksUrl), else jwt.algorithm (HS256 | RS256). */}}
{{- define "meshgate.jwtKeySource" -}}
{{- if .Values.jwt.jwksUrl }}JWKS{{ else }}{{ .Values.jwt.algorithm }}{{ end }}
{{- end }}
{{- define "meshgate.hasRedisPassword" -}}
{{- if or .Values.redis.password .Values.redis.existingSecret }}true{{ end }}
{{- end }}
{{- define "meshgate.hasConsulToken" -}}
{{- if and .Values.consul.enabled (or .Values.consul.token .Values.consul.existingSecret) }}true{{ end }}
{{- end }}

{{/* Checks that cannot be expressed in the schema. */}}
{{- define "meshgate.validate" -}}
{{- if not .Values.region }}{{ fail "region is required (--region): set --set region=eu-west-1" }}{{ end }}
{{- if not (include "meshgate.hasJWT" .) }}{{ fail "jwt.secret, jwt.publicKey, jwt.existingSecret or jwt.jwksUrl is required: the gateway refuses unauthenticated clients off loopback" }}{{ end }}
{{- if and .Values.jwt.jwksUrl (or .Values.jwt.secret .Values.jwt.publicKey .Values.jwt.existingSecret) }}{{ fail "jwt.jwksUrl excludes jwt.secret, jwt.publicKey and jwt.existingSecret: pick one key source" }}{{ end }}
{{- if and .Values.jwt.secret .Values.jwt.publicKey }}{{ fail "set only one of jwt.secret (HS256) and jwt.publicKey (RS256)" }}{{ end }}
{{- if and (eq .Values.jwt.algorithm "HS256") .Values.jwt.publicKey }}{{ fail "jwt.publicKey needs jwt.algorithm=RS256" }}{{ end }}
{{- if and (eq .Values.jwt.algorithm "RS256") .Values.jwt.secret }}{{ fail "jwt.secret needs jwt.algorithm=HS256" }}{{ end }}
{{- if not (or .Values.istio.enabled .Values.grpcAuth.apiTokensSecret .Values.grpcAuth.peerTokensSecret .Values.grpcAuth.tlsSecret) }}{{ fail "the gRPC listener needs caller authentication off loopback: set istio.enabled (the sidecar's mTLS), grpcAuth.apiTokensSecret and grpcAuth.peerTokensSecret, or grpcAuth.tlsSecret" }}{{ end }}
{{- if and .Values.grpcAuth.peerIdentity (not .Values.grpcAuth.tlsSecret) }}{{ fail "grpcAuth.peerIdentity needs grpcAuth.tlsSecret" }}{{ end }}
{{- if and (eq .Values.gateway.presence "redis-cluster") (not .Values.redis.nodes) }}{{ fail "gateway.presence=redis-cluster needs redis.nodes" }}{{ end }}
{{- if and (eq .Values.gateway.presence "redis-sentinel") (not .Values.redis.sentinel.nodes) }}{{ fail "gateway.presence=redis-sentinel needs redis.sentinel.nodes" }}{{ end }}
{{- if and (eq .Values.gateway.presence "memory") (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}{{ fail "gateway.presence=memory is for a single gateway: use redis-cluster or redis-sentinel with more than one replica or HPA" }}{{ end }}
{{- if and .Values.consul.enabled (not .Values.consul.addr) (not .Values.consul.useHostIP) }}{{ fail "consul.enabled needs consul.addr or consul.useHostIP=true" }}{{ end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}{{ fail "autoscaling.minReplicas must not exceed maxReplicas" }}{{ end }}
{{- end }}
