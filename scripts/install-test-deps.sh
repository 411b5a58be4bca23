#!/usr/bin/env bash
# What `cargo test --workspace` needs beyond the Rust toolchain: libfaketime (Debian's
# `faketime` package), which the clock-skew test in tests/cluster_faults.rs preloads into pods
# to skew their wall clocks. Does nothing when it is there already.
set -euo pipefail
if ls /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1 >/dev/null 2>&1; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing libfaketime (apt-get install faketime) for the clock-skew test" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq faketime >/dev/null
