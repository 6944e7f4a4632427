#!/usr/bin/env bash
# The whole test suite: installs what is missing (scripts/setup.sh), then runs every test of the
# workspace. GPU tests are opt-in (LEXP_GPU_TESTS=1 on a machine with an NVIDIA GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-ptxas
cargo test --workspace "$@"
