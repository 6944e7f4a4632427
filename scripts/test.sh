#!/usr/bin/env bash
# The whole test suite: installs what is missing (scripts/setup.sh), then runs every test of the
# workspace. GPU tests are opt-in (LEXP_GPU_TESTS=1 on a machine with an NVIDIA GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-ptxas
# The debug build of every test binary takes about 7 GB (each links LLVM). With less free
# space the linker dies of a bus error, which names no cause: say it first.
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
free_kb=$(df -Pk "$target" | awk 'NR == 2 { print $4 }')
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((8 * 1024 * 1024)) ]; then
  echo "test.sh: only $((free_kb / 1024)) MiB free under $target; the test build needs about 7 GB." >&2
  echo "test.sh: if linking fails with a bus error (signal 7), free disk space or set CARGO_TARGET_DIR." >&2
fi
cargo test --workspace "$@"
