{{/* Names, labels and the pieces every workload shares. */}}

{{- define "peervault.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "peervault.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "peervault.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "peervault.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: peervault
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "blob"). */}}
{{- define "peervault.selector" -}}
app.kubernetes.io/name: {{ include "peervault.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "peervault.componentLabels" -}}
{{ include "peervault.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "peervault.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "peervault.blobHeadless" -}}{{ include "peervault.fullname" . }}-blob-headless{{- end -}}
{{- define "peervault.eventsHeadless" -}}{{ include "peervault.fullname" . }}-events-headless{{- end -}}
{{- define "peervault.peerService" -}}{{ include "peervault.fullname" . }}-peer{{- end -}}
{{- define "peervault.peersConfigMap" -}}{{ include "peervault.fullname" . }}-peers{{- end -}}
{{- define "peervault.caSecret" -}}{{ include "peervault.fullname" . }}-ca{{- end -}}
{{- define "peervault.clientSecret" -}}{{ include "peervault.fullname" . }}-client-tls{{- end -}}

{{/* The in-cluster DNS suffix of a Service: <svc>.<ns>.svc */}}
{{- define "peervault.svcHost" -}}{{ .name }}.{{ .ctx.Release.Namespace }}.svc{{- end -}}

{{/*
The generated CA, made once per render and kept across upgrades: an existing Secret is reused
(lookup), else a new Ed25519 CA (PKCS#8, which `peervault certs issue` reads). Memoised in
.Values so that the Secret and the checksum annotations see the same CA.
*/}}
{{- define "peervault.generatedCA" -}}
{{- if not (hasKey .Values "__peervaultCA") -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "peervault.caSecret" .) -}}
{{- $ca := dict -}}
{{- if and $existing $existing.data (hasKey $existing.data "ca.crt") (hasKey $existing.data "ca.key") -}}
{{- $_ := set $ca "crt" (index $existing.data "ca.crt" | b64dec) -}}
{{- $_ := set $ca "key" (index $existing.data "ca.key" | b64dec) -}}
{{- $client := lookup "v1" "Secret" .Release.Namespace (include "peervault.clientSecret" .) -}}
{{- if and $client $client.data -}}
{{- $_ := set $ca "clientCrt" (index $client.data "client.crt" | b64dec) -}}
{{- $_ := set $ca "clientKey" (index $client.data "client.key" | b64dec) -}}
{{- end -}}
{{- else -}}
{{- $gen := genCAWithKey "PeerVault CA" (int .Values.tls.caDays) (genPrivateKey "ed25519") -}}
{{- $_ := set $ca "crt" $gen.Cert -}}
{{- $_ := set $ca "key" $gen.Key -}}
{{- end -}}
{{- if not (hasKey $ca "clientCrt") -}}
{{- $caObj := buildCustomCert ($ca.crt | b64enc) ($ca.key | b64enc) -}}
{{- $client := genSignedCert "peervault-admin-client" nil (list "admin.client.peervault") (int .Values.tls.caDays) $caObj -}}
{{- $_ := set $ca "clientCrt" $client.Cert -}}
{{- $_ := set $ca "clientKey" $client.Key -}}
{{- end -}}
{{- $_ := set .Values "__peervaultCA" $ca -}}
{{- end -}}
{{- toJson (get .Values "__peervaultCA") -}}
{{- end -}}

{{/* Checksum that rolls pods when their TLS material or configuration changes. */}}
{{- define "peervault.checksums" -}}
{{- if eq .Values.tls.mode "generated" }}
checksum/tls: {{ include "peervault.generatedCA" . | sha256sum }}
{{- end }}
checksum/config: {{ include (print .Template.BasePath "/config.yaml") . | sha256sum }}
{{- end -}}

{{/* Environment every role shares: (dict "ctx" $ "component" "blob"). */}}
{{- define "peervault.commonEnv" -}}
{{- $v := .ctx.Values -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: PEERVAULT_NODE_ID
  value: $(POD_NAME)
- name: PEERVAULT_DATA_DIR
  value: /data
- name: PEERVAULT_GRPC_LISTEN
  value: "0.0.0.0:{{ $v.service.grpcPort }}"
- name: PEERVAULT_HTTP_LISTEN
  value: "0.0.0.0:{{ $v.service.httpPort }}"
- name: PEERVAULT_ADMIN_LISTEN
  value: "0.0.0.0:{{ $v.service.adminPort }}"
- name: PEERVAULT_LOG
  value: {{ $v.log.level | quote }}
- name: PEERVAULT_LOG_FORMAT
  value: {{ $v.log.format | quote }}
- name: PEERVAULT_TRUST_DOMAIN
  value: {{ $v.trustDomain | quote }}
- name: PEERVAULT_TLS_CERT
  value: /tls/tls.crt
- name: PEERVAULT_TLS_KEY
  value: /tls/tls.key
- name: PEERVAULT_TLS_CLIENT_CA
  value: /tls/ca.crt
- name: PEERVAULT_TLS_CLIENT_AUTH
  value: {{ $v.auth.clientAuth | quote }}
- name: PEERVAULT_EVENTS_ENDPOINT
  value: "{{ include "peervault.svcHost" (dict "ctx" .ctx "name" (include "peervault.eventsHeadless" .ctx)) }}:{{ $v.service.grpcPort }}"
{{- if $v.auth.jwt.hs256SecretName }}
- name: PEERVAULT_JWT_HS256_SECRET_FILE
  value: /auth/jwt/{{ $v.auth.jwt.hs256SecretKey }}
{{- end }}
{{- with $v.auth.jwt.issuer }}
- name: PEERVAULT_JWT_ISSUER
  value: {{ . | quote }}
{{- end }}
{{- with $v.auth.jwt.audience }}
- name: PEERVAULT_JWT_AUDIENCE
  value: {{ . | quote }}
{{- end }}
{{- if $v.auth.scopes }}
- name: PEERVAULT_AUTH_CONFIG
  value: /config/auth.yaml
{{- end }}
{{- if $v.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: peervault-{{ .component }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $v.otel.samplerArg | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE){{ with $v.otel.resourceAttributes }},{{ . }}{{ end }}"
{{- end }}
{{- end -}}

{{/* Ports every container has. */}}
{{- define "peervault.ports" -}}
- name: grpc
  containerPort: {{ .Values.service.grpcPort }}
  protocol: TCP
- name: admin
  containerPort: {{ .Values.service.adminPort }}
  protocol: TCP
{{- end -}}

{{/* Kubelet probes on the admin port (kubelet gRPC probes cannot do TLS). */}}
{{- define "peervault.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: admin}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: admin}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: admin}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}

{{/*
TLS material of a pod: (dict "ctx" $ "component" "blob" "dns" (list ...)).
Generated mode: an init container issues the pod's certificate from the CA into an in-memory
emptyDir; the server container never sees the CA key.
*/}}
{{- define "peervault.certInit" -}}
{{- if eq .ctx.Values.tls.mode "generated" }}
- name: certs
  image: {{ include "peervault.image" .ctx }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  command: [/usr/local/bin/peervault]
  args:
    - certs
    - issue
    - --ca-cert=/ca/ca.crt
    - --ca-key=/ca/ca.key
    - --service={{ .component }}
    - --trust-domain={{ .ctx.Values.trustDomain }}
    - --dns={{ join "," .dns }}
    - --ip=$(POD_IP)
    - --out=/tls
  env:
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
  securityContext:
    {{- toYaml .ctx.Values.securityContext | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {cpu: 200m, memory: 64Mi}
  volumeMounts:
    - {name: ca, mountPath: /ca, readOnly: true}
    - {name: tls, mountPath: /tls}
{{- end }}
{{- end -}}

{{- define "peervault.tlsVolumes" -}}
{{- if eq .ctx.Values.tls.mode "generated" }}
- name: ca
  secret:
    secretName: {{ include "peervault.caSecret" .ctx }}
    defaultMode: 0440
- name: tls
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
{{- else }}
- name: tls
  secret:
    secretName: {{ include "peervault.fullname" .ctx }}-{{ .component }}-tls
    defaultMode: 0440
{{- end }}
- name: tmp
  emptyDir: {sizeLimit: 256Mi}
- name: config
  configMap:
    name: {{ include "peervault.fullname" .ctx }}-config
{{- if .ctx.Values.auth.jwt.hs256SecretName }}
- name: jwt
  secret:
    secretName: {{ .ctx.Values.auth.jwt.hs256SecretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "peervault.mounts" -}}
- {name: tls, mountPath: /tls, readOnly: true}
- {name: tmp, mountPath: /tmp}
- {name: config, mountPath: /config, readOnly: true}
{{- if .Values.auth.jwt.hs256SecretName }}
- {name: jwt, mountPath: /auth/jwt, readOnly: true}
{{- end }}
{{- end -}}

{{/* DNS names of a Service: short, namespaced, .svc and the cluster domain. */}}
{{- define "peervault.svcNames" -}}
{{- $ns := .ctx.Release.Namespace -}}
{{- $d := .ctx.Values.clusterDomain -}}
{{- list .name (printf "%s.%s" .name $ns) (printf "%s.%s.svc" .name $ns) (printf "%s.%s.svc.%s" .name $ns $d) | toJson -}}
{{- end -}}
