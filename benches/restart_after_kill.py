#!/usr/bin/env python3
"""Restart-to-ready after kill -9 on a large index (issue 11, defect 9), as JSON.

Fill a data dir first (release build; 10 M files take a few minutes):

    PV_GEN_DIR=/tmp/pv10m PV_GEN_FILES=10000000 \
      cargo test --release -p peervault-blob --lib generate_index -- --ignored --nocapture

then run, with release binaries built (`cargo build --release --bin peervault --bin pvault`):

    python3 benches/restart_after_kill.py /tmp/pv10m [rounds]

Each round starts `peervault serve all` on the data dir, waits for its "peervault ready" log
line, keeps uploads in flight with `pvault put`, kills the server with SIGKILL in the middle of
them, and times the next start until it reports ready (the index is opened, recovered and
checked by then). The first start (a clean open) is reported too.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"


def start(data_dir):
    """Starts the server; returns (process, seconds to ready, gRPC address)."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        [str(TARGET / "peervault"), "serve", "all", "--data-dir", str(data_dir),
         "--grpc-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        env={k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"},
    )
    for line in p.stdout:
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if v.get("message") == "peervault ready":
            return p, time.monotonic() - t0, v["grpc_addr"]
    p.wait()
    raise SystemExit(f"peervault exited with {p.returncode} before it was ready")


def pvault(data_dir, addr):
    env = dict(os.environ)
    env.update({
        "PEERVAULT_SERVER": "localhost:" + addr.rsplit(":", 1)[1],
        "PEERVAULT_TLS_DIR": str(pathlib.Path(data_dir) / "tls"),
        "PEERVAULT_STATE_DIR": str(pathlib.Path(data_dir) / "cli-state"),
        "PEERVAULT_CONFIG": "/dev/null",
    })
    env.pop("PEERVAULT_TOKEN", None)
    return env


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    data_dir = pathlib.Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    index = data_dir / "blob" / "index.redb"
    out = {"index_bytes": index.stat().st_size if index.exists() else None, "rounds": []}
    p, clean, addr = start(data_dir)
    out["clean_start_s"] = round(clean, 3)
    payload = os.urandom(256 * 1024)
    for r in range(rounds):
        env = pvault(data_dir, addr)
        puts = []
        for i in range(8):
            q = subprocess.Popen([str(TARGET / "pvault"), "put", "-q", "-", f"restart/{r}/{i}"],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=env)
            puts.append(q)
        for q in puts:
            try:
                q.stdin.write(payload)
                q.stdin.flush()
            except BrokenPipeError:
                pass
        done = subprocess.run([str(TARGET / "pvault"), "put", "-q", "-", f"restart/{r}/acked"],
                              input=b"acknowledged before the kill", env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        p.send_signal(signal.SIGKILL)
        p.wait()
        for q in puts:
            q.kill()
            q.wait()
        p, secs, addr = start(data_dir)
        got = subprocess.run([str(TARGET / "pvault"), "get", f"restart/{r}/acked", "-"],
                             env=pvault(data_dir, addr), capture_output=True)
        out["rounds"].append({
            "restart_to_ready_s": round(secs, 3),
            "acknowledged_put_ok": done.returncode == 0,
            "acknowledged_file_reads_back": got.stdout == b"acknowledged before the kill",
        })
    p.send_signal(signal.SIGTERM)
    p.wait()
    out["index_bytes_after"] = index.stat().st_size if index.exists() else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
