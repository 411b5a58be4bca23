#!/usr/bin/env bash
# Makes a minimal runtime base image from this host's files, for a Docker engine that has no
# images and no registry: the dynamic loader and libraries the binaries link (from ldd), CA
# roots, a passwd/group with the non-root user 65532, /tmp and /data. The same contents as
# distroless/cc, which the Dockerfile uses by default.
# Usage: make-base.sh IMAGE_TAG BINARY...
set -euo pipefail
tag=$1; shift
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{etc,tmp,data,usr/local/bin,etc/ssl/certs}
chmod 1777 "$root/tmp"
chown 65532:65532 "$root/data"
for bin in "$@"; do
  ldd "$bin" | awk '/=>/ { print $3 } /^\t\/lib/ { print $1 }' | grep '^/' 
done | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# Debian's merged /usr: /lib64 and /lib are where the loader path in ELF headers points.
cp -a /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
cat > "$root/etc/passwd" <<'P'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
P
cat > "$root/etc/group" <<'G'
root:x:0:
nonroot:x:65532:
G
echo 'hosts: files dns' > "$root/etc/nsswitch.conf"
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "$tag"
