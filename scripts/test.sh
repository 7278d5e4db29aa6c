#!/usr/bin/env bash
# Every check the project runs, from a fresh machine: installs (idempotently) the system
# packages the tests use, then formatting, lints and the whole test suite in release mode
# (the end-to-end tests move hundreds of MiB and want an optimised build).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in curl:curl wget:wget ss:iproute2 nft:nftables ping:iputils-ping; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if ((${#need[@]})); then
  if [[ $(id -u) == 0 ]]; then
    echo "== installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
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
