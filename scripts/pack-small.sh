#!/usr/bin/env bash
# Shared by the small device scripts: a release build, then .device/ with the
# stripped `yinsen`, the named test executables and the calling script.
#   pack_small SCRIPT TEST... [-- fixtures]
# `-- fixtures` also copies the tiny-bitnet-a fixture (tests read it through
# YINSEN_FIXTURES=.device/fixtures). Run from the repository root.
pack_small() {
  local script=$1 fixtures=0 tests=() t bin
  shift
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
  strip .device/bin/* .device/tests/*
  if [ "$fixtures" = 1 ]; then
    mkdir -p .device/fixtures
    cp -r ../shared/fixtures/tiny-bitnet-a ../shared/fixtures/MANIFEST.json .device/fixtures/
  fi
  cp "$script" .device/
  du -sh .device
}
