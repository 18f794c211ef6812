#!/usr/bin/env bash
# edge_qmul on an emulated aarch64 board: `make test-arm64`.
#
#   tools/arm64.sh [STAGE ...]          (as root; stages default to: all)
#
# Builds once (cached) a Debian bookworm arm64 root (Python 3.11, glibc 2.36: what Raspberry Pi OS
# bookworm ships) with debootstrap, runs it under qemu-user (binfmt_misc), installs the project
# there as the README tells a board user (libgomp1, a venv, pip install -e '.[device,dev]'), and
# runs the board's tests inside it against the LiteRT that runs there: its aarch64 build.
#
# Stages (each idempotent):
#   host     apt-get install qemu-user-static binfmt-support debootstrap when missing
#   binfmt   mount binfmt_misc and register qemu-aarch64 (flag F: usable inside the chroot)
#   rootfs   debootstrap the arm64 root into $ARM64_CACHE/root (once)
#   sync     copy this checkout's files (tracked and untracked, not ignored) to /src in the root
#   install  the venv at /opt/edge-qmul in the root (again only when pyproject.toml changed)
#   tests    the selected tests inside the root (ARM64_TESTS to override), then the x86 host
#            driving an emulated agent (tests/test_arm64_agent.py)
#   record   re-record tests/fixtures/litert_aarch64 from the emulated LiteRT (then commit it)
#   shell    an interactive shell in the root
#   umount   undo the mounts (done on exit too)
#   all      host binfmt rootfs sync install tests
#
# Settings (environment):
#   ARM64_CACHE   where the root lives (default ~/.cache/edge_qmul/arm64)
#   ARM64_CPU     a76 (default: Raspberry Pi 5, Cortex-A76, dot product) or a72 (Raspberry Pi 4)
#   ARM64_SUITE   full (default: every test listed below) or ci (what .ci/run runs: the fixtures,
#                 the dot-product tiles, a training step and a forget job, and the agent; under
#                 emulation most of the time is numba compiling the kernels, so each further op
#                 family costs minutes, and the full suite does not fit CI's 90 minutes on a slow host)
#   ARM64_TESTS   pytest arguments replacing the suite's selection
#   ARM64_RANDOM  random single-op models per op inside the root (default 40; x86 runs 300)
#   ARM64_RECORD  random single-op models per op the record stage keeps (default 120: enough that
#                 every op whose arithmetic differs between the platforms shows it)
#
# Why a fake /proc/cpuinfo: qemu-user shows aarch64 programs the host's x86 /proc/cpuinfo, and
# LiteRT's CPU detection (cpuinfo_arm_linux_init) then crashes inside Interpreter(...). A Raspberry
# Pi style cpuinfo for the emulated CPU is bind-mounted over it, and QEMU_CPU names the same CPU, so
# that LLVM (numba) and LiteRT (ruy's dot-product dispatch) see one consistent Cortex-A76 or A72.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ARM64_CACHE=${ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge_qmul/arm64}
ROOT=$ARM64_CACHE/root
LOGS=$ARM64_CACHE/logs
SUITE=bookworm
MIRROR=${ARM64_MIRROR:-http://deb.debian.org/debian}
ARM64_CPU=${ARM64_CPU:-a76}
ARM64_RANDOM=${ARM64_RANDOM:-40}
VENV=/opt/edge-qmul
mkdir -p "$ARM64_CACHE" "$LOGS"

case "$ARM64_CPU" in
  a76) QEMU_CPU=cortex-a76 PART=0xd0b VARIANT=0x4 REV=1 MODEL="Raspberry Pi 5 Model B (emulated: qemu-user cortex-a76)"
       FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
  a72) QEMU_CPU=cortex-a72 PART=0xd08 VARIANT=0x0 REV=3 MODEL="Raspberry Pi 4 Model B (emulated: qemu-user cortex-a72)"
       FEATURES="fp asimd evtstrm crc32 cpuid" ;;
  *) echo "ARM64_CPU must be a76 or a72, got '$ARM64_CPU'" >&2; exit 2 ;;
esac

ARM64_SUITE=${ARM64_SUITE:-full}
case "$ARM64_SUITE" in
  full|ci) ;;
  *) echo "ARM64_SUITE must be full or ci, got '$ARM64_SUITE'" >&2; exit 2 ;;
esac

say() { printf '\n=== %s\n' "$*"; }
die() { echo "tools/arm64.sh: $*" >&2; exit 1; }

# A command line inside the root, in /src, with a clean environment and the emulated CPU.
arm() {
  chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=$VENV/bin:/usr/bin:/bin LANG=C.UTF-8 \
    QEMU_CPU=$QEMU_CPU PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt \
    ${ARM_ENV:-} /bin/bash -c "cd /src && $*"
}

stage_host() {
  local need=()
  for p in qemu-user-static binfmt-support debootstrap; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if ((${#need[@]})); then
    say "apt-get install ${need[*]}"
    apt-get update -q >"$LOGS/apt.log" 2>&1 || die "apt-get update failed (see $LOGS/apt.log)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >>"$LOGS/apt.log" 2>&1 \
      || die "apt-get install ${need[*]} failed (see $LOGS/apt.log)"
  fi
}

stage_binfmt() {
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || die "cannot mount binfmt_misc: this needs root on a kernel with binfmt_misc"
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || update-binfmts --import qemu-aarch64 \
      || die "cannot register qemu-aarch64 with binfmt_misc"
  fi
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "qemu-aarch64 binfmt entry is disabled"
}

stage_rootfs() {
  if [ ! -f "$ROOT/.edge-qmul-root" ]; then
    say "debootstrap arm64 $SUITE into $ROOT (once; a few minutes)"
    stage_umount
    # never delete through a mount (a bound /dev is the host's)
    ! grep -q " $ROOT/" /proc/mounts || die "something is still mounted under $ROOT; unmount it first"
    rm -rf "$ROOT"
    local t0=$SECONDS
    debootstrap --arch=arm64 --variant=minbase \
      --include=python3,python3-venv,python3-pip,ca-certificates,procps,libgomp1 \
      "$SUITE" "$ROOT" "$MIRROR" >"$LOGS/debootstrap.log" 2>&1 || die "debootstrap failed (see $LOGS/debootstrap.log)"
    echo "root built in $((SECONDS - t0)) s"
    touch "$ROOT/.edge-qmul-root"
  fi
  # pip inside the root trusts the host's CAs (PyPI may be reached through a proxy)
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-bundle.crt"
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
}

cpuinfo() {  # a Raspberry Pi style /proc/cpuinfo of the emulated CPU, one block per host CPU
  local n; n=$(nproc)
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\n' "$i" "$FEATURES"
    printf 'CPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$VARIANT" "$PART" "$REV"
  done
  printf 'Model\t\t: %s\n' "$MODEL"
}

MOUNTED=0
mounts() {
  [ -f "$ROOT/.edge-qmul-root" ] || die "no root at $ROOT: run the rootfs stage"
  mkdir -p "$ROOT/src"
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/sys" || mount -t sysfs sysfs "$ROOT/sys"
  mountpoint -q "$ROOT/dev" || mount --rbind /dev "$ROOT/dev"   # /dev/pts: the pty transport tests
  while grep -q " $ROOT/proc/cpuinfo " /proc/mounts; do umount "$ROOT/proc/cpuinfo"; done
  cpuinfo > "$ARM64_CACHE/cpuinfo-$ARM64_CPU"
  mount --bind "$ARM64_CACHE/cpuinfo-$ARM64_CPU" "$ROOT/proc/cpuinfo"
  MOUNTED=1
}

stage_umount() {
  while grep -q " $ROOT/proc/cpuinfo " /proc/mounts; do umount "$ROOT/proc/cpuinfo" || break; done
  for m in dev sys proc; do
    if mountpoint -q "$ROOT/$m"; then umount -R "$ROOT/$m" 2>/dev/null || umount -l "$ROOT/$m"; fi
  done
  MOUNTED=0
}
trap '[ "$MOUNTED" = 1 ] && stage_umount' EXIT

stage_sync() {
  # /src keeps its __pycache__ (numba's cache: compiling under emulation is slow), and the
  # package drops a stale cache itself (numba_cache.py); files gone from the checkout go here too
  say "sync $REPO -> $ROOT/src"
  [ -f "$ROOT/.edge-qmul-root" ] || die "no root at $ROOT: run the rootfs stage"
  mkdir -p "$ROOT/src"
  local list; list=$(mktemp)
  (cd "$REPO" && { git ls-files; git ls-files --others --exclude-standard; } | sort -u \
     | while read -r f; do [ -f "$f" ] && echo "$f"; done) > "$list"
  (cd "$REPO" && tar -cf - -T "$list") | tar -xf - -C "$ROOT/src"
  (cd "$ROOT/src" && find . -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -printf '%P\n' \
     | sort | comm -23 - "$list" | while read -r f; do rm -f "$f"; done)
  rm -f "$list"
}

stage_install() {
  local want; want=$(sha256sum "$ROOT/src/pyproject.toml" | cut -d' ' -f1)
  if [ "$(cat "$ROOT$VENV/.pyproject.sha256" 2>/dev/null)" != "$want" ]; then
    say "pip install -e '.[device,dev]' inside the root (aarch64 wheels; a few minutes)"
    local t0=$SECONDS
    rm -rf "$ROOT$VENV"
    arm "python3 -m venv $VENV && $VENV/bin/pip install -q --upgrade pip && $VENV/bin/pip install -e '.[device,dev]'" \
      >"$LOGS/pip.log" 2>&1 || die "pip install failed (see $LOGS/pip.log)"
    echo "$want" > "$ROOT$VENV/.pyproject.sha256"
    echo "installed in $((SECONDS - t0)) s"
  else
    arm "$VENV/bin/pip install -q --no-deps -e ." >"$LOGS/pip.log" 2>&1 || die "pip install failed (see $LOGS/pip.log)"
  fi
  arm "python - <<'EOF'
import platform, numba, llvmlite.binding as llvm, ai_edge_litert
from numba.np.ufunc import parallel
parallel._launch_threads()
print('machine', platform.machine(), '| LLVM CPU', llvm.get_host_cpu_name(), '| numba', numba.__version__,
      'threading layer', numba.threading_layer(), '| ai-edge-litert', ai_edge_litert.__version__)
EOF"
}

# The board's checks: every fixture and zoo model against the live aarch64 LiteRT (whole batch,
# per sample, every intermediate tensor), the random single-op sweeps (ARM64_RANDOM models per op),
# the recorded aarch64 outputs, quantization, a training run and a forget job (their bytes equal the
# x86 host's), threads, the transports; then tests/test_arm64_agent.py drives the agent from x86.
# (The root has what a board installs, '.[device]': no scikit-learn, so no digits data set there.)
DEFAULT_TESTS=(
  tests/test_fixtures.py tests/test_zoo.py::test_zoo_model_equals_litert_builtin
  tests/test_zoo.py::test_zoo_every_intermediate_tensor_equals_litert
  tests/test_random_ops.py tests/test_ops_activation.py tests/test_ops_binary.py tests/test_ops_mean.py
  tests/test_ops_movement.py tests/test_ops_resize.py tests/test_ops_lstm.py tests/test_litert_profiles.py
  tests/test_quant.py tests/test_threads.py tests/test_dot_tile.py
  tests/test_cross_platform.py tests/test_transport.py
  # a megabyte through each transport within 15 s: too tight for a CPU emulated 10-50x slower
  --deselect "tests/test_transport.py::test_one_megabyte_write_arrives_complete"
)

# CI's selection: every fixture against live aarch64 LiteRT (whole batch, per sample, every
# intermediate tensor), sdot bit-exact, training and forgetting byte-equal to x86; then the agent.
# On the Zen 3 host of 2026-12-03 these took 1072 s cold inside the root (beside a pytest run).
CI_TESTS=(tests/test_fixtures.py tests/test_dot_tile.py tests/test_cross_platform.py)

stage_tests() {
  mounts
  local t0=$SECONDS rc=0
  local args
  if [ "$ARM64_SUITE" = ci ]; then args=("${CI_TESTS[@]}"); else args=("${DEFAULT_TESTS[@]}"); fi
  [ -n "${ARM64_TESTS:-}" ] && read -r -a args <<< "$ARM64_TESTS"
  say "pytest inside the emulated $QEMU_CPU: ${args[*]}"
  ARM_ENV="EDGE_QMUL_RANDOM_OPS_N=$ARM64_RANDOM ${ARM_ENV:-}" \
    arm "python -m pytest -q -p no:cacheprovider ${args[*]}" || rc=$?
  [ "$rc" = 5 ] && rc=0   # nothing selected is not a failure of the board
  echo "inside the root: $((SECONDS - t0)) s, rc=$rc"
  if [ -z "${ARM64_TESTS:-}" ]; then
    say "x86 host -> emulated aarch64 agent (tests/test_arm64_agent.py)"
    local t1=$SECONDS rc2=0
    EDGE_QMUL_ARM64_ROOT=$ROOT EDGE_QMUL_ARM64_VENV=$VENV QEMU_CPU=$QEMU_CPU \
      "$REPO/.venv/bin/python" -m pytest -q -p no:cacheprovider "$REPO/tests/test_arm64_agent.py" || rc2=$?
    echo "host -> agent: $((SECONDS - t1)) s, rc=$rc2"
    ((rc)) || rc=$rc2
  fi
  return $rc
}

stage_record() {
  mounts
  say "recording aarch64 LiteRT's outputs into tests/fixtures/litert_aarch64"
  arm "rm -rf /tmp/rec && python tools/record_litert.py --out /tmp/rec"
  ARM_ENV="EDGE_QMUL_LITERT_RECORD=/tmp/rec/random EDGE_QMUL_RANDOM_OPS_N=${ARM64_RECORD:-120}" \
    arm "python -m pytest -q -p no:cacheprovider tests/test_random_ops.py tests/test_ops_activation.py \
         tests/test_ops_binary.py tests/test_ops_mean.py tests/test_ops_movement.py tests/test_ops_resize.py \
         -k 'litert or equal'" || true
  rm -rf "$REPO/tests/fixtures/litert_aarch64"
  cp -r "$ROOT/tmp/rec" "$REPO/tests/fixtures/litert_aarch64"
  du -sh "$REPO/tests/fixtures/litert_aarch64"
}

stage_shell() { mounts; arm "exec bash -i"; }

STAGES=("$@")
((${#STAGES[@]})) || STAGES=(all)
for s in "${STAGES[@]}"; do
  case "$s" in
    all) stage_host; stage_binfmt; stage_rootfs; stage_sync; mounts; stage_install; stage_tests ;;
    host|binfmt|rootfs|sync|tests|record|shell|umount) "stage_$s" ;;
    install) mounts; stage_install ;;
    *) die "unknown stage '$s' (host binfmt rootfs sync install tests record shell umount all)" ;;
  esac
done
