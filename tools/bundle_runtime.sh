#!/usr/bin/env bash
# Collects the shared libraries a dsx build needs at run time, other than the C library and
# the CUDA libraries, so the build can run on a machine without dsx's packages (OpenMPI, HDF5,
# yaml-cpp, fmt, OpenBLAS, ...), e.g. a GPU machine that has only CUDA and PyTorch.
#
#   tools/bundle_runtime.sh [options] BUILD_DIR OUT_DIR
#     BUILD_DIR  a dsx build tree: the executables in bin/, tests/ and bench/ (those present)
#     OUT_DIR    created (emptied first): lib/, openmpi/, pmix/, env.sh, MANIFEST.txt
#   --archive FILE      also pack OUT_DIR into FILE (.tar.xz; OpenBLAS's 36 MiB shrink to 4): the
#                       size limit then applies to FILE, the form in which the bundle travels
#   --max-mib N         fail when the bundle (or FILE) exceeds N MiB (default 64)
#   --no-libstdcxx      leave libstdc++ and libgcc_s to the target machine (bundled by default:
#                       a machine with an older g++ lacks the GLIBCXX versions this build needs)
#   --exe FILE          bundle for FILE too (repeatable)
#
# Then, on the target machine:  source OUT_DIR/env.sh; OUT_DIR/../bin/dsx ...
# env.sh puts OUT_DIR/lib first on LD_LIBRARY_PATH, then the CUDA libraries it finds there
# (pip's nvidia-* wheels through python3, /usr/local/cuda), puts the bundled mpirun first on
# PATH and points OpenMPI and PMIx at the bundled components and help files instead of their
# install prefix.
#
# Left out: glibc's libraries (libc, libm, libdl, libpthread, librt, libresolv, ld.so, ...),
# which cannot be swapped under a running system, and every CUDA toolkit or driver library
# (libcuda, libcudart, libcublas*, libcudnn*, libnccl, ...), which must match the target's
# driver and come from there. MANIFEST.txt lists each bundled file, where it came from and the
# newest glibc symbol version the bundle needs (the target's glibc must be at least that).
set -euo pipefail

usage() { sed -n '2,26p' "$0"; }

max_mib=64
archive=""
with_libstdcxx=1
extra_exes=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --max-mib) max_mib="$2"; shift 2 ;;
    --archive) archive="$2"; shift 2 ;;
    --no-libstdcxx) with_libstdcxx=0; shift ;;
    --exe) extra_exes+=("$2"); shift 2 ;;
    --) shift; break ;;
    -*) echo "bundle_runtime.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -ne 2 ]]; then
  usage >&2
  exit 2
fi
build_dir="$(cd "$1" && pwd)"
out_dir="$2"

# --- which libraries stay behind ------------------------------------------------------------
is_glibc() {
  case "$1" in
    linux-vdso.so* | linux-gate.so* | ld-linux*.so* | libc.so.* | libm.so.* | libmvec.so.* | libdl.so.* | \
      libpthread.so.* | librt.so.* | libresolv.so.* | libutil.so.* | libanl.so.* | libnsl.so.* | \
      libBrokenLocale.so.* | libc_malloc_debug.so.* | libthread_db.so.*) return 0 ;;
  esac
  return 1
}
is_cxx_runtime() {
  case "$1" in libstdc++.so.* | libgcc_s.so.*) return 0 ;; esac
  return 1
}
is_cuda() {  # by name, and by place for anything else a CUDA library pulls in
  case "$1" in
    libcuda.so* | libcudart.so* | libcublas.so* | libcublasLt.so* | libcudnn*.so* | libnccl.so* | \
      libnvrtc*.so* | libnvJitLink.so* | libcufft*.so* | libcurand.so* | libcusparse*.so* | libcusolver*.so* | \
      libnvToolsExt.so* | libnvidia-*.so* | libcupti.so* | libnvblas.so*) return 0 ;;
  esac
  case "$2" in /usr/local/cuda* | */nvidia/* | */cuda-*/*) return 0 ;; esac
  return 1
}
stays_behind() {  # NAME PATH
  is_glibc "$1" && return 0
  is_cuda "$1" "$2" && return 0
  [[ $with_libstdcxx -eq 0 ]] && is_cxx_runtime "$1" && return 0
  return 1
}

# ldd of FILE as "NAME PATH" lines (PATH "not-found" when unresolved); every dependency, direct
# or not, is listed by ldd already.
deps_of() {
  LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}" ldd "$1" 2>/dev/null | awk '
    /=> not found/ { print $1, "not-found"; next }
    /=> \// { print $1, $3; next }
    /^\t\// { n = split($1, p, "/"); print p[n], $1 }'
}

is_elf() { [[ -f "$1" && "$(head -c 4 "$1" | od -An -c | tr -d ' ')" == '177ELF' ]]; }

# --- the executables --------------------------------------------------------------------------
exes=()
for f in "$build_dir"/bin/* "$build_dir"/tests/* "$build_dir"/bench/* "${extra_exes[@]}"; do
  [[ -x "$f" ]] && is_elf "$f" && exes+=("$f")
done
if [[ ${#exes[@]} -eq 0 ]]; then
  echo "bundle_runtime.sh: no executables under $build_dir/{bin,tests,bench}" >&2
  exit 1
fi

rm -rf "$out_dir"
mkdir -p "$out_dir/lib"
out_dir="$(cd "$out_dir" && pwd)"
manifest="$out_dir/MANIFEST.txt"
: >"$manifest"

declare -A bundled=()  # NAME -> source path
missing=()
add_deps_of() {  # FILE: bundle every dependency of FILE that does not stay behind
  local name path
  while read -r name path; do
    [[ -n "$name" ]] || continue
    if [[ "$path" == not-found ]]; then
      is_cuda "$name" "" || missing+=("$name (needed by $1)")
      continue
    fi
    stays_behind "$name" "$path" && continue
    [[ -n "${bundled[$name]:-}" ]] && continue
    cp -L "$path" "$out_dir/lib/$name"
    chmod u+w "$out_dir/lib/$name"
    bundled[$name]="$(readlink -f "$path")"
  done < <(deps_of "$1")
}
for exe in "${exes[@]}"; do add_deps_of "$exe"; done
if [[ ${#missing[@]} -gt 0 ]]; then
  printf 'bundle_runtime.sh: unresolved libraries on this machine:\n' >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi

# A plugin (dlopened by OpenMPI or PMIx) is bundled only when everything it links is bundled
# already, stays behind, or is in ALLOWED (PMIx and its munge); the network fabrics (UCX,
# libfabric, verbs, PSM) are left out: one machine, one process, no fabric needed.
plugin_ok() {  # FILE ALLOWED...
  local file="$1" name path allowed
  shift
  while read -r name path; do
    [[ "$path" == not-found ]] && return 1
    stays_behind "$name" "$path" && continue
    [[ -n "${bundled[$name]:-}" ]] && continue
    for allowed in "$@"; do [[ "$name" == "$allowed" ]] && continue 2; done
    return 1
  done < <(deps_of "$file")
  return 0
}
copy_plugins() {  # SRC_DIR DEST_DIR ALLOWED...
  local src="$1" dest="$2" f kept=0 skipped=0
  shift 2
  mkdir -p "$dest"
  for f in "$src"/*.so; do
    [[ -e "$f" ]] || continue
    if plugin_ok "$f" "$@"; then
      cp -L "$f" "$dest/"
      add_deps_of "$f"
      kept=$((kept + 1))
    else
      skipped=$((skipped + 1))
    fi
  done
  echo "plugins $src: $kept bundled, $skipped left out (their libraries are not bundled)" >>"$manifest"
}

# OpenMPI (when libmpi is a dependency): a single-process `dsx train` never calls MPI_Init, but
# anything that does (a benchmark, a 1-rank NCCL run) needs the MCA components, help texts and
# default parameters, found through the OPAL_* variables env.sh sets.
if [[ -n "${bundled[libmpi.so.40]:-}${bundled[libmpi.so.12]:-}" ]] && command -v ompi_info >/dev/null; then
  ompi_path() { ompi_info --path "$1" --parsable 2>/dev/null | sed -n "s/^path:$1://p"; }
  pkglibdir="$(ompi_path pkglibdir)"
  pkgdatadir="$(ompi_path pkgdatadir)"
  sysconfdir="$(ompi_path sysconfdir)"
  mkdir -p "$out_dir/openmpi/share" "$out_dir/openmpi/etc" "$out_dir/openmpi/bin"
  if [[ -d "$pkglibdir" ]]; then
    copy_plugins "$pkglibdir" "$out_dir/openmpi/lib" libpmix.so.2 libmunge.so.2
  fi
  # The launcher (orterun = mpirun = mpiexec) and its daemon, for `mpirun -np N` on one machine.
  bindir="$(ompi_path bindir)"
  for tool in orterun orted; do
    if [[ -x "$bindir/$tool" ]]; then
      cp -L "$bindir/$tool" "$out_dir/openmpi/bin/"
      add_deps_of "$bindir/$tool"
    fi
  done
  if [[ -x "$out_dir/openmpi/bin/orterun" ]]; then
    ln -s orterun "$out_dir/openmpi/bin/mpirun"
    ln -s orterun "$out_dir/openmpi/bin/mpiexec"
  fi
  [[ -d "$pkgdatadir" ]] && cp -rL "$pkgdatadir" "$out_dir/openmpi/share/openmpi"
  [[ -f "$sysconfdir/openmpi-mca-params.conf" ]] && cp -L "$sysconfdir/openmpi-mca-params.conf" "$out_dir/openmpi/etc/"
  # PMIx (external in Debian's OpenMPI) has its own plugins, found through PMIX_MCA_* variables.
  if [[ -n "${bundled[libpmix.so.2]:-}" ]]; then
    pmix_plugins="$(dirname "${bundled[libpmix.so.2]}")/pmix"
    [[ -d "$pmix_plugins" ]] && copy_plugins "$pmix_plugins" "$out_dir/pmix" libmunge.so.2
  fi
fi
mkdir -p "$out_dir/lib/hwloc"  # hwloc's plugin path: empty, so the host's plugins are never mixed in

# --- manifest, env.sh, size -------------------------------------------------------------------
for name in $(printf '%s\n' "${!bundled[@]}" | sort); do
  echo "lib/$name <- ${bundled[$name]}" >>"$manifest"
done
glibc_needed="$(find "$out_dir" -name '*.so*' -type f -exec objdump -T {} + 2>/dev/null |
  grep -o 'GLIBC_[0-9.]*' | sort -t. -k1,1 -k2,2n -k3,3n -u | tail -n 1 || true)"
for exe in "${exes[@]}"; do
  v="$(objdump -T "$exe" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -t. -k1,1 -k2,2n -k3,3n -u | tail -n 1 || true)"
  [[ -n "$v" ]] && glibc_needed="$(printf '%s\n%s\n' "$glibc_needed" "$v" | sort -t. -k1,1 -k2,2n -k3,3n | tail -n 1)"
done
echo "needs glibc >= ${glibc_needed#GLIBC_} on the target (this machine: $(ldd --version | head -n 1 | awk '{print $NF}'))" >>"$manifest"

cat >"$out_dir/env.sh" <<'ENV'
# Source from bash: `source <bundle>/env.sh`. Made by tools/bundle_runtime.sh; see MANIFEST.txt.
DSX_BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export DSX_BUNDLE

# The target's CUDA libraries: pip's nvidia-* wheels (cuDNN, NCCL, cuBLAS next to PyTorch),
# then the toolkit. Only folders that hold shared libraries are added.
_dsx_cuda_dirs=""
_dsx_add_dir() {
  case ":$_dsx_cuda_dirs:" in *":$1:"*) return ;; esac
  compgen -G "$1/*.so*" >/dev/null && _dsx_cuda_dirs="${_dsx_cuda_dirs:+$_dsx_cuda_dirs:}$1"
}
for _dsx_py in python3 python; do
  command -v "$_dsx_py" >/dev/null || continue
  for _dsx_root in $("$_dsx_py" -c 'import nvidia, os; print(" ".join(os.path.abspath(p) for p in nvidia.__path__))' 2>/dev/null); do
    for _dsx_dir in "$_dsx_root"/*/lib "$_dsx_root"/*/*/lib; do
      [[ -d "$_dsx_dir" ]] && _dsx_add_dir "$_dsx_dir"
    done
  done
  break
done
for _dsx_dir in "${CUDA_HOME:-/usr/local/cuda}/lib64" "${CUDA_HOME:-/usr/local/cuda}/lib" /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu/nvidia; do
  [[ -d "$_dsx_dir" ]] && _dsx_add_dir "$_dsx_dir"
done
export DSX_CUDA_LIBRARY_DIRS="$_dsx_cuda_dirs"
export LD_LIBRARY_PATH="$DSX_BUNDLE/lib${_dsx_cuda_dirs:+:$_dsx_cuda_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _dsx_cuda_dirs _dsx_py _dsx_root _dsx_dir
unset -f _dsx_add_dir

# OpenMPI without its install: every folder it would derive from its configured prefix.
export OPAL_PREFIX="$DSX_BUNDLE/openmpi"
export OPAL_EXEC_PREFIX="$OPAL_PREFIX"
export OPAL_BINDIR="$OPAL_PREFIX/bin"
export OPAL_LIBDIR="$DSX_BUNDLE/lib"
export OPAL_PKGLIBDIR="$OPAL_PREFIX/lib"
export OPAL_DATAROOTDIR="$OPAL_PREFIX/share"
export OPAL_DATADIR="$OPAL_PREFIX/share"
export OPAL_PKGDATADIR="$OPAL_PREFIX/share/openmpi"
export OPAL_SYSCONFDIR="$OPAL_PREFIX/etc"
export OMPI_MCA_mca_base_component_path="$OPAL_PREFIX/lib"
export PATH="$OPAL_BINDIR${PATH:+:$PATH}"  # mpirun / mpiexec (bundled OpenMPI)
# A process started without mpirun (singleton) runs alone instead of forking an orted daemon.
export OMPI_MCA_ess_singleton_isolated=1
export PMIX_MCA_mca_base_component_path="$DSX_BUNDLE/pmix"
export HWLOC_PLUGINS_PATH="$DSX_BUNDLE/lib/hwloc"
ENV

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
size_bytes="$(du -sb "$out_dir" | awk '{print $1}')"
what="$out_dir"
echo "bundle: $out_dir: ${#bundled[@]} libraries for ${#exes[@]} executables, $(mib "$size_bytes") MiB" \
  "($(tail -n 1 "$manifest"))"
if [[ -n "$archive" ]]; then
  mkdir -p "$(dirname "$archive")"
  tar -C "$(dirname "$out_dir")" -cf - "$(basename "$out_dir")" | xz -T0 -3 >"$archive"
  size_bytes="$(stat -c %s "$archive")"
  what="$archive"
  echo "bundle archive: $archive: $(mib "$size_bytes") MiB"
fi
if ((size_bytes > max_mib * 1048576)); then
  echo "bundle_runtime.sh: $what ($(mib "$size_bytes") MiB) exceeds --max-mib $max_mib" >&2
  exit 1
fi
