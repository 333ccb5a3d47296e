#!/bin/bash
# Seed corpora for the fuzz targets, made by real tools (qemu-img, qemu-io, tar) and
# from text files this host's own OS carries.
#   fuzz/seeds.sh fuzz/corpus && cd fuzz && cargo +nightly fuzz run TARGET -- -max_len=N
# cargo fuzz reads fuzz/corpus/TARGET. The disk seeds are large (VDI and VHDX ~3.2 MiB,
# VMDK and OVA up to 270 KB): give -max_len at least their size.
set -euo pipefail
out=${1:?corpus folder}
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
c() { mkdir -p "$out/$1"; }
put() { # target name flagbyte file [maxbytes]
  local t=$1 n=$2 f=$3 file=$4 max=${5:-0}
  c "$t"
  { if [ -n "$f" ]; then printf "\\x$f"; fi
    if [ "$max" -gt 0 ]; then head -c "$max" "$file"; else cat "$file"; fi
  } > "$out/$t/$n"
}
fill() { qemu-io -f "$1" -c 'write -P 0x5a 0 64k' -c 'write -P 0xa5 1M 64k' -c 'write -z 2M 64k' "$2" >/dev/null; }
# VMDK: a sparse image written through qemu-io (data, and a zeroed range), the same
# disk converted to streamOptimized, and a delta over the sparse one.
qemu-img create -q -f vmdk -o subformat=monolithicSparse "$w/monolithicSparse.vmdk" 4M
fill vmdk "$w/monolithicSparse.vmdk"
qemu-img convert -O vmdk -o subformat=streamOptimized "$w/monolithicSparse.vmdk" "$w/streamOptimized.vmdk"
for sub in monolithicSparse streamOptimized; do
  put vmdk_open $sub-1 01 "$w/$sub.vmdk"; put vmdk_open $sub-0 00 "$w/$sub.vmdk"
done
qemu-img create -q -f vmdk -o subformat=monolithicSparse,backing_file=monolithicSparse.vmdk,backing_fmt=vmdk "$w/delta.vmdk" 4M
put vmdk_open delta-1 01 "$w/delta.vmdk"
printf '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n# Extent description\nRW 8 FLAT "data.bin" 0\nRW 8 ZERO\n\nddb.virtualHWVersion = "4"\n' > "$w/flat.txt"
put vmdk_open flat 00 "$w/flat.txt"
printf '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="twoGbMaxExtentSparse"\n\nRW 8192 SPARSE "ext.vmdk"\nRW 16 FLAT "data.bin" 1\n' > "$w/sparse.txt"
put vmdk_open sparse 00 "$w/sparse.txt"
printf '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\ncreateType="vmfs"\nparentFileNameHint="ext.vmdk"\n\nRW 16 VMFS "data.bin"\n' > "$w/vmfs.txt"
put vmdk_open vmfs 00 "$w/vmfs.txt"
# OVA
cp "$w/streamOptimized.vmdk" "$w/disk1.vmdk"; cp "$w/streamOptimized.vmdk" "$w/disk2.vmdk"
printf '<?xml version="1.0"?>\n<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:href="disk1.vmdk" ovf:id="f1"/></References></Envelope>\n' > "$w/vm.ovf"
(cd "$w" && tar -cf one.ova vm.ovf disk1.vmdk && tar -cf two.ova vm.ovf disk1.vmdk disk2.vmdk && tar --format=pax -cf pax.ova vm.ovf disk1.vmdk)
put ova_open one 00 "$w/one.ova"; put ova_open two 02 "$w/two.ova"; put ova_open pax 00 "$w/pax.ova"
# VDI
qemu-img create -q -f vdi "$w/dyn.vdi" 4M; fill vdi "$w/dyn.vdi"
qemu-img create -q -f vdi -o static=on "$w/static.vdi" 2M
put vdi_open dynamic "" "$w/dyn.vdi"; put vdi_open static "" "$w/static.vdi"
# VHDX
for bs in 1M 8M; do
  qemu-img create -q -f vhdx -o subformat=dynamic,block_size=$bs "$w/d$bs.vhdx" 16M; fill vhdx "$w/d$bs.vhdx"
  for f in 00 01 03; do put vhdx_open dyn$bs-$f $f "$w/d$bs.vhdx" $((3*1024*1024+65536)); done
done
qemu-img create -q -f vhdx -o subformat=fixed "$w/fixed.vhdx" 4M
for f in 00 01; do put vhdx_open fixed-$f $f "$w/fixed.vhdx" $((3*1024*1024+65536)); done
# Parsers of what a guest sends (inspect)
c fstab; cp /etc/fstab "$out/fstab/host" 2>/dev/null || true
printf 'UUID=1234 / ext4 defaults 0 1\n/dev/vg/home /home xfs noatime 0 2\nLABEL=boot /boot/../boot vfat ro 0 0\n/dev/sdb1\t/mnt/a\\040b\tauto\tnoauto,user\t0\t0\n# comment\ntmpfs /tmp tmpfs size=1G 0 0\n/swap none swap sw 0 0\nPARTUUID=ab-01 /srv ./x btrfs subvol=@srv 0 0\n' > "$out/fstab/mixed"
c os_release; cp /etc/os-release "$out/os_release/debian"
printf 'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.19.1\nPRETTY_NAME="Alpine Linux v3.19"\n' > "$out/os_release/alpine"
printf 'Red Hat Enterprise Linux Server release 6.10 (Santiago)\n' > "$out/os_release/redhat"
printf 'NAME=Fedora\nID="fedora"\nVERSION_ID=39\nPRETTY_NAME=\x27Fedora Linux 39 (Cloud \\"Edition\\")\x27\n# c\nX=$y\n' > "$out/os_release/quoted"
printf '12.5\n' > "$out/os_release/debian_version"
c dpkg_status; head -c 60000 /var/lib/dpkg/status > "$out/dpkg_status/host"
printf 'Package: libc6\nStatus: install ok installed\nVersion: 2.36-9\nArchitecture: amd64\nDescription: x\n continued\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n' > "$out/dpkg_status/small"
c apk_installed
printf 'C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nS:1\n\nC:Q1def=\nP:busybox\nV:1.36.1-r15\nA:x86_64\nF:bin\nR:busybox\n\n' > "$out/apk_installed/small"
c pacman_desc
printf '%%NAME%%\nlinux\n\n%%VERSION%%\n6.7.4.arch1-1\n\n%%BASE%%\nlinux\n\n%%DESC%%\nThe Linux kernel\n\n' > "$out/pacman_desc/linux"
c elf_arch; for b in /bin/sh /usr/bin/env; do head -c 4096 "$(readlink -f $b)" > "$out/elf_arch/$(basename $b)"; done
printf '\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00' > "$out/elf_arch/arm32"
# Agent replies: the first byte picks the request (see fuzz_targets/agent_replies.rs).
c agent_replies
python3 - "$out/agent_replies" <<'PY'
import json, struct, sys, os
out = sys.argv[1]
def msg(o): p = json.dumps(o, separators=(',', ':')).encode(); return struct.pack('<I', len(p)+1) + b'\x01' + p
def data(b): return struct.pack('<I', len(b)+1) + b'\x02' + b
def ent(name, kind='Regular', size=5, target=None):
    return {"name": list(name), "kind": kind, "mode": 0o644, "size": size, "mtime": 1700000000,
            "mtime_nsec": 0, "uid": 0, "gid": 0, "nlink": 1, "target": None if target is None else list(target)}
err = msg({"Error": {"kind": "NotFound", "message": "no such file"}})
seeds = {
 0: [msg({"Filesystems": {"list": [{"device": "/dev/vda1", "size": 1048576, "fstype": "ext4", "label": "root", "uuid": "1234",
        "partition": 1, "partuuid": "ab-01", "partitioned": False},
        {"device": "/dev/vda", "size": 2097152, "fstype": None, "label": None, "uuid": None, "partition": None, "partuuid": None, "partitioned": True}]}})],
 1: [msg({"Stat": {"entry": ent(b"etc", "Directory", 4096)}}), err],
 2: [msg({"DirEntries": {"entries": [ent(b"a"), ent(b"l", "Symlink", 3, b"../x"), ent(b"\xff\x01")], "done": False}}) +
     msg({"DirEntries": {"entries": [ent(b"d", "Directory", 0)], "done": True}})],
 3: [msg({"FileStart": {"size": 5}}) + data(b"hello") + msg("FileEnd"), msg({"FileStart": {"size": 0}}) + msg("FileEnd")],
 4: [msg({"WalkEntries": {"entries": [{"path": [list(b"a")], "entry": ent(b"a")}, {"path": [list(b"d"), list(b"b")], "entry": ent(b"b", "Symlink", 1, b"/")}], "done": True}})],
 5: [msg({"Subvolumes": {"default": 5, "list": [{"id": 256, "path": "@"}, {"id": 257, "path": "@home"}]}})],
 6: [msg({"FileStart": {"size": 3}}) + data(b"abc") + msg("FileEnd") +
     msg({"FileMap": {"size": 8192, "disk": "imgsafe0", "extents": [{"logical": 0, "physical": 1048576, "length": 4096, "unwritten": False},
        {"logical": 4096, "physical": 2097152, "length": 4096, "unwritten": True}], "edge_sha256": [0]*32}}) +
     msg({"FileStart": {"size": 2}}) + data(b"xy") + msg("FileEnd")],
 7: [msg({"Mounted": {"device": "/dev/vda1", "fstype": "ext4"}}), msg({"Error": {"kind": "Mount", "message": "nothing"}})],
}
for k, lst in seeds.items():
    for i, s in enumerate(lst):
        open(os.path.join(out, f"r{k}-{i}"), 'wb').write(bytes([k]) + s)
PY
