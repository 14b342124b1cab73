#!/usr/bin/env bash
# System packages the tests use, installed only when missing: OpenSSH's server (the SSH
# backend is tested against a real sshd on loopback) and Chromium (the status page is
# rendered in a real headless browser). Needs root and apt-get; otherwise it says what is
# missing and the tests that need it skip.
set -eu
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  # A failed install must not stop the test command: the tests that need it skip.
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
    echo "tests/system-deps.sh: could not install ${need[*]}; the tests that need them will skip" >&2
  fi
else
  echo "tests/system-deps.sh: missing ${need[*]} (install as root with apt-get); the tests that need them will skip" >&2
fi
