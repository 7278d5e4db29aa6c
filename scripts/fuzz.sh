#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS each (default 30) and fails if any of them finds
# a crash (panic, failed check, out-of-memory, timeout). Installs cargo-fuzz if it is missing.
# cargo-fuzz needs nightly compiler features; the stable toolchain is told to allow them with
# RUSTC_BOOTSTRAP=1. Crashing inputs land in fuzz/artifacts/<target>/; the corpus grows in
# fuzz/corpus/<target>/ (both ignored by git). See fuzz/README.md.
#
# Usage: scripts/fuzz.sh [SECONDS | --runs N] [TARGET...]
#   --runs N: every target runs exactly N inputs instead (e.g. 10000000 for docs/security.md).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

runs_wanted=""
if [[ ${1:-} == --runs ]]; then
  runs_wanted=${2:-}
  shift 2 || true
  secs=0
  if ! [[ $runs_wanted =~ ^[0-9]+$ ]] || ((runs_wanted < 1)); then
    echo "usage: $0 [SECONDS | --runs N] [TARGET...]" >&2
    exit 2
  fi
else
  secs=${1:-30}
  shift || true
  if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs < 1)); then
    echo "usage: $0 [SECONDS | --runs N] [TARGET...]" >&2
    exit 2
  fi
fi

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cd fuzz
if (($#)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${#targets[@]} fuzz targets"
for t in "${targets[@]}"; do
  cargo fuzz build "$t"
done

failed=()
summary=()
for t in "${targets[@]}"; do
  corpus=("$root/fuzz/corpus/$t")
  mkdir -p "${corpus[0]}"
  [[ -d $root/fuzz/seeds/$t ]] && corpus+=("$root/fuzz/seeds/$t")
  if [[ -n $runs_wanted ]]; then
    echo "== fuzzing $t for $runs_wanted inputs"
    opts=(-runs="$runs_wanted")
  else
    echo "== fuzzing $t for ${secs}s"
    opts=(-max_total_time="$secs")
  fi
  opts+=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  [[ -f $root/fuzz/dicts/$t.dict ]] && opts+=(-dict="$root/fuzz/dicts/$t.dict")
  # Request heads go up to MAX_HEAD (16 KiB); longer inputs reach the 431 path.
  [[ $t == http_request ]] && opts+=(-max_len=20000)
  log=$(mktemp)
  set +e
  cargo fuzz run "$t" "${corpus[@]}" -- "${opts[@]}" 2>&1 | tee "$log" |
    grep -E --line-buffered '^(INFO: Seed|#[0-9]+[[:space:]]+(INITED|DONE))|ERROR|panicked|SUMMARY|Failing input'
  rc=${PIPESTATUS[0]}
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  if [[ -n $runs_wanted && $rc == 0 && ${runs:-0} -lt $runs_wanted ]]; then
    rc=1
    echo "!! $t ran ${runs:-?} of $runs_wanted inputs" >&2
  fi
  if ((rc != 0)); then
    failed+=("$t")
    summary+=("$(printf '%-16s FAILED (exit %s); see fuzz/artifacts/%s/ and the log above' "$t" "$rc" "$t")")
    grep -E -A40 'panicked|ERROR: (libFuzzer|AddressSanitizer)' "$log" | head -60 || true
  else
    summary+=("$(printf '%-16s ok  %10s runs  %7s exec/s' "$t" "${runs:-?}" "${rate:-?}")")
  fi
  rm -f "$log"
done

if [[ -n $runs_wanted ]]; then
  echo "== summary ($runs_wanted inputs per target)"
else
  echo "== summary (${secs}s per target)"
fi
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "!! crashes found in: ${failed[*]}" >&2
  exit 1
fi
