#!/usr/bin/env bash
# Prepares a GPU session on a machine that has CUDA and PyTorch but none of dsx's other packages
# (docs/GPU.md). Run here, on the build machine:
#   tools/gpu/pack.sh [--build-dir DIR] [--no-build] [--jobs N]
# It builds the release tree with CUDA for any x86-64-v3 CPU (preset gpu-pack: no
# -march=native, since the GPU machine's CPU differs), then fills the ignored folder .gpu/:
#   .gpu/dsx-gpu.tar.xz   bin/dsx, the executables of the gpu-labelled tests (tests/...),
#                         gpu-tests.json (those tests, relocatable: tools/gpu/gpu_tests.py),
#                         bench/bench_cuda_* and runtime/ (the libraries they need, from
#                         tools/bundle_runtime.sh, with env.sh)
#   .gpu/include/catch2/  Catch2 v2's header, for the standalone build there (not committed)
#   .gpu/cuda-include/    cuDNN and NCCL headers, used by the standalone build only where the
#                         GPU machine has none (pip's wheels may ship libraries without them)
# and prints what to carry. .gpu/ must stay under 64 MiB with the tree: checked.
# There: `bash tools/gpu/run_all.sh` (carrying .gpu) runs the tests, benchmarks and trainings.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"

build_dir="$root/build/gpu-pack"
do_build=1
jobs="$(nproc)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    --build-dir) build_dir="$(realpath -m "$2")"; shift 2 ;;
    --no-build) do_build=0; shift ;;
    --jobs) jobs="$2"; shift 2 ;;
    *) echo "pack.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
limit_mib=60  # of the 64 MiB that the tree and the carried folders may take together

if [[ $do_build -eq 1 ]]; then
  if [[ "$build_dir" == "$root/build/gpu-pack" ]]; then
    cmake --preset gpu-pack >/dev/null
  else
    cmake -S "$root" -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSX_CUDA=ON -DDSX_NATIVE=OFF \
      -DCMAKE_CXX_FLAGS=-march=x86-64-v3 >/dev/null
  fi
  # Only what travels: the CLI, what the gpu-labelled tests run, and the CUDA benchmarks.
  targets=(dsx)
  for out in $(python3 "$root/tools/gpu/gpu_tests.py" outputs "$build_dir"); do
    ninja -C "$build_dir" -t query "$out" >/dev/null 2>&1 && targets+=("$out")
  done
  while read -r t; do targets+=("$t"); done < <(ninja -C "$build_dir" -t targets all 2>/dev/null |
    sed -n 's/^\(bench_cuda_[A-Za-z0-9_]*\): .*/\1/p' | sort -u)
  echo "pack: building ${targets[*]} in $build_dir"
  ninja -C "$build_dir" -j "$jobs" "${targets[@]}"
fi
grep -q '^DSX_CUDA:BOOL=ON' "$build_dir/CMakeCache.txt" || { echo "pack.sh: $build_dir is not a DSX_CUDA=ON build" >&2; exit 1; }
if grep -q -- '-march=native' "$build_dir/compile_commands.json" 2>/dev/null; then
  echo "pack: warning: $build_dir compiles with -march=native; the GPU machine's CPU may lack those instructions" >&2
fi

stage="$(mktemp -d "${TMPDIR:-/tmp}/dsx-gpu-pack.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
pkg="$stage/dsx-gpu"
mkdir -p "$pkg/bin" "$pkg/bench"
# The gpu tests as ctest runs them, relocatable (tools/gpu/gpu_tests.py), with their files.
python3 "$root/tools/gpu/gpu_tests.py" manifest "$build_dir" "$root" "$pkg/gpu-tests.json" >"$stage/files.txt"
while read -r rel; do
  mkdir -p "$pkg/$(dirname "$rel")"
  cp "$build_dir/$rel" "$pkg/$rel"
done <"$stage/files.txt"
cp "$build_dir/bin/dsx" "$pkg/bin/"
for b in "$build_dir"/bench/bench_cuda_*; do [[ -x "$b" ]] && cp "$b" "$pkg/bench/"; done
echo "pack: $(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["tests"]))' "$pkg/gpu-tests.json") gpu tests," \
  "files: bin/dsx $(tr '\n' ' ' <"$stage/files.txt")$(cd "$pkg" && ls bench/ 2>/dev/null | sed 's|^|bench/|' | tr '\n' ' ')"
"$root/tools/bundle_runtime.sh" --max-mib 128 "$pkg" "$pkg/runtime"
{
  echo "built: $(date -u +%FT%TZ) on $(uname -n) from $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "$(git -C "$root" diff --quiet 2>/dev/null || echo '(with uncommitted changes)')"
  echo "build dir: $build_dir"
  echo "nvcc: $(/usr/local/cuda/bin/nvcc --version 2>/dev/null | tail -n 1)"
  grep -E '^(CMAKE_BUILD_TYPE|CMAKE_CXX_FLAGS|CMAKE_CUDA_ARCHITECTURES|DSX_NATIVE):' "$build_dir/CMakeCache.txt"
} >"$pkg/BUILD_INFO"

rm -rf "$root/.gpu"
mkdir -p "$root/.gpu/include" "$root/.gpu/cuda-include"
tar -C "$stage" -cf - dsx-gpu | xz -T0 -6 >"$root/.gpu/dsx-gpu.tar.xz"
catch2="$(dirname "$(find /usr/include /usr/local/include -path '*/catch2/catch.hpp' -print -quit 2>/dev/null)")"
[[ -f "$catch2/catch.hpp" ]] || { echo "pack.sh: catch2/catch.hpp (Catch2 v2) not found" >&2; exit 1; }
cp -r "$catch2" "$root/.gpu/include/catch2"
cuda_inc="$(dirname "$(readlink -f /usr/local/cuda/bin/nvcc)")/../include"
cp "$cuda_inc"/cudnn*.h "$root/.gpu/cuda-include/" 2>/dev/null || true
cp "$cuda_inc"/nccl.h "$root/.gpu/cuda-include/" 2>/dev/null || true

size="$(du -sb "$root/.gpu" | awk '{print $1}')"
tree="$(git -C "$root" ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | awk '{print $1}')"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "pack: .gpu/ is $(mib "$size") MiB (the working tree $(mib "${tree:-0}") MiB)"
if ((size > limit_mib * 1048576)); then
  echo "pack.sh: .gpu/ exceeds $limit_mib MiB" >&2
  exit 1
fi
cat <<EOF
pack: ready. On the GPU machine, with the working tree and .gpu carried:
  carry:   [".gpu"]
  command: bash tools/gpu/run_all.sh        (writes its logs to \$OUT; see docs/GPU.md)
EOF
