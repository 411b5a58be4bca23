"""Local PeerVault processes for the deploy tests: `serve all` and the three roles split, on
127.0.0.1 free ports, sharing one development TLS folder, plus the traffic that makes every
dashboard panel's series exist (uploads, downloads, a missing key, a bad token, a handshake
without a certificate, a bad WebSocket message, a stalled subscriber that lags, an alert)."""
import base64
import os
import pathlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request

from conftest import binary, free_port


def wait_ready(admin, proc, log, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}: {pathlib.Path(log).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{admin} not ready after {timeout}s: {pathlib.Path(log).read_text()[-2000:]}")


class Node:
    def __init__(self, role, workdir, extra=(), tls_from=None, env=None):
        self.role = role
        self.dir = pathlib.Path(workdir) / role
        self.dir.mkdir(parents=True, exist_ok=True)
        if tls_from:
            shutil.copytree(tls_from, self.dir / "tls", dirs_exist_ok=True)
        self.grpc = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.admin = f"127.0.0.1:{free_port()}"
        self.log = self.dir / "log.txt"
        args = [binary("peervault"), "serve", role, "--data-dir", str(self.dir), "--grpc-listen", self.grpc,
                "--http-listen", self.http, "--admin-listen", self.admin, "--metrics-interval", "1s",
                "--node-id", f"{role}-0", *extra]
        e = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen(args, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=e)
        wait_ready(self.admin, self.proc, self.log)

    @property
    def tls(self):
        return self.dir / "tls"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_all(workdir, env=None):
    return Node("all", workdir, ["--events-subscriber-queue", "8", "--alert-auth-failures", "1"], env=env)


def start_split(workdir, tls_from, env=None):
    """events, then peer (static discovery of the blob address), then blob."""
    events = Node("events", workdir, ["--events-subscriber-queue", "8", "--alert-auth-failures", "1"],
                  tls_from=tls_from, env=env)
    blob_grpc = f"127.0.0.1:{free_port()}"
    peer = Node("peer", workdir, ["--events-endpoint", events.grpc, "--peers", blob_grpc, "--probe-interval", "500ms"],
                tls_from=tls_from, env=env)
    blob = Node.__new__(Node)
    blob.role, blob.dir = "blob", pathlib.Path(workdir) / "blob"
    blob.dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tls_from, blob.dir / "tls", dirs_exist_ok=True)
    blob.grpc, blob.http, blob.admin = blob_grpc, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    blob.log = blob.dir / "log.txt"
    args = [binary("peervault"), "serve", "blob", "--data-dir", str(blob.dir), "--grpc-listen", blob.grpc,
            "--http-listen", blob.http, "--admin-listen", blob.admin, "--metrics-interval", "1s", "--node-id", "blob-0",
            "--peer-endpoint", peer.grpc, "--events-endpoint", events.grpc]
    blob.proc = subprocess.Popen(args, stdout=open(blob.log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
    wait_ready(blob.admin, blob.proc, blob.log)
    return events, peer, blob


def pvault(server, tls_dir, *args, check=True, timeout=120, token=None):
    cmd = [binary("pvault"), "--server", server.replace("127.0.0.1", "localhost"), "--tls-dir", str(tls_dir)]
    if token:
        cmd += ["--token", token]
    res = subprocess.run(cmd + list(args), capture_output=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"pvault {' '.join(args)}: {res.stderr.decode()}"
    return res


def ws_send(http_addr, tls_dir, messages):
    """A minimal WebSocket client (stdlib only): connects to /ws, sends text frames, closes.
    Plain HTTP first; TLS with the development client certificate if the port speaks TLS."""
    host, port = http_addr.rsplit(":", 1)
    for use_tls in (False, True):
        sock = socket.create_connection((host, int(port)), timeout=5)
        if use_tls:
            ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
            ctx.load_cert_chain(str(tls_dir / "client.crt"), str(tls_dir / "client.key"))
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        except (ConnectionResetError, ssl.SSLError, socket.timeout):
            head = b""
        if head.startswith(b"HTTP/1.1 101"):
            break
        sock.close()
    else:
        raise AssertionError(f"no WebSocket upgrade at {http_addr}/ws: {head[:200]!r}")
    for text in messages:
        data = text.encode()
        mask = os.urandom(4)
        assert len(data) < 126
        frame = bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        sock.sendall(frame)
    time.sleep(0.3)
    sock.close()


def bad_handshake(grpc_addr):
    """A TLS client without a certificate: counted as a handshake failure by the server."""
    host, port = grpc_addr.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            with ctx.wrap_socket(s) as t:
                t.sendall(b"x")
                t.recv(1)
    except (OSError, ssl.SSLError):
        pass


def traffic(blob_grpc, events_grpc, events_http, tls_dir, workdir):
    """One round of everything the dashboards show."""
    workdir = pathlib.Path(workdir)
    # A subscriber that stops reading: with --events-subscriber-queue 8 it falls behind and is
    # told what it missed (lag notices, dropped events).
    watcher = subprocess.Popen([binary("pvault"), "--server", events_grpc.replace("127.0.0.1", "localhost"),
                                "--tls-dir", str(tls_dir), "events", "watch"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    watcher.send_signal(signal.SIGSTOP)
    try:
        big = workdir / "big.bin"
        big.write_bytes(os.urandom(300_000))
        pvault(blob_grpc, tls_dir, "put", str(big))
        pvault(blob_grpc, tls_dir, "get", "big.bin", str(workdir / "back.bin"))
        assert (workdir / "back.bin").read_bytes() == big.read_bytes()
        pvault(blob_grpc, tls_dir, "bench", "--size-mib", "1", "--small-count", "300", "--small-size", "512",
               "--subscribers", "0", timeout=300)
    finally:
        watcher.send_signal(signal.SIGCONT)
    time.sleep(1)
    watcher.terminate()
    watcher.wait(timeout=10)
    assert pvault(blob_grpc, tls_dir, "get", "no-such-key", check=False).returncode != 0
    assert pvault(blob_grpc, tls_dir, "ls", check=False, token="pvk_bogus").returncode != 0
    bad_handshake(blob_grpc)
    ws_send(events_http, tls_dir, ['{"type":"subscribe","topic":"file_operations"}', "not json", '{"type":"ping"}'])


class Background:
    """Steady uploads and downloads while the dashboards' queries are evaluated, so that rates
    and quantiles have samples in every window."""

    def __init__(self, blob_grpc, tls_dir, workdir, events_grpc=None):
        # A subscriber that keeps up, so deliveries (and their latency) go on too.
        self.watcher = subprocess.Popen([binary("pvault"), "--server", (events_grpc or blob_grpc).replace("127.0.0.1", "localhost"),
                                         "--tls-dir", str(tls_dir), "events", "watch"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        f = pathlib.Path(workdir) / "small.txt"
        f.write_text("steady traffic\n")
        script = (f'while true; do "{binary("pvault")}" --server {blob_grpc.replace("127.0.0.1", "localhost")} '
                  f'--tls-dir {tls_dir} put {f} steady >/dev/null 2>&1; '
                  f'"{binary("pvault")}" --server {blob_grpc.replace("127.0.0.1", "localhost")} '
                  f'--tls-dir {tls_dir} get steady >/dev/null 2>&1; sleep 0.2; done')
        self.proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.watcher.terminate()
        self.watcher.wait(timeout=10)
