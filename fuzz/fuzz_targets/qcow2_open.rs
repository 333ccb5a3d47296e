//! Fuzz opening a qcow2 chain through the general opener (`format::open`, which opens
//! backing files with `format::open_layer`) and reading it: never panic, hang or
//! over-allocate; an opened disk reads (sampled across it), maps and lists its layers
//! without panicking.
//!
//! The input is two files: the first 4 bytes (little-endian) give the length of `top.qcow2`,
//! the rest is `b.img`, which the top may name as its backing file (seed inputs made by
//! qemu-img do, with and without `-F`), so the fuzzer reaches backing chains, a qcow2
//! backing its own parent and backing files of other formats.
#![no_main]

use imgsafe::format::{self, OpenOptions};
use libfuzzer_sys::fuzz_target;

/// Virtual bytes read per input at most.
const READ_BUDGET: u64 = 8 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_at_checked(4) else {
        return;
    };
    let split = (u32::from_le_bytes(len.try_into().unwrap()) as usize).min(rest.len());
    let (top, backing) = rest.split_at(split);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("top.qcow2");
    std::fs::write(&path, top).unwrap();
    if !backing.is_empty() {
        std::fs::write(dir.path().join("b.img"), backing).unwrap();
    }
    let Ok(src) = format::open(&path, &OpenOptions::default()) else {
        return;
    };

    let size = src.size();
    let _ = src.layers();
    let _ = src.snapshots();
    if let Ok(extents) = src.extents(0, size.min(READ_BUDGET * 8)) {
        assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), size.min(READ_BUDGET * 8));
    }
    let mut buf = vec![0u8; 1 << 20];
    let step = (size / 8).max(1);
    let mut off = 0u64;
    while off < size {
        let n = (buf.len() as u64).min(size - off) as usize;
        let _ = src.read_at(&mut buf[..n], off);
        off = off.saturating_add(step.max(n as u64));
    }
    assert!(src.read_at(&mut buf[..1], size).is_err());
});
