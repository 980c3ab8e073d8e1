#!/usr/bin/env bash
# Runs every test of the workspace (unit, integration, netns) and ends with one summary line,
# `N passed, M failed`, summed over every test binary.
set -uo pipefail

log=$(mktemp)
trap 'rm -f "$log"' EXIT
"${CARGO:-cargo}" test --workspace --all-targets "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed;?$/) passed += $i
            if ($(i+1) ~ /^failed;?$/) failed += $i
        }
    }
    END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
