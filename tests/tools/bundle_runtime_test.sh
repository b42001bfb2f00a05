#!/usr/bin/env bash
# tools/bundle_runtime.sh end to end: bundle this build, then with nothing but env.sh's
# variables (a clean environment) check that
#   1. ldd resolves every library of every bundled executable either from the bundle or as
#      glibc / CUDA (what the target machine provides);
#   2. `dsx --help` and a 2-step `dsx train` of the tiny recipe run;
#   3. where a private mount namespace can be made (root, unshare), step 2 again with every
#      bundled library's original file hidden (bound to /dev/null) and OpenMPI's/PMIx's
#      component folders emptied, as on a machine without those packages.
#   bundle_runtime_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build_dir="$(cd "$1" && pwd)"
src_dir="$(cd "$2" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/dsx-bundle-test.XXXXXX")"
trap 'rm -rf "$work"' EXIT

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

"$src_dir/tools/bundle_runtime.sh" --archive "$work/bundle.tar.xz" "$build_dir" "$work/bundle" ||
  fail "bundle_runtime.sh failed"
bundle="$work/bundle"
[[ -f "$bundle/env.sh" && -f "$bundle/lib/libopenblas.so.0" ]] || fail "env.sh or libopenblas.so.0 missing from the bundle"

# Runs "$@" in a clean environment that has only PATH, HOME and what env.sh exports.
in_bundle_env() {
  env -i PATH=/usr/bin:/bin HOME="$work" TMPDIR="$work" OMP_NUM_THREADS=2 \
    bash -c 'source "$0/env.sh" && exec "$@"' "$bundle" "$@"
}

# 1. Every resolved library: glibc, CUDA, or the bundle.
glibc_re='^(linux-vdso|ld-linux[^ ]*|libc|libm|libmvec|libdl|libpthread|librt|libresolv|libutil|libanl|libnsl)\.so'
cuda_re='^lib(cuda|cudart|cublas|cublasLt|cudnn[a-z_]*|nccl|nvrtc|nvJitLink)\.so'
checked=0
for exe in "$build_dir"/bin/* "$build_dir"/tests/dsx_*_tests "$build_dir"/bench/bench_*; do
  [[ -x "$exe" && -f "$exe" ]] || continue
  [[ "$(head -c 4 "$exe" | od -An -c | tr -d ' ')" == '177ELF' ]] || continue
  out="$(in_bundle_env ldd "$exe")" || fail "ldd $exe failed: $out"
  if grep -q "not found" <<<"$out"; then fail "$exe: unresolved with the bundle's env: $(grep 'not found' <<<"$out")"; fi
  while read -r name path; do
    [[ "$path" == "$bundle"/lib/* ]] && continue
    [[ "$name" =~ $glibc_re || "$name" =~ $cuda_re ]] && continue
    fail "$(basename "$exe"): $name resolves to $path, outside the bundle"
  done < <(awk '/=> \// { print $1, $3 }' <<<"$out")
  checked=$((checked + 1))
done
((checked > 0)) || fail "no executables checked"
echo "ldd: $checked executables resolve every non-system library from the bundle"

# 2. dsx runs on the bundle.
dsx="$build_dir/bin/dsx"
train_args=(train "$src_dir/recipes/tiny.yaml" --set train.steps=2 --set optim.schedule.warmup=1
  --set checkpoint.interval=0)
in_bundle_env "$dsx" --help | grep -q "train" || fail "dsx --help did not list train"
out="$(cd "$work" && in_bundle_env "$dsx" "${train_args[@]}" --set logging.run_dir="$work/run1" 2>&1)" ||
  fail "dsx train on the bundle failed: $out"
grep -q "^done: step 2" <<<"$out" || fail "dsx train did not finish 2 steps: $out"
echo "dsx --help and a 2-step tiny train ran with only env.sh's variables"

# 3. The same with the originals hidden, where a mount namespace is allowed.
if [[ $(id -u) -eq 0 ]] && command -v unshare >/dev/null && unshare -m --propagation private true 2>/dev/null; then
  hide="$work/hide.sh"
  {
    echo 'set -e'
    sed -n 's/^lib\/[^ ]* <- //p' "$bundle/MANIFEST.txt" | while read -r orig; do
      echo "mount --bind /dev/null '$orig'"
    done
    for d in /usr/lib/x86_64-linux-gnu/openmpi /usr/lib/x86_64-linux-gnu/pmix2 /usr/share/openmpi /etc/openmpi; do
      [[ -d "$d" ]] && echo "mount -t tmpfs none '$d'"
    done
    echo 'exec "$@"'
  } >"$hide"
  out="$(cd "$work" && unshare -m --propagation private bash "$hide" env -i PATH=/usr/bin:/bin HOME="$work" \
    OMP_NUM_THREADS=2 bash -c 'source "$0/env.sh" && exec "$@"' "$bundle" "$dsx" "${train_args[@]}" \
    --set logging.run_dir="$work/run2" 2>&1)" || fail "dsx train with the originals hidden failed: $out"
  grep -q "^done: step 2" <<<"$out" || fail "dsx train (originals hidden) did not finish: $out"
  echo "dsx train ran with every bundled library's original hidden"
else
  echo "note: no private mount namespace here (needs root + unshare); skipped the hidden-originals run"
fi
echo "bundle_runtime: all checks passed"
