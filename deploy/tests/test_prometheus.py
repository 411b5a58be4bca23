"""A real Prometheus scrapes running PeerVault processes (`serve all`, and the three roles
split) on 127.0.0.1 after traffic; every dashboard query, template variables substituted, is
evaluated through Prometheus's HTTP API and must return data; the shipped alert rules load and
evaluate without error."""
import json
import math
import pathlib
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from cluster import Background, start_all, start_split, traffic
from conftest import CHART, dashboards, free_port, run, targets, tool

RULES = CHART / "files" / "alerts.rules.yaml"
SUBSTITUTE = {"$job": ".+", "$instance": ".+", "$__rate_interval": "15s"}


def substitute(expr):
    for k, v in SUBSTITUTE.items():
        expr = expr.replace(k, v)
    return expr


def api(prom, path, **params):
    url = f"http://{prom}/api/v1/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def has_data(prom, expr):
    data = api(prom, "query", query=expr)
    values = [float(s["value"][1]) for s in data["result"]] if data["resultType"] == "vector" else []
    if data["resultType"] == "scalar":
        values = [float(data["result"][1])]
    return any(not math.isnan(v) for v in values), len(data["result"])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    work = tmp_path_factory.mktemp("prom")
    nodes = []
    prom_proc = None
    background = []
    try:
        all_node = start_all(work / "all")
        nodes.append(all_node)
        split = start_split(work / "split", all_node.tls)
        nodes += split
        events, peer, blob = split
        port = free_port()
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": f"peervault-{n.role}", "static_configs": [{"targets": [n.admin]}]} for n in nodes
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        res = run([tool("promtool"), "check", "config", str(work / "prometheus.yml")])
        assert res.returncode == 0, res.stdout + res.stderr
        prom_log = open(work / "prometheus.log", "w")
        prom_proc = subprocess.Popen([tool("prometheus"), f"--config.file={work / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                     stdout=prom_log, stderr=subprocess.STDOUT)
        prom = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len([t for t in api(prom, "targets")["activeTargets"] if t["health"] == "up"]) == len(nodes):
                    break
            except OSError:
                pass
            assert prom_proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        else:
            raise AssertionError(f"Prometheus targets not up: {api(prom, 'targets')}")
        traffic(all_node.grpc, all_node.grpc, all_node.http, all_node.tls, work / "all")
        traffic(blob.grpc, events.grpc, events.http, blob.tls, work / "split")
        background = [Background(all_node.grpc, all_node.tls, work / "all"), Background(blob.grpc, blob.tls, work / "split", events.grpc)]
        yield prom, nodes
    finally:
        for b in background:
            b.stop()
        if prom_proc:
            prom_proc.terminate()
            prom_proc.wait(timeout=20)
        for n in nodes:
            n.stop()


def test_every_dashboard_query_returns_data(prometheus):
    prom, _ = prometheus
    queries = [(board, title, substitute(expr)) for board, b in dashboards().items() for title, expr in targets(b)]
    assert len(queries) > 60
    # Rates need two scrapes after the traffic, lag and alerts a metrics interval: poll, bounded.
    deadline = time.monotonic() + 90
    while True:
        missing = [(board, title, expr) for board, title, expr in queries if not has_data(prom, expr)[0]]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, "queries without data:\n" + "\n".join(f"{b}/{t}: {e}" for b, t, e in missing)
    print(f"\n{len(queries)} dashboard queries returned data")


def test_variable_queries_return_every_process(prometheus):
    prom, nodes = prometheus
    jobs = {s["job"] for s in api(prom, "series", **{"match[]": "peervault_build_info"})}
    assert jobs == {f"peervault-{n.role}" for n in nodes}
    roles = {s["metric"]["role"] for s in api(prom, "query", query="peervault_build_info")["result"]}
    assert roles == {"all", "blob", "peer", "events"}


def test_split_roles_each_export_their_own_metrics(prometheus):
    prom, _ = prometheus
    for job, name in [("peervault-blob", "peervault_blob_files"), ("peervault-peer", "peervault_peer_up"),
                      ("peervault-events", "peervault_events_published_total"),
                      ("peervault-blob", "peervault_membership_view_size")]:
        ok, n = has_data(prom, f'{name}{{job="{job}"}}')
        assert ok, f"{job} exports no {name}"


def test_alert_rules_pass_promtool_and_evaluate_in_prometheus(prometheus):
    res = run([tool("promtool"), "check", "rules", str(RULES)])
    assert res.returncode == 0, res.stdout + res.stderr
    prom, _ = prometheus
    deadline = time.monotonic() + 30
    while True:
        groups = api(prom, "rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(1)
    shipped = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(shipped)
    for r in rules:
        assert r["health"] == "ok", f"{r['name']}: {r.get('lastError')}"
    # A healthy cluster fires none of them.
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert not firing, firing
