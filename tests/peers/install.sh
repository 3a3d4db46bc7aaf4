#!/usr/bin/env bash
# Installs the peers the integration tests drive. Idempotent; safe to run on every `make test`.
# The file-drop tests need nothing beyond the Rust toolchain and cargo-nextest; later borders
# (OpenSSH, paramiko, ssh-audit, the npm smpp SMSC, aiosmtpd) are added here as they land.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
echo "test peers: ready"
