"""The Helm chart: lint, render every values file, Kubernetes schema validation, and assertions
on what the render contains (no API server is needed or used)."""
import copy
import pathlib
import tempfile
import time

import pytest
import yaml

from conftest import CHART, DASHBOARDS, ROOT, _render, render, run, tool

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
WORKLOADS = ("StatefulSet", "Deployment")


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(objs):
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objs if o["kind"] in WORKLOADS]


def test_ci_values_cover_each_feature():
    names = {p.name for p in CI_VALUES}
    for want in ("default-values.yaml", "cert-manager-values.yaml", "monitoring-values.yaml",
                 "networkpolicy-values.yaml", "token-auth-values.yaml", "dev-emptydir-values.yaml"):
        assert want in names, f"ci/{want} missing"


@pytest.mark.parametrize("values", [None] + CI_VALUES, ids=lambda v: v.name if v else "defaults")
def test_lint_strict(values):
    args = [tool("helm"), "lint", "--strict", str(CHART)]
    if values:
        args += ["-f", str(values)]
    res = run(args)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("values", [None] + CI_VALUES, ids=lambda v: v.name if v else "defaults")
def test_every_object_validates_against_kubernetes_1_34(values, tmp_path):
    objs = render(*([values] if values else []))
    core = [o for o in objs if "/" not in o["apiVersion"] or o["apiVersion"].split("/")[0].endswith(".k8s.io")
            or o["apiVersion"].split("/")[0] in ("apps", "policy")]
    f = tmp_path / "render.yaml"
    f.write_text(yaml.safe_dump_all(core))
    res = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", "1.34.0", str(f)])
    assert res.returncode == 0, res.stdout + res.stderr
    # Custom resources have no schema in kubernetes-validate: check their shape here.
    for o in objs:
        group = o["apiVersion"].split("/")[0]
        if group == "cert-manager.io":
            assert o["apiVersion"] == "cert-manager.io/v1" and o["kind"] in ("Certificate", "Issuer")
            if o["kind"] == "Certificate":
                spec = o["spec"]
                assert spec["secretName"] and spec["issuerRef"]["name"], o["metadata"]["name"]
                assert set(spec) <= {"secretName", "duration", "renewBefore", "privateKey", "usages", "uris",
                                     "dnsNames", "issuerRef", "isCA", "commonName"}, sorted(spec)
        elif group == "monitoring.coreos.com":
            assert o["apiVersion"] == "monitoring.coreos.com/v1" and o["kind"] in ("ServiceMonitor", "PrometheusRule")


@pytest.mark.parametrize("values", [None] + CI_VALUES, ids=lambda v: v.name if v else "defaults")
def test_every_container_is_locked_down(values):
    objs = render(*([values] if values else []))
    specs = pod_specs(objs)
    assert len(specs) == 3
    for name, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert psc["runAsUser"] != 0 and psc["fsGroup"] == psc["runAsGroup"], name
        containers = spec["containers"] + spec.get("initContainers", [])
        for c in containers:
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert "privileged" not in sc or sc["privileged"] is False, where
            assert c["resources"]["requests"] and c["resources"]["limits"], where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
            # A read-only root needs a writable /tmp.
            if c in spec["containers"]:
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert {"/tmp", "/data", "/tls"} <= mounts, where


@pytest.mark.parametrize("values", [None] + CI_VALUES, ids=lambda v: v.name if v else "defaults")
def test_rbac_is_exactly_endpointslices_and_the_peers_configmap(values):
    objs = render(*([values] if values else []))
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    roles = by_kind(objs, "Role")
    assert len(roles) == 1
    rules = sorted(roles[0]["rules"], key=lambda r: r["resources"])
    cm = one(objs, "ConfigMap", "peervault-peers")
    assert rules == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [cm["metadata"]["name"]], "verbs": ["get", "update"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
    ]
    rb = by_kind(objs, "RoleBinding")
    assert len(rb) == 1 and rb[0]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[0]["metadata"]["name"]}
    sa = by_kind(objs, "ServiceAccount")
    assert len(sa) == 1 and rb[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa[0]["metadata"]["name"], "namespace": "peervault"}]
    peer = one(objs, "Deployment", "peervault-peer")["spec"]["template"]["spec"]
    assert peer["serviceAccountName"] == sa[0]["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in peer["containers"][0]["env"]}
    assert env["PEERVAULT_PEER_CONFIGMAP"] == cm["metadata"]["name"] and env["PEERVAULT_DISCOVERY"] == "kubernetes"
    # The ConfigMap carries no data: upgrades must not overwrite what the peer service wrote.
    assert "data" not in cm
    # Nobody else gets an API token.
    for o in objs:
        if o["kind"] in WORKLOADS and o["metadata"]["name"] != "peervault-peer":
            assert o["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, o["metadata"]["name"]


def test_blob_statefulset_services_pdb_and_spread():
    objs = render()
    sts = one(objs, "StatefulSet", "peervault-blob")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    sel = sts["spec"]["selector"]["matchLabels"]
    assert sel.items() <= pod_labels.items()
    headless = one(objs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"] == sel
    assert "grpc" in {p["name"] for p in headless["spec"]["ports"]}
    client = one(objs, "Service", "peervault-blob")
    assert client["spec"]["type"] == "ClusterIP" and client["spec"]["selector"] == sel
    pdb = one(objs, "PodDisruptionBudget", "peervault-blob")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": sel}}
    spread = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for c in spread:
        assert c["maxSkew"] == 1 and c["labelSelector"]["matchLabels"] == sel
        assert c["whenUnsatisfiable"] == "ScheduleAnyway"
    # Data on PVCs by default; the grace period covers --shutdown-grace.
    vct = sts["spec"]["volumeClaimTemplates"]
    assert [v["metadata"]["name"] for v in vct] == ["data"]
    assert vct[0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    spec = sts["spec"]["template"]["spec"]
    assert "data" not in {v["name"] for v in spec["volumes"]}
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert spec["terminationGracePeriodSeconds"] >= int(env["PEERVAULT_SHUTDOWN_GRACE"].rstrip("s")) + 10
    assert sts["spec"]["replicas"] == 3


def test_emptydir_data_only_when_asked_for_by_name():
    objs = render(CHART / "ci" / "dev-emptydir-values.yaml")
    sts = one(objs, "StatefulSet", "peervault-blob")
    assert "volumeClaimTemplates" not in sts["spec"]
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["data"] == {"name": "data", "emptyDir": {}}
    # Every other values file keeps data on PVCs.
    for f in CI_VALUES:
        if f.name != "dev-emptydir-values.yaml":
            assert "volumeClaimTemplates" in one(render(f), "StatefulSet", "peervault-blob")["spec"], f.name


@pytest.mark.parametrize("values", [None] + CI_VALUES, ids=lambda v: v.name if v else "defaults")
def test_probes_on_the_admin_port(values):
    objs = render(*([values] if values else []))
    for name, spec in pod_specs(objs):
        c = spec["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PEERVAULT_ADMIN_LISTEN"].endswith(f":{ports['admin']}"), name
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, name
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, name
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, name


def test_services_are_wired_to_each_other():
    objs = render()
    services = {o["metadata"]["name"]: o for o in by_kind(objs, "Service")}
    assert set(services) == {"peervault-blob", "peervault-blob-headless", "peervault-peer",
                             "peervault-events", "peervault-events-headless"}
    assert services["peervault-events-headless"]["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in services["peervault-events"]["spec"]["ports"]} == {"grpc", "http"}
    for name, spec in pod_specs(objs):
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["PEERVAULT_EVENTS_ENDPOINT"] == "peervault-events-headless.peervault.svc:8082", name
        assert env["PEERVAULT_TLS_CERT"] == "/tls/tls.crt" and env["PEERVAULT_TLS_CLIENT_CA"] == "/tls/ca.crt"
    blob = one(objs, "StatefulSet", "peervault-blob")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in blob["containers"][0]["env"]}
    assert env["PEERVAULT_PEER_ENDPOINT"] == "peervault-peer.peervault.svc:8082"
    peer = one(objs, "Deployment", "peervault-peer")["spec"]["template"]["spec"]
    penv = {e["name"]: e.get("value") for e in peer["containers"][0]["env"]}
    assert penv["PEERVAULT_KUBE_SERVICE"] == "peervault-blob-headless" and penv["PEERVAULT_KUBE_PORT_NAME"] == "grpc"
    # peer and events verify API keys through blob (the replicated key records); blob itself
    # holds them and needs no endpoint.
    events = one(objs, "Deployment", "peervault-events")["spec"]["template"]["spec"]
    eenv = {e["name"]: e.get("value") for e in events["containers"][0]["env"]}
    for e in (penv, eenv):
        assert e["PEERVAULT_AUTH_ENDPOINT"] == "peervault-blob.peervault.svc:8082"
    assert "PEERVAULT_AUTH_ENDPOINT" not in env


def test_generated_tls_issues_each_pod_its_identity():
    objs = render()
    ca = one(objs, "Secret", "peervault-ca")
    assert set(ca["data"]) == {"ca.crt", "ca.key"}
    client = one(objs, "Secret", "peervault-client-tls")
    assert set(client["data"]) == {"ca.crt", "client.crt", "client.key"}
    for name, spec in pod_specs(objs):
        init = spec["initContainers"]
        assert len(init) == 1 and init[0]["args"][:2] == ["certs", "issue"], name
        component = name.rsplit("-", 1)[1]
        assert f"--service={component}" in init[0]["args"], name
        # Only the init container sees the CA key.
        assert {m["name"] for m in init[0]["volumeMounts"]} == {"ca", "tls"}
        assert "ca" not in {m["name"] for m in spec["containers"][0]["volumeMounts"]}
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["ca"]["secret"]["secretName"] == "peervault-ca"
        assert vols["tls"]["emptyDir"]["medium"] == "Memory"
    blob = one(objs, "StatefulSet", "peervault-blob")["spec"]["template"]["spec"]["initContainers"][0]
    dns = next(a for a in blob["args"] if a.startswith("--dns=")).split("=", 1)[1].split(",")
    # The peer service dials StatefulSet pods by <hostname>.<headless>.<ns>.svc.
    assert "$(POD_NAME).peervault-blob-headless.peervault.svc" in dns


def test_cert_manager_tls_has_service_identities():
    objs = render(CHART / "ci" / "cert-manager-values.yaml")
    assert not [o for o in by_kind(objs, "Secret")], "cert-manager mode must not generate Secrets"
    certs = {o["metadata"]["name"]: o["spec"] for o in by_kind(objs, "Certificate")}
    for component in ("blob", "peer", "events"):
        spec = certs[f"peervault-{component}"]
        assert spec["uris"] == [f"spiffe://peervault.local/peervault/{component}"]
        assert spec["privateKey"]["rotationPolicy"] == "Always"
        assert spec["issuerRef"] == {"name": "peervault-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert "*.peervault-blob-headless.peervault.svc" in certs["peervault-blob"]["dnsNames"]
    assert certs["peervault-ca"]["isCA"] is True
    for name, spec in pod_specs(objs):
        assert "initContainers" not in spec, name
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["tls"]["secret"]["secretName"] == f"{name}-tls"
    issuer = render(CHART / "ci" / "cert-manager-issuer-values.yaml")
    assert not by_kind(issuer, "Issuer")
    for o in by_kind(issuer, "Certificate"):
        assert o["spec"]["issuerRef"]["name"] == "corp-ca" and o["spec"]["issuerRef"]["kind"] == "ClusterIssuer"


def test_pods_roll_when_config_or_secrets_change():
    def checksums(*sets):
        objs = render(set_values=sets)
        return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["annotations"] for o in objs if o["kind"] in WORKLOADS}

    a = checksums()
    b = checksums("auth.scopes.default_certificate_scopes=read")
    for name in a:
        assert a[name]["checksum/config"] != b[name]["checksum/config"], name
        assert "checksum/tls" in a[name], name
        # A new CA (a fresh render without lookup) changes the TLS checksum.
        assert a[name]["checksum/tls"] != b[name]["checksum/tls"], name
    c = checksums("tls.mode=certManager")
    assert all("checksum/tls" not in v for v in c.values()), "cert-manager rotations reload in place"


def test_token_auth_and_otel_values_reach_the_pods():
    objs = render(CHART / "ci" / "token-auth-values.yaml")
    cfg = one(objs, "ConfigMap", "peervault-config")
    scopes = yaml.safe_load(cfg["data"]["auth.yaml"])
    assert scopes["subjects"]["system:serviceaccount:apps:uploader"]["key_prefix"] == "uploads/"
    for name, spec in pod_specs(objs):
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["PEERVAULT_JWT_HS256_SECRET_FILE"] == "/auth/jwt/secret", name
        assert env["PEERVAULT_TLS_CLIENT_AUTH"] == "optional" and env["PEERVAULT_AUTH_CONFIG"] == "/config/auth.yaml"
        assert {v["name"]: v for v in spec["volumes"]}["jwt"]["secret"]["secretName"] == "peervault-jwt"
    events = one(objs, "Deployment", "peervault-events")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "PEERVAULT_WS_TOKEN_AUTH", "value": "true"} in events["env"]
    mon = render(CHART / "ci" / "monitoring-values.yaml")
    for name, spec in pod_specs(mon):
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and env["OTEL_TRACES_SAMPLER_ARG"] == "1.0"
        assert env["OTEL_SERVICE_NAME"] == name.replace("peervault-", "peervault-")
    # No trace export unless asked for.
    for name, spec in pod_specs(render()):
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in {e["name"] for e in spec["containers"][0]["env"]}


def test_monitoring_objects():
    objs = render(CHART / "ci" / "monitoring-values.yaml")
    sm = one(objs, "ServiceMonitor", "peervault")
    sel = sm["spec"]["selector"]["matchLabels"]
    scraped = [o for o in by_kind(objs, "Service") if sel.items() <= o["metadata"]["labels"].items()]
    assert {o["metadata"]["name"] for o in scraped} == {"peervault-blob-headless", "peervault-peer", "peervault-events-headless"}
    for s in scraped:
        assert "admin" in {p["name"] for p in s["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["port"] == "admin" and sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rule = one(objs, "PrometheusRule", "peervault")
    shipped = yaml.safe_load((CHART / "files" / "alerts.rules.yaml").read_text())
    assert rule["spec"] == shipped
    assert not by_kind(render(), "ServiceMonitor") and not by_kind(render(), "PrometheusRule")


def test_dashboards_ship_as_labelled_configmaps():
    objs = render()
    cms = [o for o in by_kind(objs, "ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(cms) == 4
    import json
    for cm in cms:
        (key, text), = cm["data"].items()
        name = key.removeprefix("peervault-").removesuffix(".json")
        assert json.loads(text) == json.loads((DASHBOARDS / f"{name}.json").read_text()), key
    assert not [o for o in by_kind(render(CHART / "ci" / "dev-emptydir-values.yaml"), "ConfigMap")
                if o["metadata"].get("labels", {}).get("grafana_dashboard")]


def test_network_policies_allow_only_the_designed_paths():
    objs = render(CHART / "ci" / "networkpolicy-values.yaml")
    nps = {o["metadata"]["name"]: o["spec"] for o in by_kind(objs, "NetworkPolicy")}
    assert set(nps) == {"peervault-blob", "peervault-peer", "peervault-events"}
    for name, spec in nps.items():
        assert spec["policyTypes"] == ["Ingress", "Egress"], name
        ports = sorted(p["port"] for rule in spec["ingress"] for p in rule["ports"])
        assert ports == ([8082, 8083, 9090] if name.endswith("events") else [8082, 9090]), name
        assert spec["ingress"][1]["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    egress_to = lambda name: [t.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                              for rule in nps[name]["egress"] for t in rule.get("to", [])]
    assert sorted(filter(None, egress_to("peervault-blob"))) == ["blob", "events", "peer"]
    assert sorted(filter(None, egress_to("peervault-peer"))) == ["blob", "events"]
    assert sorted(filter(None, egress_to("peervault-events"))) == ["blob"]
    assert not by_kind(render(), "NetworkPolicy")


@pytest.mark.parametrize("bad", [
    "blob.replicas=three", "tls.mode=selfsigned", "blob.persistence.type=hostPath", "service.grpcPort=http",
    "blob.shutdownGrace=30", "otel.samplerArg=2", "unknownKey=1", "blob.pdb.maxUnavailable=0",
    "auth.clientAuth=maybe", "events.websocket.tokenAuth=yes",
])
def test_schema_rejects_wrong_values(bad):
    key, value = bad.split("=", 1)
    args = [tool("helm"), "template", "x", str(CHART)]
    # --set-string keeps "yes"/"30"/"three" strings, so the schema sees the wrong type.
    args += ["--set-string" if not value.isdigit() or key == "blob.shutdownGrace" else "--set", bad]
    res = run(args)
    assert res.returncode != 0, f"{bad} was accepted"
    assert "schema" in res.stderr, res.stderr


def test_k8s_manifests_equal_the_default_render():
    """k8s/ is the chart's default render (release and namespace `peervault`) minus the two
    Secrets the chart generates, which a user of plain manifests creates (docs/kubernetes.md).
    Also prints the render's wall time (docs/kubernetes.md reports it)."""
    start = time.monotonic()
    fresh = _render.__wrapped__((), "peervault", "peervault", ())  # uncached
    print(f"\nchart render (helm template, defaults): {(time.monotonic() - start) * 1000:.0f} ms")
    want = normalise(fresh)
    kust = yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())
    assert kust["namespace"] == "peervault"
    have = []
    for f in kust["resources"]:
        have += [d for d in yaml.safe_load_all((ROOT / "k8s" / f).read_text()) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])
    assert sorted(map(key, have)) == sorted(map(key, want)), "k8s/ objects differ: run deploy/render-k8s.sh"
    have_by = {key(o): o for o in have}
    for o in want:
        assert have_by[key(o)] == o, f"{key(o)} differs from the chart's render: run deploy/render-k8s.sh"


def normalise(objs):
    out = []
    for o in objs:
        if o["kind"] == "Secret" and o["metadata"].get("annotations", {}).get("peervault.io/generated") == "true":
            continue
        o = copy.deepcopy(o)
        ann = o.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        if "checksum/tls" in ann:
            ann["checksum/tls"] = "created-by-you"
        out.append(o)
    return out


@pytest.mark.parametrize("mode", ["generated", "certManager"])
def test_notes_tell_how_to_connect(mode, tmp_path):
    """`helm template` does not render NOTES.txt: render it through a copy of the chart."""
    import shutil
    chart = tmp_path / "peervault"
    shutil.copytree(CHART, chart)
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "NOTES.copy")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |-\n"
        '{{ tpl (.Files.Get "NOTES.copy") . | indent 4 }}\n')
    res = run([tool("helm"), "template", "pv", str(chart), "-n", "store", "--set", f"tls.mode={mode}",
               "--show-only", "templates/zz-notes.yaml"])
    assert res.returncode == 0, res.stderr
    notes = yaml.safe_load(res.stdout)["data"]["notes"]
    for want in ("pv-peervault-blob.store.svc:8082", "pv-peervault-events.store.svc:8082",
                 "wss://pv-peervault-events.store.svc:8083/ws", "port-forward svc/pv-peervault-blob 8082:8082",
                 "pvault --server pv-peervault-blob:8082 --tls-dir pv-tls", "rollout status statefulset/pv-peervault-blob"):
        assert want in notes, f"{want!r} missing from NOTES:\n{notes}"
    key = "client" if mode == "generated" else "tls"
    assert f"jsonpath={{.data.{key}\\.key}}" in notes, notes


def test_k8s_kustomization_builds_with_kubectl():
    res = run([tool("kubectl"), "kustomize", str(ROOT / "k8s")])
    assert res.returncode == 0, res.stderr
    objs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert len(objs) == len(normalise(render()))
    for o in objs:
        assert o["metadata"]["namespace"] == "peervault", (o["kind"], o["metadata"]["name"])
