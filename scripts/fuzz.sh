#!/usr/bin/env bash
# Run every fuzz target for a bounded time, one after the other (go test -fuzz takes one target
# per run). Usage: scripts/fuzz.sh [DURATION] [--save]
#   DURATION  per target, as go test -fuzztime takes it (default 10s)
#   --save    copy what the fuzzer found interesting into testdata/fuzz/, the checked-in corpus
# A failure leaves its input in testdata/fuzz/<Target>/ (go test writes it there): commit it with
# the fix, and it becomes a regression test that plain `go test` runs.
set -euo pipefail
cd "$(dirname "$0")/.."
time=${1:-10s}
save=${2:-}
targets=(
  "./lib/keys FuzzDecode"
  "./lib/keys FuzzHWID"
  "./bootserver/dhcp FuzzReply"
  "./bootserver/tftp FuzzParsePath"
  "./bootserver/httpboot FuzzParseMachine"
)
cache=$(go env GOCACHE)/fuzz
for t in "${targets[@]}"; do
  read -r pkg name <<<"$t"
  echo "== $name ($pkg, $time)"
  go test -run '^$' -fuzz "^${name}\$" -fuzztime "$time" "$pkg" 2>&1 | grep -v '^fuzz: elapsed' || {
    echo "fuzz target $name failed; the input is in $pkg/testdata/fuzz/$name/" >&2
    exit 1
  }
  if [ "$save" = --save ]; then
    src="$cache/github.com/herdhq/herd/${pkg#./}/$name"
    dst="$pkg/testdata/fuzz/$name"
    mkdir -p "$dst"
    # The newest 30 entries: enough to start from, small enough to review.
    ls -t "$src" 2>/dev/null | head -30 | while read -r f; do cp "$src/$f" "$dst/$f"; done
  fi
done
