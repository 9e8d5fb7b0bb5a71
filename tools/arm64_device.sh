#!/usr/bin/env bash
# An emulated aarch64 Linux device on this x86-64 machine: qemu user mode, an arm64 Debian rootfs with
# Python and TVM's runtime, and the cross toolchain that links aarch64 bundles. Needs root (apt, chroot,
# binfmt). See docs/aarch64.md.
#
#   tools/arm64_device.sh setup                    install the tools and build the rootfs (once; cached)
#   tools/arm64_device.sh run BUNDLE INPUTS.npz OUTPUTS.npz
#                                                  run an aarch64 bundle on the device directly (no RPC):
#                                                  its outputs by name (tools/board_run.py on the device)
#   tools/arm64_device.sh python ARGS...           run the device's python3 (files under /srv/work of the rootfs)
#   tools/arm64_device.sh rpc-server --tracker HOST:PORT --key KEY [--port PORT]
#                                                  a TVM RPC server on the device, on 127.0.0.1, registered
#                                                  with the tracker (runs until killed)
#   tools/arm64_device.sh count COUNTS ARGS...     the device's python3 ARGS under the instruction-counting
#                                                  plugin (tools/qemu_insn_count.c), its counts written to
#                                                  COUNTS (a path inside the rootfs); onnxruntime importable
#   tools/arm64_device.sh root                     print the rootfs directory (the device's / )
#
# QEMU_CPU picks the emulated CPU (default max: NEON, dotprod, i8mm, SVE; cortex-a76: dotprod, no i8mm;
# cortex-a53: neither). The rootfs lives in $LPBQ_ARM64_ROOT (default ~/.cache/lpbq_tvm/arm64-<tvm version>).
set -euo pipefail

# The board runs the TVM the project pins (pyproject.toml): the versions that compile its libraries.
read -r tvm_version ffi_version < <(python3 - "$(dirname "$0")/../pyproject.toml" <<'PY'
import sys, tomllib
pins = dict(d.split("==") for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"] if "==" in d)
print(pins["apache-tvm"], pins["apache-tvm-ffi"])
PY
)
# The benchmark's onnxruntime: the host's version when it has one.
ort_version=$(python3 -c "import importlib.metadata as m; print('==' + m.version('onnxruntime'))" 2>/dev/null || true)
contents="python3 tvm $tvm_version ffi $ffi_version onnxruntime$ort_version"  # a rootfs of other contents is rebuilt
root=${LPBQ_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/lpbq_tvm/arm64-$tvm_version}
packages=(qemu-user-static qemu-user binfmt-support crossbuild-essential-arm64 mmdebstrap gcc)
here=$(cd "$(dirname "$0")" && pwd)

install_tools() {
  local missing=()
  for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# The arm64 side: Debian 12's python3 (3.11, as the wheels) unpacked without running any package script
# (nothing emulated), and the aarch64 wheels of the same TVM the host compiles with, runtime library only.
build_rootfs() {
  [ "$(cat "$root/.complete" 2>/dev/null)" = "$contents" ] && return
  echo "building the arm64 rootfs in $root" >&2
  rm -rf --one-file-system "$root" "$root.partial"
  mkdir -p "$(dirname "$root")"
  mmdebstrap --quiet --arch=arm64 --variant=extract --include=python3,libstdc++6,zlib1g bookworm "$root.partial"
  local wheels
  wheels=$(mktemp -d)
  local platform=(--only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
    --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp)
  python3 -m pip download --quiet --no-deps "${platform[@]}" -d "$wheels" "apache-tvm==$tvm_version" \
    "apache-tvm-ffi==$ffi_version" numpy ml_dtypes typing_extensions cloudpickle psutil
  python3 -m pip install --quiet --no-deps --no-compile "${platform[@]}" --target "$root.partial/srv/site" "$wheels"/*.whl
  rm -rf "$wheels"/* "$root.partial/srv/site/tvm/lib/libtvm_compiler.so"  # the device loads the runtime only
  # onnxruntime (the benchmark's reference), apart: only the counting runs put it on the path.
  python3 -m pip download --quiet --no-deps "${platform[@]}" -d "$wheels" "onnxruntime$ort_version"
  python3 -m pip install --quiet --no-deps --no-compile "${platform[@]}" --target "$root.partial/srv/ort" "$wheels"/*.whl
  rm -rf "$wheels"
  mkdir -p "$root.partial/srv/work" "$root.partial/proc"
  echo "$contents" > "$root.partial/.complete"
  mv "$root.partial" "$root"
}

# The dynamic qemu (the static one takes no plugins) with its x86-64 libraries and loader, and the plugin,
# inside the rootfs: the counting runs start it in the chroot through that loader.
install_counter() {
  local qemu="$root/srv/qemu"
  mkdir -p "$qemu/lib"
  cp /usr/bin/qemu-aarch64 "$qemu/"
  ldd /usr/bin/qemu-aarch64 | awk '/=>/ {print $3} /ld-linux/ {print $1}' | xargs -I{} cp -L {} "$qemu/lib/"
  gcc -O2 -Wall -shared -fPIC -fvisibility=hidden -o "$qemu/qemu_insn_count.so" "$here/qemu_insn_count.c"
}

# binfmt lets an emulated process start another one (TVM's RPC server forks a worker that runs python3).
enable_binfmt() {
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 2>/dev/null || true
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "binfmt for qemu-aarch64 is not available" >&2; exit 1; }
}

# Run a command of the rootfs in a chroot, with /proc mounted in a mount namespace of its own: the mount
# ends with the process and is never seen from outside (nor by a rebuild's rm).
in_device() {
  exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin QEMU_CPU="${QEMU_CPU:-max}" "$@"
}

device_python() {
  in_device HOME=/srv/work PYTHONPATH=/srv/site TVM_USE_RUNTIME_LIB=1 unshare --mount --propagation private -- \
    /bin/sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" /usr/bin/python3 "$@"' "$root" "$@"
}

counted_python() {
  local counts=$1
  shift
  in_device unshare --mount --propagation private -- /bin/sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' \
    "$root" /srv/qemu/lib/ld-linux-x86-64.so.2 --library-path /srv/qemu/lib /srv/qemu/qemu-aarch64 \
    -plugin "/srv/qemu/qemu_insn_count.so,out=$counts" -E HOME=/srv/work -E PYTHONPATH=/srv/site:/srv/ort \
    -E TVM_USE_RUNTIME_LIB=1 /usr/bin/python3 "$@"
}

command=${1:-}
shift || true
case "$command" in
  setup)
    install_tools
    build_rootfs
    install_counter
    enable_binfmt
    echo "$root"
    ;;
  root)
    echo "$root"
    ;;
  run)
    [ $# -eq 3 ] || { echo "run needs BUNDLE INPUTS.npz OUTPUTS.npz" >&2; exit 2; }
    [ -f "$1/manifest.json" ] || { echo "run: $1 is not a bundle (no manifest.json)" >&2; exit 2; }
    job=$(mktemp -d "$root/srv/work/run-XXXXXX")
    trap 'rm -rf "$job"' EXIT
    cp -r "$1" "$job/bundle"
    cp "$2" "$job/inputs.npz"
    cp "$here/board_run.py" "$job/"
    inside=/srv/work/$(basename "$job")
    (device_python "$inside/board_run.py" tvm "$inside/bundle" "$inside/inputs.npz" --outputs "$inside/outputs.npz")
    cp "$job/outputs.npz" "$3"
    ;;
  count)
    [ $# -ge 2 ] || { echo "count needs COUNTS and the python arguments" >&2; exit 2; }
    counted_python "$@"
    ;;
  python)
    device_python "$@"
    ;;
  rpc-server)
    tracker="" key="" port=9190
    while [ $# -gt 0 ]; do
      case "$1" in
        --tracker) tracker=$2; shift 2 ;;
        --key) key=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        *) echo "rpc-server: unknown argument $1" >&2; exit 2 ;;
      esac
    done
    [ -n "$tracker" ] && [ -n "$key" ] || { echo "rpc-server needs --tracker HOST:PORT and --key KEY" >&2; exit 2; }
    device_python -m tvm.exec.rpc_server --host 127.0.0.1 --port "$port" --port-end "$((port + 100))" \
      --tracker "$tracker" --key "$key"
    ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
    ;;
esac
