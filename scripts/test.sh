#!/usr/bin/env bash
# Every check the project runs, from a fresh machine: installs (idempotently) the system
# packages the tests use, then formatting, lints and the whole test suite in release mode
# (the end-to-end tests move hundreds of MiB and want an optimised build).
set -euo pipefail
cd "$(dirname "$0")/.."

# PostgreSQL's programs live in /usr/lib/postgresql/N/bin, off PATH (and /usr/bin/psql is a
# wrapper that exists without any server), pgbouncer and haproxy in /usr/sbin: look there.
have() {
  case $1 in
    initdb | pg_ctl | pgbench | psql) compgen -G "/usr/lib/postgresql/*/bin/$1" >/dev/null ;;
    # The system's, which tests run as another user (not a per-user install such as pyenv's).
    python3) [[ -x /usr/bin/python3 ]] ;;
    *) command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]] ;;
  esac
}
need=()
for pair in curl:curl wget:wget ss:iproute2 nft:nftables ping:iputils-ping \
  initdb:postgresql-15 pg_ctl:postgresql-15 pgbench:postgresql-15 psql:postgresql-client-15 \
  pgbouncer:pgbouncer haproxy:haproxy socat:socat python3:python3; do
  pkg=${pair##*:}
  have "${pair%%:*}" || [[ " ${need[*]-} " == *" $pkg "* ]] || need+=("$pkg")
done
if ((${#need[@]})); then
  if [[ $(id -u) == 0 ]]; then
    echo "== installing ${need[*]}"
    # The tests start their own throwaway servers: keep the packages from starting their system
    # services (postgresql's main cluster on 5432, pgbouncer, haproxy) with a policy-rc.d that
    # denies every start, for this install only, unless the machine already has one.
    policy=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    fi
    status=0
    apt-get update -qq || status=$?
    ((status)) || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${need[@]}" >/dev/null || status=$?
    if [[ -n $policy ]]; then rm -f "$policy"; fi
    ((status == 0)) || exit "$status"
  else
    echo "!! missing ${need[*]}: run as root or install them; tests that need them will fail" >&2
  fi
fi
if [[ $(id -u) != 0 ]]; then
  echo "!! NOT ROOT: the part of the download test that resets a session with 'ss -K', the lab tests (network namespaces) and the kernel fast-path tests (TCP_REPAIR, nftables) will not run" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --workspace --all-targets --locked -- -D warnings
echo "== layout"
python3 scripts/layout.py
echo "== cargo doc (libraries, warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --lib --release --locked
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace --locked 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo prints one result line per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
exit "$rc"
