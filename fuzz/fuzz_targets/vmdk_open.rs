//! Fuzz opening and reading a VMDK: never panic, hang or over-allocate; an opened disk
//! reads (sampled across it) and reports extents that cover what was asked.
//!
//! The first input byte picks what the rest is: a sparse extent (`KDMV` forced at the
//! start, so the fuzzer works on the header, grain directory and tables), or a text
//! descriptor whose extents may name `data.bin` and `ext.vmdk`, written beside it from
//! the same input (so FLAT, SPARSE and parent paths lead somewhere).
#![no_main]

use imgsafe::format::{self, Format, OpenOptions};
use libfuzzer_sys::fuzz_target;

/// Virtual bytes mapped per input at most.
const MAP_BUDGET: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.vmdk");
    let mut img = rest.to_vec();
    if flags & 1 == 1 {
        if img.len() < 4 {
            img.resize(4, 0);
        }
        img[..4].copy_from_slice(b"KDMV");
    }
    std::fs::write(&path, &img).unwrap();
    std::fs::write(dir.path().join("data.bin"), rest).unwrap();
    let mut sparse = rest.to_vec();
    if sparse.len() >= 4 {
        sparse[..4].copy_from_slice(b"KDMV");
    }
    std::fs::write(dir.path().join("ext.vmdk"), sparse).unwrap();
    let opts = OpenOptions {
        format: Some(Format::Vmdk),
        ignore_parent_id: flags & 2 == 2,
        ..OpenOptions::default()
    };
    let Ok(src) = format::open(&path, &opts) else {
        return;
    };
    let size = src.size();
    let _ = src.layers();
    let span = size.min(MAP_BUDGET);
    if let Ok(extents) = src.extents(0, span) {
        assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), span);
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
