//! `pvault` against real `peervault serve all` processes on 127.0.0.1 free ports with their
//! development certificates: every command's happy and failure paths with their exit codes,
//! resume after the CLI is killed, retries across a server restart, events seen from another
//! process, and (with `PVAULT_BIG_TEST=1`) the memory of a 1 GiB put from stdin.
//!
//! The server binary is the workspace's `peervault`, built by `cargo test --workspace` (the
//! root package's integration tests need it); run `cargo build --bin peervault` first when
//! testing this crate alone.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const WAIT: Duration = Duration::from_secs(60);

fn pvault_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pvault"))
}

fn server_bin() -> PathBuf {
    // <target>/<profile>/deps/cli-<hash> → <target>/<profile>/peervault
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("peervault");
    assert!(
        bin.exists(),
        "the server binary {} is missing: run `cargo build --bin peervault` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

struct Server {
    child: Child,
    grpc: SocketAddr,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    fn start() -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut s = Server::start_at(&dir, "127.0.0.1:0");
        s._tmp = Some(tmp);
        s
    }

    // The child is waited for by `Server::drop` (a panic here ends the test process).
    #[allow(clippy::zombie_processes)]
    fn start_at(dir: &Path, grpc: &str) -> Server {
        Server::start_full(dir, grpc, &[])
    }

    // The child is waited for by `Server::drop` (a panic here ends the test process).
    #[allow(clippy::zombie_processes)]
    fn start_full(dir: &Path, grpc: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(server_bin())
            .args(["serve", "all", "--data-dir"])
            .arg(dir)
            .args([
                "--grpc-listen",
                grpc,
                "--admin-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(["--log-format", "json"])
            .args(extra)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn peervault");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("peervault did not become ready");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "peervault ready"
            {
                let grpc = v["grpc_addr"].as_str().unwrap().parse().unwrap();
                return Server {
                    child,
                    grpc,
                    dir: dir.to_path_buf(),
                    _tmp: None,
                };
            }
        }
    }

    fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// A `pvault` command aimed at this server, with its own state folder.
    fn pvault(&self) -> Command {
        let mut c = Command::new(pvault_bin());
        c.env("PEERVAULT_SERVER", format!("localhost:{}", self.grpc.port()))
            .env("PEERVAULT_TLS_DIR", self.tls_dir())
            .env("PEERVAULT_STATE_DIR", self.dir.join("cli-state"))
            .env("PEERVAULT_CONFIG", "/dev/null")
            .env_remove("PEERVAULT_TOKEN");
        c
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run(mut c: Command, args: &[&str]) -> Output {
    c.args(args).stdin(Stdio::null()).output().expect("run pvault")
}

fn ok(c: Command, args: &[&str]) -> String {
    let o = run(c, args);
    assert!(
        o.status.success(),
        "pvault {args:?} failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs and expects exit `code`, a single-line error on stderr that contains `needle`.
fn fails(c: Command, args: &[&str], code: i32, needle: &str) -> String {
    let o = run(c, args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(code), "pvault {args:?}: {err}");
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains(needle), "pvault {args:?}: expected '{needle}' in: {err}");
    err
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Spawns `pvault` with piped stderr whose lines arrive on the returned channel.
fn spawn_lines(mut c: Command, args: &[&str]) -> (Child, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = c
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (etx, erx) = mpsc::channel();
    let (otx, orx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = etx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = otx.send(l);
        }
    });
    (child, erx, orx)
}

/// Waits for a line matching `pred`; returns it and every line seen.
fn wait_line(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("expected line never came; seen:\n{}", seen.join("\n")));
        seen.push(l.clone());
        if pred(&l) {
            return l;
        }
    }
}

fn acked(line: &str) -> Option<u64> {
    line.strip_prefix("pvault: ")?
        .strip_suffix(" bytes acknowledged")?
        .parse()
        .ok()
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "pvault did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_command_works_and_every_failure_has_its_exit_code_and_reason() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("report.bin");
    let content = data(1, 3 * 1024 * 1024 + 5);
    std::fs::write(&file, &content).unwrap();

    // put FILE (key = file name), put FILE KEY with metadata, put - (stdin).
    let out = ok(s.pvault(), &["put", file.to_str().unwrap()]);
    let hash = blake3::hash(&content).to_hex().to_string();
    assert_eq!(out.trim(), format!("report.bin\t{}\t{hash}", content.len()));
    ok(
        s.pvault(),
        &[
            "put",
            file.to_str().unwrap(),
            "docs/a.bin",
            "--content-type",
            "application/x-test",
            "--meta",
            "team=x",
        ],
    );
    let mut child = s
        .pvault()
        .args(["put", "-", "docs/stdin.txt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"from stdin").unwrap();
    assert!(child.wait_with_output().unwrap().status.success());

    // get to a file and to stdout.
    let back = tmp.path().join("back.bin");
    ok(s.pvault(), &["get", "docs/a.bin", back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == content);
    assert_eq!(ok(s.pvault(), &["get", "docs/stdin.txt"]), "from stdin");
    assert_eq!(ok(s.pvault(), &["get", "docs/stdin.txt", "-"]), "from stdin");

    // ls (table and JSON), stat, meta.
    let table = ok(s.pvault(), &["ls", "docs/"]);
    assert!(table.starts_with("KEY"), "{table}");
    assert!(table.contains("docs/a.bin") && table.contains("docs/stdin.txt") && !table.contains("report.bin"));
    let listed: serde_json::Value = serde_json::from_str(&ok(s.pvault(), &["ls", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3);
    let st: serde_json::Value = serde_json::from_str(&ok(s.pvault(), &["stat", "docs/a.bin", "--json"])).unwrap();
    assert_eq!(st["hash"], hash);
    assert_eq!(st["content_type"], "application/x-test");
    assert_eq!(st["metadata"]["team"], "x");
    assert!(ok(s.pvault(), &["stat", "docs/a.bin"]).contains(&hash));
    ok(
        s.pvault(),
        &["meta", "set", "docs/a.bin", "owner=me", "--remove", "team"],
    );
    assert_eq!(ok(s.pvault(), &["meta", "get", "docs/a.bin"]), "owner=me\n");
    assert_eq!(ok(s.pvault(), &["meta", "get", "docs/a.bin", "owner"]), "me\n");

    // blob get (ranges are half-open) and blob stat.
    let range = run(s.pvault(), &["blob", "get", &hash, "--range", "10-20"]);
    assert!(range.status.success());
    assert_eq!(range.stdout, &content[10..20]);
    let whole = run(s.pvault(), &["blob", "get", &hash]);
    assert!(whole.status.success() && whole.stdout == content);
    let bs: serde_json::Value = serde_json::from_str(&ok(s.pvault(), &["blob", "stat", &hash])).unwrap();
    assert_eq!(bs["size"], content.len());

    // peers, health, info, completions.
    let own = format!("127.0.0.1:{}", s.grpc.port());
    assert!(ok(s.pvault(), &["peers", "ls"]).contains(&own));
    let peers: serde_json::Value = serde_json::from_str(&ok(s.pvault(), &["peers", "ls", "--json"])).unwrap();
    assert!(peers.as_array().unwrap().iter().any(|p| p["id"] == own.as_str()));
    ok(s.pvault(), &["peers", "add", "127.0.0.1:1", "--id", "extra"]);
    assert!(ok(s.pvault(), &["peers", "health", "extra", "--json"]).contains("\"peer_id\": \"extra\""));
    ok(s.pvault(), &["peers", "rm", "extra"]);
    assert!(ok(s.pvault(), &["health"]).contains("peervault.v1.FileService"));
    let info: serde_json::Value = serde_json::from_str(&ok(s.pvault(), &["info", "--json"])).unwrap();
    assert_eq!(info["role"], "all");
    assert!(info["file_count"].as_i64().unwrap() >= 3);
    for shell in ["bash", "zsh", "fish"] {
        assert!(ok(s.pvault(), &["completions", shell]).contains("pvault"));
    }

    // rm, then every failure with its exit code and a one-line reason.
    ok(s.pvault(), &["rm", "docs/stdin.txt"]);
    fails(s.pvault(), &["get", "docs/stdin.txt"], 3, "not found");
    fails(s.pvault(), &["rm", "docs/stdin.txt"], 3, "not found");
    fails(s.pvault(), &["stat", "nope"], 3, "not found");
    fails(
        s.pvault(),
        &["meta", "get", "docs/a.bin", "missing"],
        3,
        "no metadata entry",
    );
    fails(s.pvault(), &["meta", "set", "nope", "a=b"], 3, "not found");
    fails(s.pvault(), &["peers", "rm", "no-such-peer"], 3, "not found");
    fails(s.pvault(), &["peers", "health", "no-such-peer"], 3, "not found");
    fails(s.pvault(), &["peers", "add", "bad address"], 6, "invalid argument");
    fails(s.pvault(), &["blob", "get", "abcd"], 6, "invalid argument");
    fails(
        s.pvault(),
        &["blob", "get", &hash, "--range", "20-10"],
        2,
        "end is before the start",
    );
    fails(s.pvault(), &["put", "/no/such/file"], 9, "/no/such/file");
    fails(
        s.pvault(),
        &["meta", "set", "docs/a.bin", "novalue"],
        2,
        "not NAME=VALUE",
    );
    let o = run(s.pvault(), &["no-such-command"]);
    assert_eq!(o.status.code(), Some(2));
    // A partial download leaves no file behind.
    let missing = tmp.path().join("never.bin");
    fails(s.pvault(), &["get", "nope", missing.to_str().unwrap()], 3, "not found");
    assert!(!missing.exists());

    // Certificates: another CA's, missing files, a client certificate the server does not trust.
    let other = Server::start();
    let mut c = s.pvault();
    c.env("PEERVAULT_TLS_DIR", other.tls_dir());
    fails(c, &["info"], 4, "not signed by the CA you trust");
    let mut c = s.pvault();
    c.args(["--cert", other.tls_dir().join("client.crt").to_str().unwrap()]);
    c.args(["--key", other.tls_dir().join("client.key").to_str().unwrap()]);
    fails(c, &["info", "--retries", "0"], 4, "client certificate");
    let mut c = s.pvault();
    c.env("PEERVAULT_TLS_DIR", tmp.path().join("nowhere"));
    fails(c, &["info"], 2, "--tls-dir");

    // Server down: a clear message after the retries.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut c = s.pvault();
    c.env("PEERVAULT_SERVER", format!("localhost:{port}"));
    let err = fails(c, &["ls", "--retries", "2"], 5, "cannot reach the server");
    assert_eq!(err.matches("retry").count(), 2, "{err}");
}

#[test]
fn a_killed_resumable_put_resumes_from_the_acknowledged_byte() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("big.bin");
    let content = data(7, 24 * 1024 * 1024);
    std::fs::write(&file, &content).unwrap();
    let f = file.to_str().unwrap();

    // Slowed down so it is surely still running when killed after 3 MiB are durable.
    let (mut child, err, _out) = spawn_lines(
        s.pvault(),
        &["put", "--resumable", "-v", "--limit-rate", "4M", f, "big"],
    );
    let mut seen = Vec::new();
    let id_line = wait_line(&err, &mut seen, |l| l.starts_with("pvault: upload id "));
    wait_line(&err, &mut seen, |l| acked(l).is_some_and(|n| n >= 3 * 1024 * 1024));
    child.kill().unwrap();
    child.wait().unwrap();
    let id = id_line.trim_start_matches("pvault: upload id ").to_string();

    let o = run(s.pvault(), &["put", "--resumable", "-v", f, "big"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("resuming upload {id}")), "{stderr}");
    let resumed: u64 = stderr
        .lines()
        .find_map(|l| l.split("resumed from byte ").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("resume offset reported");
    assert!(
        resumed >= 3 * 1024 * 1024 && resumed < content.len() as u64,
        "{resumed}"
    );
    let hash = blake3::hash(&content).to_hex().to_string();
    assert!(String::from_utf8_lossy(&o.stdout).contains(&hash));
    let back = run(s.pvault(), &["get", "big"]);
    assert!(back.status.success() && back.stdout == content);
    // Done: the state record is gone, so the next put starts afresh (and dedups).
    let o = run(s.pvault(), &["put", "--resumable", "-v", f]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("resuming"));
}

#[test]
fn unavailable_is_retried_across_a_server_restart_mid_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut s = Server::start_at(&dir, &addr);
    let file = tmp.path().join("big.bin");
    let content = data(9, 16 * 1024 * 1024);
    std::fs::write(&file, &content).unwrap();
    let args = [
        "put",
        "--resumable",
        "-v",
        "--retries",
        "30",
        "--limit-rate",
        "4M",
        file.to_str().unwrap(),
        "restarted",
    ];
    let (mut child, err, _out) = spawn_lines(s.pvault(), &args);
    let mut seen = Vec::new();
    wait_line(&err, &mut seen, |l| acked(l).is_some_and(|n| n >= 2 * 1024 * 1024));
    s.kill();
    wait_line(&err, &mut seen, |l| l.contains("Unavailable") && l.contains("retry"));
    let s = Server::start_at(&dir, &addr);
    let status = wait_exit(&mut child);
    let rest: Vec<String> = err.try_iter().collect();
    assert!(status.success(), "{}\n{}", seen.join("\n"), rest.join("\n"));
    let back = run(s.pvault(), &["get", "restarted"]);
    assert!(back.status.success() && back.stdout == content);
}

#[test]
fn a_call_made_while_the_server_is_down_succeeds_once_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let s = Server::start_at(&dir, &addr);
    let file = tmp.path().join("f.bin");
    let content = data(3, 2 * 1024 * 1024);
    std::fs::write(&file, &content).unwrap();
    ok(s.pvault(), &["put", file.to_str().unwrap(), "f"]);
    drop(s);
    // Server down when the call starts; it comes back within the retry budget.
    let (mut child, err, _out) = spawn_lines(Server::pvault_for(&dir, port), &["stat", "f", "--retries", "30"]);
    let mut seen = Vec::new();
    wait_line(&err, &mut seen, |l| l.contains("Unavailable") && l.contains("retry"));
    let _s = Server::start_at(&dir, &addr);
    assert!(wait_exit(&mut child).success(), "{}", seen.join("\n"));
}

impl Server {
    fn pvault_for(dir: &Path, port: u16) -> Command {
        let mut c = Command::new(pvault_bin());
        c.env("PEERVAULT_SERVER", format!("localhost:{port}"))
            .env("PEERVAULT_TLS_DIR", dir.join("tls"))
            .env("PEERVAULT_STATE_DIR", dir.join("cli-state"))
            .env("PEERVAULT_CONFIG", "/dev/null");
        c
    }
}

#[test]
fn events_watch_sees_an_upload_made_by_another_process() {
    let s = Server::start();
    let (mut watch, err, out) = spawn_lines(
        s.pvault(),
        &[
            "events",
            "watch",
            "--topic",
            "file_operations",
            "--json",
            "--count",
            "1",
        ],
    );
    let mut seen = Vec::new();
    wait_line(&err, &mut seen, |l| l.starts_with("pvault: watching"));
    let mut put = s
        .pvault()
        .args(["put", "-", "watched/key.txt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    put.stdin.take().unwrap().write_all(b"watch me").unwrap();
    assert!(put.wait().unwrap().success());
    let line = wait_line(&out, &mut seen, |l| l.contains("watched/key.txt"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["topic"], "file_operations");
    assert_eq!(v["type"], "file_uploaded");
    assert!(v["sequence"].as_u64().unwrap() > 0);
    assert!(wait_exit(&mut watch).success());
    // The plain form is one line per event.
    let o = run(
        s.pvault(),
        &[
            "events",
            "watch",
            "--topic",
            "file_operations",
            "--since",
            "0",
            "--count",
            "1",
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.lines().count() == 1 && text.contains("file_operations/file_uploaded"),
        "{text}"
    );
    fails(
        s.pvault(),
        &["events", "watch", "--topic", "nonsense"],
        6,
        "invalid argument",
    );
}

/// `PVAULT_BIG_TEST=1 cargo test --release -p peervault-cli --test cli -- --nocapture big`
#[test]
fn a_1_gib_put_from_stdin_keeps_memory_bounded() {
    if std::env::var_os("PVAULT_BIG_TEST").is_none() {
        eprintln!("skipped: set PVAULT_BIG_TEST=1 (best with --release)");
        return;
    }
    let s = Server::start();
    let total: u64 = 1024 * 1024 * 1024;
    let mut child = s
        .pvault()
        .args(["put", "-", "big/stdin.bin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let block = data(5, 1024 * 1024);
        let mut h = blake3::Hasher::new();
        let t = Instant::now();
        for i in 0..(total / block.len() as u64) {
            let mut b = block.clone();
            b[..8].copy_from_slice(&i.to_le_bytes());
            h.update(&b);
            stdin.write_all(&b).unwrap();
        }
        (h.finalize().to_hex().to_string(), t)
    });
    let mut peak = 0u64;
    let status = loop {
        if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kb) = st
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        {
            peak = peak.max(kb);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (hash, started) = writer.join().unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains(&hash), "{out}");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"test\":\"put_1gib_stdin\",\"peak_rss_mib\":{:.1},\"seconds\":{secs:.1},\"mib_s\":{:.1}}}",
        peak as f64 / 1024.0,
        1024.0 / secs
    );
    assert!(peak < 128 * 1024, "pvault peak RSS {} KiB for a 1 GiB put", peak);
}

#[test]
fn an_api_key_made_with_the_cli_works_as_a_token_and_stops_when_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let s = Server::start_with(&dir, &["--tls-client-auth", "optional"]);
    let secret = ok(
        s.pvault(),
        &["keys", "create", "ci", "--scope", "read", "--scope", "write"],
    );
    let secret = secret.trim().to_string();
    assert!(secret.starts_with("pvk_"), "{secret}");
    // No client certificate: only the CA to trust the server, and the token.
    let token_cli = |token: &str| {
        let mut c = s.pvault();
        c.env("PEERVAULT_TLS_DIR", tmp.path().join("empty"))
            .env("PEERVAULT_CA", s.tls_dir().join("ca.crt"))
            .env("PEERVAULT_TOKEN", token);
        c
    };
    let mut put = token_cli(&secret)
        .args(["put", "-", "tok/a.txt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    put.stdin.take().unwrap().write_all(b"by token").unwrap();
    assert!(put.wait().unwrap().success());
    assert_eq!(ok(token_cli(&secret), &["get", "tok/a.txt"]), "by token");
    // The key lacks `admin`; a wrong token is refused.
    fails(token_cli(&secret), &["keys", "ls"], 4, "permission denied");
    fails(token_cli("pvk_wrong"), &["ls"], 4, "not authenticated");
    let listed = ok(s.pvault(), &["keys", "ls", "--json"]);
    let keys: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let id = keys[0]["id"].as_str().unwrap().to_string();
    ok(s.pvault(), &["keys", "revoke", &id]);
    fails(token_cli(&secret), &["ls"], 4, "not authenticated");
}

impl Server {
    // The child is waited for by `Server::drop`.
    #[allow(clippy::zombie_processes)]
    fn start_with(dir: &Path, extra: &[&str]) -> Server {
        Server::start_full(dir, "127.0.0.1:0", extra)
    }
}

#[test]
fn a_download_continues_from_where_it_was_across_a_server_restart() {
    download_across_a_restart(false);
}

/// Issue 11, defect 5: a caller whose API key is limited to a key prefix resumes too (the
/// client continues through DownloadFile, which such a key may call, not GetBlob).
#[test]
fn a_prefix_limited_key_continues_a_download_across_a_server_restart() {
    download_across_a_restart(true);
}

fn download_across_a_restart(prefix_limited_key: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let extra: &[&str] = if prefix_limited_key {
        &["--tls-client-auth", "optional"]
    } else {
        &[]
    };
    let mut s = Server::start_full(&dir, &addr, extra);
    let file = tmp.path().join("f.bin");
    let content = data(4, 32 * 1024 * 1024);
    std::fs::write(&file, &content).unwrap();
    ok(s.pvault(), &["put", file.to_str().unwrap(), "dl/f"]);
    let mut cli = s.pvault();
    if prefix_limited_key {
        let secret = ok(
            s.pvault(),
            &["keys", "create", "dl-only", "--scope", "read", "--prefix", "dl/"],
        );
        // No client certificate: only the CA to trust the server, and the limited token.
        cli.env("PEERVAULT_TLS_DIR", tmp.path().join("empty"))
            .env("PEERVAULT_CA", s.tls_dir().join("ca.crt"))
            .env("PEERVAULT_TOKEN", secret.trim());
    }
    // The test reads stdout slowly, so the download is held back by flow control.
    let mut child = cli
        .args(["get", "dl/f", "-", "--retries", "30", "-v"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = etx.send(l);
        }
    });
    let mut first = vec![0u8; 1024 * 1024];
    out.read_exact(&mut first).unwrap();
    s.kill();
    let reader = std::thread::spawn(move || {
        let mut rest = Vec::new();
        out.read_to_end(&mut rest).unwrap();
        rest
    });
    let mut seen = Vec::new();
    wait_line(&erx, &mut seen, |l| l.contains("retry"));
    let _s = Server::start_full(&dir, &addr, extra);
    let status = wait_exit(&mut child);
    let mut got = first;
    got.extend(reader.join().unwrap());
    assert!(status.success(), "{}", seen.join("\n"));
    assert_eq!(got.len(), content.len());
    assert!(got == content, "content differs after the resumed download");
    // The broken DownloadFile stream was continued (by range), not started over.
    assert!(
        seen.iter().any(|l| l.starts_with("pvault: DownloadFile:")),
        "{}",
        seen.join("\n")
    );
    let rest: Vec<String> = erx.try_iter().collect();
    let summary = rest
        .iter()
        .find(|l| l.contains("reconnection(s)"))
        .expect("summary line");
    assert!(!summary.ends_with(" 0 reconnection(s)"), "{summary}");
}
