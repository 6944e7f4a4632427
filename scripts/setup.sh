#!/usr/bin/env bash
# Makes sure the build and test tools lexp needs are present, installing what is missing when
# it may (root, or passwordless sudo), else stopping with the exact line to run.
#   - LLVM 19 (llvm-sys, through inkwell, links it into the #[kernel] proc macro)
#   - ptxas (NVIDIA's PTX assembler from PyPI, used by the tests to validate every kernel)
#   - nvdisasm (NVIDIA's SASS disassembler from PyPI: the tests check tensor-core instructions)
set -euo pipefail

need_llvm=0
[ -x /usr/lib/llvm-19/bin/llvm-config ] || need_llvm=1
if [ "$need_llvm" = 1 ]; then
  pkgs="llvm-19-dev libpolly-19-dev libzstd-dev zlib1g-dev"
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="none"; fi
  if [ "$sudo" = none ] || ! command -v apt-get >/dev/null; then
    echo "LLVM 19 is missing. Install it with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y $pkgs" >&2
    echo "(or point LLVM_SYS_191_PREFIX at an LLVM 19 installation and edit .cargo/config.toml)" >&2
    exit 1
  fi
  echo "setup: installing LLVM 19 ($pkgs)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $pkgs >/dev/null
fi

if [ "${1:-}" = "--with-ptxas" ]; then
  ptxas_ok=0
  if [ -n "${PTXAS:-}" ] && [ -x "$PTXAS" ]; then ptxas_ok=1; fi
  command -v ptxas >/dev/null 2>&1 && ptxas_ok=1
  python3 -c "import nvidia.cuda_nvcc" >/dev/null 2>&1 && ptxas_ok=1
  if [ "$ptxas_ok" = 0 ]; then
    if ! command -v python3 >/dev/null; then
      echo "ptxas is missing and there is no python3 to install it. Install Python 3, then run:" >&2
      echo "  python3 -m pip install nvidia-cuda-nvcc-cu12" >&2
      exit 1
    fi
    echo "setup: installing ptxas (pip nvidia-cuda-nvcc-cu12)" >&2
    if ! python3 -m pip install -q nvidia-cuda-nvcc-cu12 2>/dev/null && ! python3 -m pip install -q --user nvidia-cuda-nvcc-cu12; then
      echo "Could not install ptxas. Run:" >&2
      echo "  python3 -m pip install nvidia-cuda-nvcc-cu12" >&2
      exit 1
    fi
  fi
fi

if [ "${1:-}" = "--with-ptxas" ]; then
  nvdisasm_ok=0
  if [ -n "${NVDISASM:-}" ] && [ -x "$NVDISASM" ]; then nvdisasm_ok=1; fi
  command -v nvdisasm >/dev/null 2>&1 && nvdisasm_ok=1
  python3 -c "import nvidia, glob, sys; sys.exit(0 if any(glob.glob(p + '/**/bin/nvdisasm', recursive=True) for p in nvidia.__path__) else 1)" >/dev/null 2>&1 && nvdisasm_ok=1
  if [ "$nvdisasm_ok" = 0 ]; then
    echo "setup: installing nvdisasm (pip nvidia-cuda-nvdisasm)" >&2
    if ! python3 -m pip install -q nvidia-cuda-nvdisasm 2>/dev/null && ! python3 -m pip install -q --user nvidia-cuda-nvdisasm; then
      echo "Could not install nvdisasm. Run:" >&2
      echo "  python3 -m pip install nvidia-cuda-nvdisasm" >&2
      exit 1
    fi
  fi
fi
