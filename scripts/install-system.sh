#!/usr/bin/env bash
# Installs the Debian packages the privileged tests and the UI tests need, once.
# Idempotent: packages already present are not reinstalled; safe to run on every `make test`.
set -euo pipefail

PKGS=(python3-bpfcc linux-headers-amd64 iproute2 iptables nftables redis-server chromium chromium-driver curl ca-certificates procps systemd)

if [ "$(id -u)" != "0" ]; then
  echo "install-system: not root; skipping Debian packages (privileged tests need root)" >&2
  exit 0
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-system: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles programs at load time against the running kernel's headers. The running kernel has
# no package of its own here; Debian's generic headers serve programs that use only UAPI types.
K=$(uname -r)
if [ ! -e "/lib/modules/$K/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$hdr" ]; then
    mkdir -p "/lib/modules/$K"
    ln -sfn "$hdr" "/lib/modules/$K/build"
    [ -n "$common" ] && ln -sfn "$common" "/lib/modules/$K/source"
  fi
fi
