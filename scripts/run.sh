#!/usr/bin/env bash
# The main job on the embedded default: builds `lexp` and runs every DSL kernel against its CPU
# reference, on the GPU if one is present (then also the bandwidth table), else in the
# interpreter on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p lexp-runtime --bin lexp
exec target/release/lexp check "$@"
