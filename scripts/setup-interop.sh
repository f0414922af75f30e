#!/usr/bin/env bash
# Prepares everything the interop tests (test/interop) need to boot a Linux guest under QEMU's
# vfio-user-pci client, from Debian's packages only:
#
#   $DIR/qemu-root/        a Debian trixie root with qemu-system-x86 from trixie-backports (QEMU 11.1),
#                          run in place through its own loader (see ../../shared/peers.md)
#   $DIR/guest/vmlinuz     Debian 12's linux-image-amd64 kernel
#   $DIR/guest/vmlinux     the same kernel decompressed (an ELF with a PVH entry: QEMU boots it
#                          without the bzImage's self-decompression, ~2.5 s faster under TCG)
#   $DIR/guest/modules/    the kernel modules the tests load, uncompressed, with a modules.dep
#   $DIR/guest/busybox     busybox-static, the guest's whole userland
#   $DIR/guest/fio/        fio with its shared libraries and loader, at their guest paths
#   $DIR/manifest          what was fetched (package versions), $DIR/.complete the stamp
#
# DIR is ${VFIO_USER_INTEROP_DIR:-/var/cache/vfio-user-interop}. Idempotent: when the stamp matches
# this script's configuration it exits at once without touching the network. Guest pieces are
# unpacked from .deb files (apt-get download + dpkg-deb -x), never installed on the host; the only
# host packages it may install are mmdebstrap (and xz-utils/zstd if modules come compressed).
#
# Environment:
#   VFIO_USER_INTEROP_DIR      cache directory (default /var/cache/vfio-user-interop)
#   VFIO_USER_INTEROP_MODULES  extra guest kernel modules to fetch (space separated), added to the
#                              fixed set below
#   VFIO_USER_INTEROP_MIRROR   Debian mirror for the trixie root (default http://deb.debian.org/debian)
#   VFIO_USER_INTEROP_REFRESH=1  rebuild everything even if the stamp matches
set -euo pipefail

SETUP_VERSION=2
DIR=${VFIO_USER_INTEROP_DIR:-/var/cache/vfio-user-interop}
MIRROR=${VFIO_USER_INTEROP_MIRROR:-http://deb.debian.org/debian}
BASE_MODULES="nvme nvme-core gpio-pci-idio-16 virtio_pci virtio_blk"
MODULES=$(echo "$BASE_MODULES ${VFIO_USER_INTEROP_MODULES:-}" | tr ' ' '\n' | sed '/^$/d' | sort -u | tr '\n' ' ')
MODULES=${MODULES% }
# The stamp records the configuration; a change of any of these rebuilds.
CONFIG="setup-version=$SETUP_VERSION modules=[$MODULES] mirror=$MIRROR"

log() { printf '[setup-interop] %s\n' "$*" >&2; }
die() { printf '[setup-interop] ERROR: %s\n' "$*" >&2; exit 1; }

STAMP=$DIR/.complete
if [[ "${VFIO_USER_INTEROP_REFRESH:-0}" != 1 && -f $STAMP && "$(head -n1 "$STAMP")" == "$CONFIG" \
      && -x $DIR/qemu-root/usr/bin/qemu-system-x86_64 && -f $DIR/guest/vmlinuz ]]; then
  log "up to date in $DIR ($CONFIG); set VFIO_USER_INTEROP_REFRESH=1 to rebuild"
  exit 0
fi

T0=$(date +%s)
[[ $(uname -m) == x86_64 ]] || die "only x86_64 hosts are supported (got $(uname -m))"
if [[ $EUID -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    log "not root: re-running under sudo"
    exec sudo --preserve-env=VFIO_USER_INTEROP_DIR,VFIO_USER_INTEROP_MODULES,VFIO_USER_INTEROP_MIRROR,VFIO_USER_INTEROP_REFRESH \
      bash "$0" "$@"
  fi
  die "must run as root (apt-get, mmdebstrap --mode=root)"
fi
if [[ -r /etc/os-release ]]; then
  # shellcheck disable=SC1091
  . /etc/os-release
  [[ "${ID:-}" == debian && "${VERSION_ID:-}" == 12 ]] \
    || log "warning: expected Debian 12, found ${PRETTY_NAME:-unknown}; guest packages come from this host's apt sources"
fi

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update_once() {
  if [[ $APT_UPDATED == 0 ]]; then
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    APT_UPDATED=1
  fi
}
# Host tools: install only what is missing.
need_host_pkg() { # command package
  if ! command -v "$1" >/dev/null 2>&1; then
    apt_update_once
    log "installing host package $2 (for $1)"
    apt-get install -y -qq --no-install-recommends "$2" >/dev/null || die "apt-get install $2 failed"
  fi
}
need_host_pkg dpkg-deb dpkg
need_host_pkg apt-get apt
# Guest packages are resolved against fresh lists (a fresh machine may have none or stale ones).
apt_update_once

mkdir -p "$DIR"
rm -f "$STAMP"
WORK=$(mktemp -d "$DIR/.work.XXXXXX")
trap 'rm -rf "$WORK" "$DIR/qemu-root.new" "$DIR/guest.new"' EXIT

# ---------------------------------------------------------------------------------------------
# 1. The trixie root with QEMU 11.1 (trixie-backports).
QROOT=$DIR/qemu-root
qemu_run() { # args... : run the root's qemu-system-x86_64 through the root's own loader
  QEMU_MODULE_DIR=$QROOT/usr/lib/x86_64-linux-gnu/qemu \
    "$QROOT/usr/lib64/ld-linux-x86-64.so.2" --library-path "$QROOT/usr/lib/x86_64-linux-gnu" \
    "$QROOT/usr/bin/qemu-system-x86_64" "$@"
}
if [[ -f $QROOT/.complete && "$(cat "$QROOT/.complete")" == "$MIRROR" ]] && qemu_run --version >/dev/null 2>&1; then
  log "qemu root present: $(qemu_run --version | head -n1)"
else
  need_host_pkg mmdebstrap mmdebstrap
  log "building trixie root with qemu-system-x86 from trixie-backports in $QROOT (mirror $MIRROR)"
  rm -rf "$QROOT" "$DIR/qemu-root.new"
  t=$(date +%s)
  mmdebstrap --quiet --variant=apt --mode=root \
    --aptopt='APT::Default-Release "trixie-backports"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --include=qemu-system-x86 trixie "$DIR/qemu-root.new" \
    "deb $MIRROR trixie main" "deb $MIRROR trixie-backports main" \
    || die "mmdebstrap failed"
  mv "$DIR/qemu-root.new" "$QROOT"
  qemu_run --version >/dev/null || die "the root's qemu-system-x86_64 does not run"
  qemu_run -device vfio-user-pci,help >/dev/null 2>&1 || die "this QEMU has no vfio-user-pci device"
  echo "$MIRROR" >"$QROOT/.complete"
  log "qemu root built in $(( $(date +%s) - t )) s: $(qemu_run --version | head -n1)"
fi

# ---------------------------------------------------------------------------------------------
# 2. Guest pieces from this host's (Debian 12) apt sources, unpacked, never installed.
NEW=$DIR/guest.new
rm -rf "$NEW"
mkdir -p "$NEW" "$WORK/debs"
download() { # packages... into $WORK/debs (as root: no _apt sandbox for a root-owned dir)
  (cd "$WORK/debs" && apt-get download -qq -o APT::Sandbox::User=root "$@" >/dev/null) \
    || die "apt-get download $* failed"
}
deb_of() { # package -> path of its downloaded .deb
  local f
  for f in "$WORK/debs/$1"_*.deb; do [[ -f $f ]] && { echo "$f"; return; }; done
  die "no .deb for $1"
}
MANIFEST=$WORK/manifest
{
  echo "# vfio-user interop cache, made by scripts/setup-interop.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "config: $CONFIG"
  echo "host: ${PRETTY_NAME:-unknown}"
  echo "qemu-root: trixie + trixie-backports from $MIRROR"
  dpkg-query --admindir="$QROOT/var/lib/dpkg" -W -f='qemu-root ${Package} ${Version}\n' \
    qemu-system-x86 qemu-system-common qemu-system-data seabios libc6 2>/dev/null || true
} >"$MANIFEST"
manifest_deb() { # role deb
  echo "$1 $(dpkg-deb -f "$2" Package) $(dpkg-deb -f "$2" Version)" >>"$MANIFEST"
}

# 2a. Kernel: linux-image-amd64 is a metapackage; fetch the image it depends on.
KPKG=$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
[[ -n $KPKG ]] || die "cannot resolve linux-image-amd64 to a kernel package"
log "downloading guest packages: $KPKG busybox-static fio"
download linux-image-amd64 "$KPKG" busybox-static
manifest_deb guest-kernel-meta "$(deb_of linux-image-amd64)"
manifest_deb guest-kernel "$(deb_of "$KPKG")"
manifest_deb guest-busybox "$(deb_of busybox-static)"
mkdir -p "$WORK/kernel"
dpkg-deb -x "$(deb_of "$KPKG")" "$WORK/kernel"
KVER=$(find "$WORK/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | head -n1)
[[ -n $KVER && -f $WORK/kernel/boot/vmlinuz-$KVER ]] || die "no vmlinuz in $KPKG"
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$NEW/vmlinuz"
cp "$WORK/kernel/boot/config-$KVER" "$NEW/config"
echo "$KVER" >"$NEW/kernel-version"
# Decompress the bzImage's payload (what scripts/extract-vmlinux in the kernel tree does): find the
# compressor's magic, decompress one stream from there, keep it if it is an ELF.
extract_vmlinux() { # bzImage out
  local magic tool off
  case $(grep -E '^CONFIG_KERNEL_(XZ|ZSTD|GZIP)=y' "$NEW/config" | head -n1) in
    CONFIG_KERNEL_XZ=y) magic=$'\xfd7zXZ'; need_host_pkg xz xz-utils; tool='xz -dc --single-stream' ;;
    CONFIG_KERNEL_ZSTD=y) magic=$'\x28\xb5\x2f\xfd'; need_host_pkg zstd zstd; tool='zstd -qdc' ;;
    CONFIG_KERNEL_GZIP=y) magic=$'\x1f\x8b\x08'; tool='gzip -dc' ;;
    *) return 1 ;;
  esac
  for off in $(LC_ALL=C grep -abo "$magic" "$1" | cut -d: -f1); do
    if tail -c +$((off + 1)) "$1" | $tool >"$2" 2>/dev/null || [[ -s $2 ]]; then
      [[ $(head -c 4 "$2" | od -An -c | tr -d ' ') == 177ELF ]] && return 0
    fi
  done
  rm -f "$2"
  return 1
}
if extract_vmlinux "$NEW/vmlinuz" "$NEW/vmlinux"; then
  log "extracted vmlinux ($(du -sh "$NEW/vmlinux" | cut -f1)) for PVH boot"
else
  log "warning: could not extract vmlinux from the bzImage; guests will boot the bzImage (slower)"
fi
KMOD=$WORK/kernel/lib/modules/$KVER

# Module index: normalized name (- and _ are the same to the kernel) -> path under $KMOD.
declare -A MODPATH=()
while IFS= read -r rel; do
  n=${rel##*/}; n=${n%%.ko*}; n=${n//-/_}
  MODPATH[$n]=$rel
done < <(cd "$KMOD" && find kernel -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
log "kernel $KVER: ${#MODPATH[@]} modules"

ko_cat() { # path: the module, decompressed, to stdout
  case $1 in
    *.ko.xz) need_host_pkg xz xz-utils; xz -dc "$1" ;;
    *.ko.zst) need_host_pkg zstd zstd; zstd -qdc "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
  esac
}
modinfo_field() { # path field: values of one .modinfo field, one a line
  ko_cat "$1" | tr '\0' '\n' | sed -n "s/^$2=//p"
}
resolve_alias() { # name: a module name, or the module providing it as an alias (generic first)
  local n=${1//-/_} hits
  if [[ -n ${MODPATH[$n]:-} ]]; then echo "$n"; return; fi
  hits=$(cd "$KMOD" && grep -l -a -F -e "alias=$1" -r kernel --include='*.ko' 2>/dev/null || true)
  [[ -n $hits ]] || return 0
  hits=$( (echo "$hits" | grep generic; echo "$hits") | head -n1)
  n=${hits##*/}; n=${n%%.ko*}; echo "${n//-/_}"
}
# Direct dependencies: depends= (hard) and softdep pre: (loaded before, like modprobe does).
declare -A DIRECT=() VISITED=()
ORDER=()
visit() { # name: depth-first, dependencies first
  local n=${1//-/_} d deps=() soft
  [[ -n ${VISITED[$n]:-} ]] && return
  VISITED[$n]=1
  [[ -n ${MODPATH[$n]:-} ]] || die "module $1 not found in $KPKG (builtin? check $NEW/config)"
  local f=$KMOD/${MODPATH[$n]}
  for d in $(modinfo_field "$f" depends | tr ',' ' '); do
    d=${d//-/_}
    if [[ " ${deps[*]:-} " != *" $d "* ]]; then deps+=("$d"); fi
  done
  while IFS= read -r soft; do
    soft=${soft#*pre:}; soft=${soft%%post:*}
    for d in $soft; do
      d=$(resolve_alias "$d")
      if [[ -n $d && " ${deps[*]:-} " != *" $d "* ]]; then deps+=("$d"); fi
    done
  done < <(modinfo_field "$f" softdep | grep 'pre:' || true)
  DIRECT[$n]="${deps[*]:-}"
  for d in "${deps[@]}"; do visit "$d"; done
  ORDER+=("$n")
}
for m in $MODULES; do visit "$m"; done

# Copy the closure, uncompressed, and write a depmod-style modules.dep: each line lists the full
# closure ordered so that loading it from last to first satisfies every dependency.
MODOUT=$NEW/modules/$KVER
mkdir -p "$MODOUT"
cp "$KMOD/modules.builtin" "$KMOD/modules.order" "$MODOUT/" 2>/dev/null || true
closure() { # name: post-order of its dependencies (deepest first), without itself
  local -A seen=()
  local out=()
  walk() {
    local x=$1 y
    [[ -n ${seen[$x]:-} ]] && return
    seen[$x]=1
    for y in ${DIRECT[$x]}; do walk "$y"; done
    out+=("$x")
  }
  walk "$1"
  unset 'out[${#out[@]}-1]'
  echo "${out[*]:-}"
}
: >"$MODOUT/modules.dep"
for n in "${ORDER[@]}"; do
  src=${MODPATH[$n]}
  dst=${src%.xz}; dst=${dst%.zst}; dst=${dst%.gz}
  mkdir -p "$MODOUT/$(dirname "$dst")"
  ko_cat "$KMOD/$src" >"$MODOUT/$dst"
  line="$dst:"
  read -r -a deps <<<"$(closure "$n")"
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
    d=${MODPATH[${deps[$i]}]}; d=${d%.xz}; d=${d%.zst}; d=${d%.gz}
    line+=" $d"
  done
  echo "$line" >>"$MODOUT/modules.dep"
  echo "guest-module $n $dst${DIRECT[$n]:+ (direct deps: ${DIRECT[$n]})}" >>"$MANIFEST"
done
log "modules: ${ORDER[*]}"

# 2b. busybox-static.
mkdir -p "$WORK/busybox"
dpkg-deb -x "$(deb_of busybox-static)" "$WORK/busybox"
cp "$WORK/busybox/bin/busybox" "$NEW/busybox"
chmod 755 "$NEW/busybox"

# 2c. fio and its shared libraries. Debian links fio against every engine's library (ceph, gluster,
# rdma, pmem, nbd...), so fetch its library closure, unpack it into a stage, let the stage's own
# loader resolve what fio really needs, and keep exactly those files at their guest paths.
log "resolving fio's library closure"
mapfile -t FIO_PKGS < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances fio | grep -v '^[ <]' | sort -u | grep -E '^(fio|lib.*|zlib1g)$')
mkdir -p "$WORK/fio-debs"
(cd "$WORK/fio-debs" && apt-get download -qq -o APT::Sandbox::User=root "${FIO_PKGS[@]}" >/dev/null) \
  || die "apt-get download (fio closure) failed"
STAGE=$WORK/fio-stage
mkdir -p "$STAGE"
for f in "$WORK/fio-debs"/*.deb; do dpkg-deb -x "$f" "$STAGE"; done
manifest_deb guest-fio "$(ls "$WORK/fio-debs"/fio_*.deb)"
stage_realpath() { # absolute path inside the stage -> real file, following links inside the stage
  local p=$1 t n=0
  while [[ -L $p ]]; do
    t=$(readlink "$p")
    if [[ $t == /* ]]; then p=$STAGE$t; else p=$(dirname "$p")/$t; fi
    ((++n < 40)) || die "symlink loop at $1"
  done
  [[ -e $p ]] || die "dangling link $1 in the fio stage"
  echo "$p"
}
SLD=$(stage_realpath "$STAGE/lib64/ld-linux-x86-64.so.2")
LIBPATH=$STAGE/lib/x86_64-linux-gnu:$STAGE/usr/lib/x86_64-linux-gnu:$STAGE/usr/lib/x86_64-linux-gnu/ceph
LIST=$("$SLD" --list --library-path "$LIBPATH" "$STAGE/usr/bin/fio") || die "fio's libraries do not resolve: $LIST"
FIOOUT=$NEW/fio
mkdir -p "$FIOOUT/usr/bin" "$FIOOUT/lib64"
cp "$STAGE/usr/bin/fio" "$FIOOUT/usr/bin/fio"
cp "$SLD" "$FIOOUT/lib64/ld-linux-x86-64.so.2"
nlib=0
while read -r name arrow path _; do
  [[ $arrow == '=>' ]] || continue
  [[ $path == "$STAGE"/* ]] || die "fio needs $name, resolved outside the stage: $path"
  rel=${path#"$STAGE"}
  mkdir -p "$FIOOUT$(dirname "$rel")"
  cp "$(stage_realpath "$path")" "$FIOOUT$rel"
  nlib=$((nlib + 1))
done <<<"$LIST"
# Check the copy is complete: every library must now resolve inside it.
FLIB=$FIOOUT/lib/x86_64-linux-gnu:$FIOOUT/usr/lib/x86_64-linux-gnu:$FIOOUT/usr/lib/x86_64-linux-gnu/ceph
CHECK=$("$FIOOUT/lib64/ld-linux-x86-64.so.2" --list --library-path "$FLIB" "$FIOOUT/usr/bin/fio") \
  || die "the copied fio does not resolve"
if grep '=>' <<<"$CHECK" | grep -v -F "$FIOOUT/" >/dev/null; then die "the copied fio resolves outside $FIOOUT"; fi
FIOVER=$("$FIOOUT/lib64/ld-linux-x86-64.so.2" --library-path "$FLIB" "$FIOOUT/usr/bin/fio" --version)
echo "guest-fio-libraries $nlib ($(du -sh "$FIOOUT" | cut -f1)), $FIOVER" >>"$MANIFEST"
log "fio: $FIOVER with $nlib libraries ($(du -sh "$FIOOUT" | cut -f1))"

# ---------------------------------------------------------------------------------------------
# 3. Swap the new guest in, write the manifest and the stamp.
rm -rf "$DIR/guest"
mv "$NEW" "$DIR/guest"
cp "$MANIFEST" "$DIR/manifest"
echo "$CONFIG" >"$STAMP"
rm -rf "$WORK"
log "done in $(( $(date +%s) - T0 )) s; cache $DIR is $(du -sh "$DIR" | cut -f1); manifest:"
sed 's/^/    /' "$DIR/manifest" >&2
