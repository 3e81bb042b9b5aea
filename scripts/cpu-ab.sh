#!/bin/bash
# Same-call A/B rows of the CPU prefill on the device host (issue 3).
#
# Here: build release binaries of the two versions and put them, stripped,
# into /work/main/.device-amx/ (ignored by git) as yinsen-base, yinsen-new...,
# together with this script; then call the device tool with carry
# [".device-amx"] and a command such as
#   .device-amx/cpu-ab.sh $OUT/log.txt b1:yinsen-base:amx n1:yinsen-new:amx \
#     b2:yinsen-base:amx n2:yinsen-new:amx g:yinsen-new:amx:YINSEN_AMX_TGROUP=4
# Each spec is label:binary:kernel[:ENV=value ...]; the specs run in order
# (alternate old and new: the host's speed drifts by 10-20% within a call).
# Prints one row per spec: median | mean +- sd | the last forward's profile.
LOG=$1; shift
cd "$(dirname "$0")"
for spec in "$@"; do
  IFS=: read -r label bin kern envs <<<"$spec"
  echo "=== $label ($bin, $kern, $envs)" >>"$LOG"
  # shellcheck disable=SC2086 # envs is a list of VAR=value words
  env YINSEN_PROFILE=1 $envs ./$bin bench -m synthetic:2b4t --backend cpu --kernel "$kern" \
    -p 512 -n 0 -r 4 -t 16 --no-bandwidth >>"$LOG" 2>&1
  pp=$(grep -E "\| pp512" "$LOG" | tail -1 | awk -F'|' '{print $6 "|" $7}')
  prof=$(grep "profile cpu forward" "$LOG" | tail -1 | sed 's/profile cpu forward n=512: //')
  echo "$label | $pp | $prof"
done
