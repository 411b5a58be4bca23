"""Shared helpers of the deploy tests (chart, dashboards, Prometheus, containers).

Tools come from deploy/tests/install-tools.sh (helm, kubectl, kubernetes-validate, promtool,
prometheus); binaries from `cargo build -p peervault -p peervault-cli --bin peervault --bin pvault` (PEERVAULT_BIN_DIR,
default target/debug). A missing tool fails the test that needs it with a message naming the
install step: nothing is skipped silently.
"""
import copy
import functools
import json
import os
import pathlib
import shutil
import socket
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "peervault"
DASHBOARDS = CHART / "dashboards"
# Where cargo put the binaries: PEERVAULT_BIN_DIR, else CARGO_TARGET_DIR's debug/ (relative to the
# checkout, as cargo reads it), else target/debug.
BIN_DIR = pathlib.Path(
    os.environ.get("PEERVAULT_BIN_DIR")
    or ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "debug"
)


def tool(name):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not on PATH: run `eval \"$(bash deploy/tests/install-tools.sh)\"` first")
    return path


def binary(name):
    path = BIN_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `cargo build -p peervault -p peervault-cli --bin peervault --bin pvault` first")
    return str(path)


def run(args, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    return subprocess.run(args, **kw)


def render(*values_files, release="peervault", namespace="peervault", set_values=()):
    """`helm template` of the chart; returns the objects (dicts), in render order. Renders are
    cached per argument list (a fresh copy each call): every render generates a new CA, so two
    calls with the same arguments differ only there."""
    return copy.deepcopy(_render(tuple(map(str, values_files)), release, namespace, tuple(set_values)))


@functools.lru_cache(maxsize=None)
def _render(values_files, release, namespace, set_values):
    args = [tool("helm"), "template", release, str(CHART), "--namespace", namespace]
    for f in values_files:
        args += ["-f", str(f)]
    for s in set_values:
        args += ["--set", s]
    res = run(args)
    assert res.returncode == 0, f"helm template failed: {res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def metric_names():
    """The one list of metric names, from the binary that exports them."""
    res = run([binary("peervault"), "metrics", "names"])
    assert res.returncode == 0, res.stderr
    names = set(res.stdout.split())
    assert len(names) > 30, f"suspiciously few metric names: {sorted(names)}"
    return names


def dashboards():
    boards = {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}
    assert set(boards) == {"overview", "peers", "replication", "events"}, sorted(boards)
    return boards


def targets(board):
    """Every (panel title, expr) of a dashboard, rows' nested panels included."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))

    walk(board["panels"])
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
