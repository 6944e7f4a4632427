#!/usr/bin/env bash
# The main job on the embedded default: builds `lexp` and fine-tunes the bundled opt-tiny model
# with LoRA on the bundled E2E slice (`lexp finetune` with no arguments), showing the eval loss
# falling; on the GPU if one is usable, else on the CPU. Extra arguments go to `lexp finetune`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p lexp-runtime --bin lexp
exec target/release/lexp finetune "$@"
