"""Structure of the Grafana dashboards (no Grafana server here): panels, targets, datasource
references to the `datasource` variable, no `__inputs`, `$__rate_interval`, and only metric
names from the one list (`peervault metrics names`)."""
import json
import re
import subprocess
import sys

from conftest import DASHBOARDS, ROOT, dashboards, metric_names, targets

# Names a query may use besides the list: Prometheus's own and the standard process collector's.
EXTERNAL = {"up", "process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds",
            "process_open_fds", "process_max_fds", "process_virtual_memory_bytes", "process_threads"}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "irate", "histogram_quantile", "max", "min", "count", "avg",
                "without", "or", "and", "unless", "time", "changes", "le", "on", "ignoring", "group_left",
                "offset", "bool", "label_values", "vector", "abs", "clamp_min"}
SUFFIXES = ("_bucket", "_sum", "_count")


def metric_identifiers(expr):
    """Identifiers of a PromQL expression that are metric names (not functions, labels, keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    expr = re.sub(r"\{[^}]*\}", "{}", expr)                     # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping label lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)                      # ranges
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = m.group(0)
        rest = expr[m.end():].lstrip()
        if word in PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def base_name(name):
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def test_dashboards_equal_the_generator_output(tmp_path):
    before = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    res = subprocess.run([sys.executable, str(ROOT / "deploy" / "dashboards.py")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    after = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert before == after, "dashboards/*.json were edited by hand or not regenerated: run deploy/dashboards.py"
    # The plain-JSON folder at the root is the chart's folder.
    assert (ROOT / "dashboards").resolve() == DASHBOARDS.resolve()


def test_no_inputs_and_a_datasource_variable():
    for name, b in dashboards().items():
        text = json.dumps(b)
        assert "__inputs" not in b and "__requires" not in b, name
        assert "${DS_" not in text, f"{name}: import-time datasource placeholder"
        variables = {v["name"]: v for v in b["templating"]["list"]}
        ds = variables["datasource"]
        assert ds["type"] == "datasource" and ds["query"] == "prometheus", name
        for v in variables.values():
            if v["type"] == "query":
                assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (name, v["name"])
        assert b["uid"].startswith("peervault-") and b["title"].startswith("PeerVault / "), name
        assert isinstance(b["schemaVersion"], int) and b["schemaVersion"] >= 36, name


def test_panels_and_targets_are_well_formed():
    uids = set()
    for name, b in dashboards().items():
        assert b["uid"] not in uids
        uids.add(b["uid"])
        ids = [p["id"] for p in b["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        graphs = [p for p in b["panels"] if p["type"] not in ("row", "text")]
        assert len(graphs) >= 4, name
        for p in b["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (name, p["title"])
        for p in graphs:
            where = f"{name}/{p['title']}"
            assert p["type"] in ("timeseries", "stat", "state-timeline", "gauge", "table"), where
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert p["targets"], f"{where}: no targets"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), where
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"], where
                assert t["expr"].strip(), where
        # Panels do not overlap.
        cells = set()
        for p in b["panels"]:
            g = p["gridPos"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}/{p['title']} overlaps another panel"
                    cells.add((x, y))


def test_rates_use_rate_interval_and_selectors_use_the_variables():
    for name, b in dashboards().items():
        for title, expr in targets(b):
            for m in re.finditer(r"\b(rate|irate|increase|changes)\s*\(", expr):
                # The range vector of every such function is [$__rate_interval].
                depth, i = 1, m.end()
                while depth and i < len(expr):
                    depth += {"(": 1, ")": -1}.get(expr[i], 0)
                    i += 1
                inner = expr[m.end(): i]
                assert "[$__rate_interval]" in inner, f"{name}/{title}: {expr}"
            assert re.search(r"\[(?!\$__rate_interval\])", expr) is None, f"{name}/{title}: fixed range in {expr}"
            for sel in re.findall(r"\{([^}]*)\}", expr):
                assert 'job=~"$job"' in sel and 'instance=~"$instance"' in sel, f"{name}/{title}: {expr}"


def test_queries_use_only_exported_metric_names():
    known = metric_names()
    used = set()
    for name, b in dashboards().items():
        for title, expr in targets(b):
            for ident in metric_identifiers(expr):
                used.add(base_name(ident))
                assert base_name(ident) in known or ident in EXTERNAL, f"{name}/{title}: {ident} is not exported"
    # Every variable query too.
    for name, b in dashboards().items():
        for v in b["templating"]["list"]:
            if v["type"] == "query":
                inner = re.search(r"label_values\((\w+)", v["query"]["query"]).group(1)
                assert inner in known, (name, v["name"])
    # The overview covers the conventional gRPC metrics.
    for n in ("grpc_server_started_total", "grpc_server_handled_total", "grpc_server_handling_seconds"):
        assert n in used


def test_replication_dashboard_lists_only_names_in_the_code():
    """The replication dashboard uses only exported names, and every peervault_replication_*
    name the blob service exports has a panel."""
    known = metric_names()
    b = dashboards()["replication"]
    used = {base_name(i) for _, e in targets(b) for i in metric_identifiers(e)}
    replication = {n for n in known if n.startswith("peervault_replication_")}
    assert used <= known
    assert replication <= used, f"replication metrics without a panel: {sorted(replication - used)}"


def test_metric_identifier_parser():
    assert metric_identifiers('histogram_quantile(0.99, sum by (le, grpc_method) (rate(x_bucket{a="b"}[$__rate_interval])))') == {"x_bucket"}
    assert metric_identifiers('count(a == 0) or (sum(b{job=~"$job"}) * 0)') == {"a", "b"}
    assert metric_identifiers("time() - max by (instance) (c)") == {"c"}


def test_observability_doc_lists_every_metric():
    doc = (ROOT / "docs" / "observability.md").read_text()
    missing = sorted(n for n in metric_names() if f"`{n}" not in doc)
    assert not missing, f"docs/observability.md does not list: {missing}"
