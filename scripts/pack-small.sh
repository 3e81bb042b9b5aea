#!/usr/bin/env bash
# Shared by the small device scripts (sourced from scripts/ here and from
# .device/ there, where pack_small puts a copy).
#
#   pack_small SCRIPT TEST... [-- fixtures]
# A release build, then .device/ with the stripped `yinsen`, the named test
# executables, the calling script and this file. `-- fixtures` also copies
# the tiny-bitnet-a fixture (tests read it through YINSEN_FIXTURES).
#
#   pack_or_run "$1" VERB "USAGE" SCRIPT TEST... [-- fixtures]
# A script's entry: with "pack", pack_small SCRIPT TEST... and exit; with
# VERB ("remote", "run"), return so the script goes on; else print
# "usage: USAGE" and exit 2.
#
#   remote_env
# On the device: dev (the packed folder), out ($OUT or /tmp/yinsen-out) and
# the environment the tests and `yinsen` run with.
#
#   start_serve LOG ARGS...
# On the device: `yinsen serve ARGS...`, waited for until it listens.
remote_env() {
  dev=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  out=${OUT:-/tmp/yinsen-out}
  mkdir -p "$out"
  export PATH="$dev/bin:$PATH" YINSEN_CUDA_CACHE=/tmp/yc YINSEN_DEVICE=1 YINSEN_FIXTURES="$dev/fixtures"
}

# On the device: `yinsen serve ARGS...` in the background, its output in LOG;
# returns once it listens (or has exited), with its pid in $serve_pid.
#   start_serve LOG ARGS...
start_serve() {
  local log=$1
  shift
  yinsen serve "$@" >"$log" 2>&1 &
  serve_pid=$!
  for _ in $(seq 300); do
    grep -q "http://" "$log" && break
    kill -0 "$serve_pid" 2>/dev/null || break
    sleep 1
  done
}

pack_small() {
  local script=$1 fixtures=0 tests=() t bin
  shift
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1
  for t in "$@"; do
    case "$t" in --) ;; fixtures) fixtures=1 ;; *) tests+=("$t") ;; esac
  done
  cargo build --release -q
  rm -rf .device && mkdir -p .device/bin .device/tests
  cp target/release/yinsen .device/bin/
  for t in "${tests[@]}"; do
    bin=$(cargo test --release --no-run -p yinsen --test "$t" 2>&1 | grep -o "target/release/deps/$t-[a-z0-9]*" | head -1)
    cp "$bin" ".device/tests/$t"
  done
  strip .device/bin/* ${tests[@]/#/.device/tests/}
  if [ "$fixtures" = 1 ]; then
    mkdir -p .device/fixtures
    cp -r ../shared/fixtures/tiny-bitnet-a ../shared/fixtures/MANIFEST.json .device/fixtures/
  fi
  cp "$script" scripts/pack-small.sh .device/
  du -sh .device
}

pack_or_run() {
  local cmd=$1 verb=$2 usage=$3
  shift 3
  case "$cmd" in
    pack)
      set -e
      pack_small "$@"
      exit 0
      ;;
    "$verb") return 0 ;;
    *)
      echo "usage: $usage"
      exit 2
      ;;
  esac
}
