//! Fuzz opening and reading a whole VHDX file: never panic, hang or over-allocate; an
//! opened disk reads (sampled across it) and reports extents that cover what was asked.
//!
//! The input is the file's first bytes; the rest of the 1 MiB header section is zeros.
//! When the first input byte's low bit is set, both headers and both region tables get
//! valid CRC-32C checksums first, so the fuzzer reaches the region, metadata and BAT
//! checks instead of stopping at a checksum.
#![no_main]

use imgsafe::format::vhdx::crc32c::crc32c_with_hole;
use imgsafe::format::{self, Format, OpenOptions};
use libfuzzer_sys::fuzz_target;

/// Virtual bytes mapped per input at most.
const MAP_BUDGET: u64 = 16 << 20;

fn fix_checksums(img: &mut [u8]) {
    for (at, len) in [
        (64 << 10, 4096),
        (128 << 10, 4096),
        (192 << 10, 64 << 10),
        (256 << 10, 64 << 10),
    ] {
        if img.len() >= at + len {
            let c = crc32c_with_hole(&img[at..at + len], 4);
            img[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut img = rest.to_vec();
    if img.len() < 1 << 20 {
        img.resize(1 << 20, 0);
    }
    if flags & 1 == 1 {
        fix_checksums(&mut img);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.vhdx");
    std::fs::write(&path, &img).unwrap();
    let opts = OpenOptions {
        format: Some(Format::Vhdx),
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
