"""The image on a real Docker engine: built from a locally made base with the binaries cargo
built on the host (`--target prebuilt`), run read-only and non-root; on a Docker network made
for the test, three blob containers, one peer (DNS discovery through a network alias, as a
headless Service behaves) and one events container, driven with the CLI from the host.

Every container, volume, network and image the test makes is removed at the end. Without a
Docker engine the tests fail with a message saying so; they never skip."""
import json
import os
import pathlib
import random
import re
import subprocess
import time
import urllib.request

import pytest

from cluster import pvault
from conftest import BIN_DIR, ROOT, binary, run, tool

TAG = f"pvtest{os.getpid()}"
IMAGE = f"peervault:{TAG}"
BASE = f"peervault-test-base:{TAG}"


def docker(*args, check=True, timeout=300):
    res = run([tool("docker"), *args], timeout=timeout)
    if check:
        assert res.returncode == 0, f"docker {' '.join(args)}: {res.stderr or res.stdout}"
    return res


def has_replication():
    return "--replication-factor" in run([binary("peervault"), "serve", "--help"]).stdout


needs_replication = pytest.mark.xfail(
    condition=not has_replication(), strict=True,
    reason="needs blob replication (peervault serve has no --replication-factor yet); runs for real once it has",
)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30) if _which("docker") else None
    if info is None or info.returncode != 0:
        pytest.fail("the container tests need a running Docker engine (docker info failed: "
                    f"{info.stderr.strip() if info else 'docker not on PATH'})")
    rel = os.path.relpath(BIN_DIR, ROOT)
    assert not rel.startswith(".."), f"PEERVAULT_BIN_DIR {BIN_DIR} must be inside the build context {ROOT}"
    made = []
    try:
        res = run(["bash", str(ROOT / "deploy" / "tests" / "make-base.sh"), BASE, binary("peervault"), binary("pvault")])
        assert res.returncode == 0, res.stderr
        made.append(BASE)
        start = time.monotonic()
        docker("build", "-q", "--target", "prebuilt", "--build-arg", f"RUNTIME_IMAGE={BASE}",
               "--build-arg", f"BIN_DIR={rel}", "--build-arg", "REVISION=test", "-t", IMAGE, str(ROOT), timeout=600)
        made.append(IMAGE)
        size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
        print(f"\nimage {IMAGE}: {size / 1e6:.1f} MB ({rel} binaries), built in {time.monotonic() - start:.1f} s")
        yield IMAGE
    finally:
        for i in reversed(made):
            docker("image", "rm", "-f", i, check=False)


def _which(name):
    import shutil
    return shutil.which(name)


def test_image_is_non_root_labelled_and_runs_read_only(image):
    cfg = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert cfg["User"] == "65532:65532"
    assert cfg["Entrypoint"] == ["/usr/local/bin/peervault"] and cfg["Cmd"] == ["serve", "all"]
    for label in ("title", "description", "licenses", "source", "version", "revision"):
        assert cfg["Labels"].get(f"org.opencontainers.image.{label}"), label
    assert "PEERVAULT_DATA_DIR=/data" in cfg["Env"]
    out = docker("run", "--rm", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", image, "--version").stdout
    assert out.strip().startswith("peervault ")
    out = docker("run", "--rm", "--read-only", "--entrypoint", "/usr/local/bin/pvault", image, "--version").stdout
    assert out.strip().startswith("pvault ")
    # serve all on a read-only root: data on the volume, temporary files on /tmp.
    name = f"{TAG}-solo"
    try:
        docker("run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
               "-v", f"{name}-data:/data", "-p", "127.0.0.1::9090", image)
        admin = docker("port", name, "9090/tcp").stdout.split()[0]
        wait_ready(admin, name)
        ls = docker("exec", name, "/usr/local/bin/pvault", "--tls-dir", "/data/tls", "ls").stdout
        assert "KEY" in ls or ls == ""
    finally:
        docker("rm", "-f", "-v", name, check=False)
        docker("volume", "rm", "-f", f"{name}-data", check=False)


def wait_ready(admin, name, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        state = docker("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        assert state in ("running", "created"), f"{name} is {state}: {docker('logs', name, check=False).stdout[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{name} not ready: {docker('logs', name, check=False).stdout[-3000:]}")


class Cluster:
    """Three blob containers (alias `blob`), peer (DNS discovery of `blob`), events (alias `events`)."""

    def __init__(self, image, work, env=None):
        self.image, self.work = image, pathlib.Path(work)
        self.env = env or {}
        self.net = f"{TAG}-net"
        self.containers, self.volumes = [], []
        self.ips = {}
        for _ in range(10):
            subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
            if docker("network", "create", "--subnet", f"{subnet}.0/24", self.net, check=False).returncode == 0:
                break
        else:
            raise AssertionError("could not create a Docker network with a free subnet")
        self.subnet = subnet
        # The host, as the containers reach it on this network.
        self.gateway = f"{subnet}.1"
        self.ca = self.work / "ca"
        self.ca.mkdir(parents=True)
        # An Ed25519 CA, as the Helm chart makes one; each container's certificate is issued from
        # it with `peervault certs issue`, the chart's init-container command.
        run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(self.ca / "ca.key")], check=True)
        run(["openssl", "req", "-x509", "-new", "-key", str(self.ca / "ca.key"), "-subj", "/CN=PeerVault test CA",
             "-days", "2", "-out", str(self.ca / "ca.crt"), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True)
        self.client = self.work / "client"
        self.issue("client", ["blob", "peer", "events"], ["localhost"], ["127.0.0.1"], self.client)
        # pvault reads ca.crt, client.crt, client.key.
        (self.client / "client.crt").write_text((self.client / "tls.crt").read_text())
        (self.client / "client.key").write_text((self.client / "tls.key").read_text())
        self.start("events", "serve events", ip=10, aliases=["events"])
        self.start("peer", "serve peer --discovery dns --dns-name blob --dns-port 8082 --dns-interval 1s "
                           "--probe-interval 500ms --probe-timeout 500ms --events-endpoint events:8082", ip=11)
        for i in range(3):
            self.start(f"blob-{i}", "serve blob --peer-endpoint peer:8082 --events-endpoint events:8082",
                       ip=20 + i, aliases=["blob"], volume=True)

    def issue(self, service, services, dns, ips, out):
        res = run([binary("peervault"), "certs", "issue", "--ca-cert", str(self.ca / "ca.crt"), "--ca-key", str(self.ca / "ca.key"),
                   "--service", ",".join(services), "--dns", ",".join(dns), "--ip", ",".join(ips), "--out", str(out)])
        assert res.returncode == 0, res.stderr
        for f in out.iterdir():
            os.chown(f, 65532, 65532)

    def start(self, name, command, ip, aliases=(), volume=False):
        full = f"{TAG}-{name}"
        addr = f"{self.subnet}.{ip}"
        self.ips[name] = addr
        tls = self.work / f"tls-{name}"
        self.issue(name, [name.split("-")[0]], [name, full, *aliases, "localhost"], [addr, "127.0.0.1"], tls)
        args = ["run", "-d", "--name", full, "--hostname", name, "--network", self.net, "--ip", addr,
                "--network-alias", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", "-v", f"{tls}:/tls:ro",
                "-e", "PEERVAULT_TLS_CERT=/tls/tls.crt", "-e", "PEERVAULT_TLS_KEY=/tls/tls.key",
                "-e", "PEERVAULT_TLS_CLIENT_CA=/tls/ca.crt", "-e", f"PEERVAULT_NODE_ID={name}",
                "-e", "PEERVAULT_METRICS_INTERVAL=1s",
                "-p", "127.0.0.1::8082", "-p", "127.0.0.1::8083", "-p", "127.0.0.1::9090"]
        for a in aliases:
            args += ["--network-alias", a]
        for k, v in self.env.items():
            args += ["-e", f"{k}={v.replace('{gateway}', self.gateway)}"]
        if volume:
            vol = f"{full}-data"
            self.volumes.append(vol)
            args += ["-v", f"{vol}:/data"]
        else:
            args += ["--tmpfs", "/data:uid=65532,gid=65532"]
        docker(*args, self.image, *command.split())
        self.containers.append(full)
        wait_ready(self.port(name, 9090), full)

    def port(self, name, port):
        return docker("port", f"{TAG}-{name}", f"{port}/tcp").stdout.split()[0]

    def grpc(self, name):
        return self.port(name, 8082).replace("127.0.0.1", "localhost")

    def cli(self, name, *args, **kw):
        return pvault(self.grpc(name), self.client, *args, **kw)

    def close(self):
        for c in self.containers:
            docker("rm", "-f", "-v", c, check=False)
        for v in self.volumes:
            docker("volume", "rm", "-f", v, check=False)
        docker("network", "rm", self.net, check=False)


class Sink:
    """The OTLP/gRPC receiver (examples/otlp_sink.rs) on the host, reachable from the containers."""

    def __init__(self):
        exe = BIN_DIR / "examples" / "otlp_sink"
        if not exe.is_file():
            pytest.fail(f"{exe} is missing: run `cargo build -p peervault --example otlp_sink` first")
        self.proc = subprocess.Popen([str(exe), "0.0.0.0:0"], stdout=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().split()
        assert first[:1] == ["listening"], first
        self.port = int(first[1].rsplit(":", 1)[1])
        self.spans = []
        import threading
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self.lock:
                self.spans.append(json.loads(line))

    def find(self, pred, what, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if pred(s)]
            if found:
                return found[0]
            time.sleep(0.2)
        with self.lock:
            names = sorted({(s["service"], s["name"]) for s in self.spans})
        raise AssertionError(f"{what}: not received; got {names}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def cluster(image, sink, tmp_path_factory):
    # The blob service's step spans are at debug level.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{{gateway}}:{sink.port}", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "PEERVAULT_LOG": "info,peervault_blob=debug"}
    c = Cluster(image, tmp_path_factory.mktemp("containers"), env)
    try:
        yield c
    finally:
        c.close()
        left = docker("ps", "-a", "--filter", f"name={TAG}", "--format", "{{.Names}}").stdout.split()
        assert not left, f"containers left behind: {left}"


def members(c, want_ready, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        out = c.cli("peer", "peers", "ls").stdout.decode()
        rows = [l.split() for l in out.splitlines()[1:] if l.strip()]
        healthy = sorted(r[1].rsplit(":", 1)[0] for r in rows if "healthy" in r)
        if healthy == want_ready or time.monotonic() > deadline:
            return healthy, out
        time.sleep(0.5)


def test_peer_discovers_the_blob_containers_through_the_network_alias(cluster):
    want = sorted(cluster.ips[f"blob-{i}"] for i in range(3))
    healthy, out = members(cluster, want)
    assert healthy == want, out


def test_upload_download_list_and_watch_events(cluster):
    events = subprocess.Popen([binary("pvault"), "--server", cluster.grpc("events"), "--tls-dir", str(cluster.client),
                               "events", "watch", "--topic", "file_operations"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        files = {}
        for i in range(3):
            f = cluster.work / f"file-{i}.bin"
            f.write_bytes(os.urandom(100_000 + i))
            files[f"docs/file-{i}"] = f
            cluster.cli("blob-0", "put", str(f), f"docs/file-{i}")
        for key, f in files.items():
            back = cluster.work / (f.name + ".back")
            cluster.cli("blob-0", "get", key, str(back))
            assert back.read_bytes() == f.read_bytes(), key
        ls = cluster.cli("blob-0", "ls", "docs/").stdout.decode()
        for key in files:
            assert key in ls, ls
        deadline = time.monotonic() + 20
        seen = b""
        os.set_blocking(events.stdout.fileno(), False)
        while time.monotonic() < deadline and not all(k.encode() in seen for k in files):
            chunk = events.stdout.read()
            if chunk:
                seen += chunk
            time.sleep(0.2)
        for key in files:
            assert key.encode() in seen, f"no file_uploaded event for {key}: {seen[-2000:]!r}"
    finally:
        events.terminate()
        events.wait(timeout=10)


def test_an_upload_through_the_containers_is_one_trace_linked_from_the_events_container(cluster, sink):
    f = cluster.work / "traced.bin"
    f.write_bytes(os.urandom(20_000))
    cluster.cli("blob-0", "put", str(f), "traced/one")
    # The sink is shared by the module's tests, so several uploads may be in it: the check is
    # that an upload's trace holds its step spans and a replica's span and is linked from the
    # events container's Publish (every upload of the module should satisfy it).
    def complete(trace):
        spans = sink.spans  # called by find, which holds the sink's lock
        in_trace = [s for s in spans if s["trace_id"] == trace]
        steps = all(any(s["service"] == "peervault-blob" and s["name"].startswith(step) for s in in_trace)
                    for step in ("chunk_write", "finish"))
        replica = any(s["kind"] == 2 and s["name"].startswith("peervault.v1.ReplicationService/") for s in in_trace)
        linked = any(s["service"] == "peervault-events" and s["name"] == "peervault.v1.EventService/Publish"
                     and any(l["trace_id"] == trace for l in s["links"]) for s in spans)
        return steps and replica and linked
    upload = sink.find(lambda s: s["service"] == "peervault-blob" and s["kind"] == 2
                       and s["name"] == "peervault.v1.FileService/UploadFile" and complete(s["trace_id"]),
                       "an UploadFile span whose trace has its steps and a replica's span and is linked from Publish",
                       timeout=60)
    trace = upload["trace_id"]
    for step in ("chunk_write", "finish"):
        sink.find(lambda s: s["trace_id"] == trace and s["service"] == "peervault-blob" and s["name"].startswith(step),
                  f"the upload's {step} span")
    publish = sink.find(lambda s: s["service"] == "peervault-events" and s["name"] == "peervault.v1.EventService/Publish"
                        and any(l["trace_id"] == trace for l in s["links"]), "events container's Publish linking the upload")
    assert publish["trace_id"] != trace
    # Server Publish ← blob's gRPC client span ← blob's events.publish producer span (one trace).
    client = sink.find(lambda s: s["span_id"] == publish["parent_span_id"], "the Publish call's client span")
    producer = sink.find(lambda s: s["span_id"] == client["parent_span_id"], "blob's events.publish span")
    assert (producer["service"], producer["name"], producer["kind"]) == ("peervault-blob", "events.publish", 4)
    assert any(l["trace_id"] == trace for l in producer["links"])
    # The upload is one trace across blob and its replicas: the replicas' ReplicationService
    # server spans (they run only on the receiving pods) carry the upload's trace id.
    replica = sink.find(lambda s: s["trace_id"] == trace and s["kind"] == 2
                        and s["name"].startswith("peervault.v1.ReplicationService/"),
                        "a replica's ReplicationService span in the upload's trace")
    assert replica["service"] == "peervault-blob"
    # Probes of the three blob containers by the peer container are not traced.
    probes = [s for s in sink.spans if "grpc.health.v1.Health" in s["name"] or s["name"] == "peer_probe"]
    assert not probes, probes[:3]


@needs_replication
def test_stop_one_blob_container_and_read_everything_back(cluster):
    keys = []
    for i in range(6):
        f = cluster.work / f"r-{i}.bin"
        f.write_bytes(os.urandom(50_000))
        cluster.cli("blob-0", "put", str(f), f"replicated/r-{i}")
        keys.append((f"replicated/r-{i}", f))
    docker("stop", "-t", "10", f"{TAG}-blob-0")
    try:
        for name in ("blob-1", "blob-2"):
            for key, f in keys:
                back = cluster.work / "back.bin"
                cluster.cli(name, "get", key, str(back))
                assert back.read_bytes() == f.read_bytes(), (name, key)
    finally:
        docker("start", f"{TAG}-blob-0")
        wait_ready(cluster.port("blob-0", 9090), f"{TAG}-blob-0")


def disconnect_and_write(cluster, prefix, n=4):
    """Disconnects blob-2 from the network, writes n files through blob-0, reconnects blob-2
    with its address and aliases."""
    docker("network", "disconnect", cluster.net, f"{TAG}-blob-2")
    written = []
    try:
        for i in range(n):
            f = cluster.work / f"{prefix}-{i}.bin"
            f.write_bytes(os.urandom(30_000))
            cluster.cli("blob-0", "put", str(f), f"{prefix}/d-{i}")
            written.append((f"{prefix}/d-{i}", f))
    finally:
        docker("network", "connect", "--ip", cluster.ips["blob-2"], "--alias", "blob", "--alias", "blob-2",
               cluster.net, f"{TAG}-blob-2")
    return written


def test_disconnected_blob_container_is_seen_down_then_healthy_again(cluster):
    want = sorted(cluster.ips[f"blob-{i}"] for i in range(3))
    docker("network", "disconnect", cluster.net, f"{TAG}-blob-2")
    try:
        healthy, out = members(cluster, want[:2])
        assert healthy == want[:2], f"blob-2 still healthy while disconnected: {out}"
    finally:
        docker("network", "connect", "--ip", cluster.ips["blob-2"], "--alias", "blob", "--alias", "blob-2",
               cluster.net, f"{TAG}-blob-2")
    healthy, out = members(cluster, want)
    assert healthy == want, out


@needs_replication
def test_disconnected_blob_container_catches_up_after_reconnecting(cluster):
    written = disconnect_and_write(cluster, "during")
    want = sorted(cluster.ips[f"blob-{i}"] for i in range(3))
    healthy, out = members(cluster, want)
    assert healthy == want, out
    # Bounded wait for anti-entropy (20 s; the repair interval in CI is seconds).
    deadline = time.monotonic() + 20
    while True:
        listed = cluster.cli("blob-2", "ls", "during/").stdout.decode()
        if all(k in listed for k, _ in written) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for key, f in written:
        back = cluster.work / "back.bin"
        cluster.cli("blob-2", "get", key, str(back))
        assert back.read_bytes() == f.read_bytes(), key
