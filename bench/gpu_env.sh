# Sourced by the device-call scripts (bench/paper_table.sh, bench/step_compare.sh): unpacks the
# release binaries built on the development machine and readies the libraries they load.
#   . bench/gpu_env.sh NAME...   each NAME from .gpu/NAME.gz (or .gpu/NAME.xz) into $BIN/NAME
# Sets BIN (/tmp/lexp-bin), LD_LIBRARY_PATH (cuBLAS and cuRAND from PyTorch's pip wheels, cuda
# 13: site-packages/nvidia/cu13/lib) and LEXP_CACHE. Returns 2, naming the file, when a binary
# is missing.
BIN=/tmp/lexp-bin
mkdir -p "$BIN"
for name in "$@"; do
  if [ -f ".gpu/$name.gz" ]; then
    gunzip -c ".gpu/$name.gz" > "$BIN/$name" || return 2
  elif [ -f ".gpu/$name.xz" ]; then
    xz -dc ".gpu/$name.xz" > "$BIN/$name" || return 2
  else
    echo "no .gpu/$name.gz or .gpu/$name.xz" >&2
    return 2
  fi
  chmod +x "$BIN/$name"
done
CUBLAS_DIRS=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + '/**/libcu[rb][al][na][ds]*.so*', recursive=True)})))" 2>/dev/null)
export LD_LIBRARY_PATH=${CUBLAS_DIRS}:${LD_LIBRARY_PATH:-}
export LEXP_CACHE=/tmp/lexp-cache
