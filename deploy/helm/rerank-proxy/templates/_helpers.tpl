{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "rerank-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full resource name: <release>-<chart>, or the release alone when it already holds the chart name. */}}
{{- define "rerank-proxy.fullname" -}}
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

{{- define "rerank-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rerank-proxy.labels" -}}
helm.sh/chart: {{ include "rerank-proxy.chart" . }}
{{ include "rerank-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "rerank-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rerank-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rerank-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rerank-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Where the ConfigMap and the TLS Secret are mounted. */}}
{{- define "rerank-proxy.configDir" -}}/etc/rerank-proxy{{- end }}
{{- define "rerank-proxy.tlsDir" -}}/etc/rerank-proxy-tls{{- end }}

{{/*
The proxy's config.yaml: .Values.config, with the TLS file paths when tls.existingSecret is set.
Fails on what must not reach a ConfigMap (an API key, credentials in the upstream URL) and on an
admin listener the probes could not reach.
*/}}
{{- define "rerank-proxy.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $server := get $cfg "server" | default dict }}
{{- $upstream := get $cfg "upstream" | default dict }}
{{- $rerank := get $cfg "rerank" | default dict }}
{{- if hasKey $rerank "backend_api_key" }}
{{- if $rerank.backend_api_key }}
{{- fail "config.rerank.backend_api_key would be stored in a ConfigMap: put the key in a Secret and name it with secrets.existingSecret and secrets.backendApiKeyKey" }}
{{- end }}
{{- end }}
{{- range $name, $model := (get $cfg "models" | default dict) }}
{{- if and (kindIs "map" $model) (get $model "backend_api_key") }}
{{- fail (printf "config.models.%s.backend_api_key would be stored in a ConfigMap: leave it out (a model inherits the key from secrets.backendApiKeyKey)" $name) }}
{{- end }}
{{- end }}
{{- $url := toString (get $upstream "url" | default "") }}
{{- if regexMatch "^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@]*@" $url }}
{{- fail "config.upstream.url holds credentials and would be stored in a ConfigMap: put the whole URL in a Secret and name it with secrets.existingSecret and secrets.upstreamUrlKey" }}
{{- end }}
{{- if and (hasKey $server "admin_port") (eq (int (get $server "admin_port")) 0) }}
{{- fail "config.server.admin_port is 0: the probes and the ServiceMonitor need the admin listener" }}
{{- end }}
{{- if .Values.tls.existingSecret }}
{{- $_ := set $server "tls_cert_file" (printf "%s/tls.crt" (include "rerank-proxy.tlsDir" .)) }}
{{- $_ := set $server "tls_key_file" (printf "%s/tls.key" (include "rerank-proxy.tlsDir" .)) }}
{{- end }}
{{- $_ := set $cfg "server" $server }}
{{- toYaml $cfg }}
{{- end }}

{{- define "rerank-proxy.port" -}}
{{- int (dig "server" "port" 8000 (.Values.config | default dict)) }}
{{- end }}

{{- define "rerank-proxy.adminPort" -}}
{{- int (dig "server" "admin_port" 9901 (.Values.config | default dict)) }}
{{- end }}

{{/* preStopSleepSeconds + shutdown_timeout_s, rounded up: the least grace period that lets a drain finish. */}}
{{- define "rerank-proxy.drainSeconds" -}}
{{- $shutdown := dig "server" "shutdown_timeout_s" 30 (.Values.config | default dict) | float64 }}
{{- add (int .Values.preStopSleepSeconds) (int (ceil $shutdown)) }}
{{- end }}

{{- define "rerank-proxy.terminationGracePeriodSeconds" -}}
{{- $drain := int (include "rerank-proxy.drainSeconds" .) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 10 }}
{{- else }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- if le $grace $drain }}
{{- fail (printf "terminationGracePeriodSeconds %d must exceed preStopSleepSeconds + config.server.shutdown_timeout_s (%d)" $grace $drain) }}
{{- end }}
{{- $grace }}
{{- end }}
{{- end }}
