#!/usr/bin/env bash
# Installs the peers the integration tests drive, into ignored folders of the project where
# possible. Idempotent; runs on every `make test`.
#   - cargo-nextest (the test runner)
#   - .venv/ with the Python peers of tests/peers/requirements.txt (aiosmtpd: a real SMTP server)
#   - openssl (Debian) for the test CA of the STARTTLS tests
#   - openssh-client (Debian): sftp, scp, ssh-keygen, the SFTP clients of the SFTP tests
#   - openssh-server (Debian): sshd, run as a plain process by the SFTP benchmark (not as a service)
#   - lintian, systemd (systemd-analyze), dpkg and binutils (Debian): build and check the .deb
#   - nodejs + npm (Debian) and tests/peers/node_modules with the npm `smpp` package: the loopback
#     SMSC (tests/peers/smsc.js) of the partner tests and the dispatch benchmark
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)                       # a webhook client
command -v sftp >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || need_apt+=(openssh-client)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)   # the yardstick of the SFTP benchmark
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v lintian >/dev/null 2>&1 || need_apt+=(lintian)                 # checks the .deb
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)         # the unit's exposure score
command -v dpkg-deb >/dev/null 2>&1 && command -v objdump >/dev/null 2>&1 || need_apt+=(dpkg binutils)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.requirements.installed
if [ ! -f "$stamp" ] || ! cmp -s tests/peers/requirements.txt "$stamp"; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/peers/requirements.txt
  cp tests/peers/requirements.txt "$stamp"
fi
if [ ! -d tests/peers/node_modules/smpp ] || ! cmp -s tests/peers/package-lock.json tests/peers/node_modules/.package-lock.installed; then
  (cd tests/peers && npm ci --no-audit --no-fund --silent)
  cp tests/peers/package-lock.json tests/peers/node_modules/.package-lock.installed
fi
echo "test peers: ready ($(.venv/bin/python -c 'import aiosmtpd; print("aiosmtpd", aiosmtpd.__version__)'))"
