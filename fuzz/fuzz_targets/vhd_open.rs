//! Fuzz opening and reading a whole VHD file: never panic, hang or over-allocate; every
//! read of an opened disk either succeeds or returns an error.
//!
//! The first input byte is a flag: when its low bit is set, the footer copies and the
//! dynamic header get valid checksums first, so the fuzzer reaches the BAT, bitmap and
//! parent-locator code instead of stopping at the checksum check.
#![no_main]

use imgsafe::format::vhd::footer::checksum;
use imgsafe::format::{vhd, OpenOptions};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

/// Virtual bytes read per input at most (reads are sampled across the disk).
const READ_BUDGET: u64 = 8 << 20;

fn fix_checksums(img: &mut [u8]) {
    let n = img.len();
    if n < 512 {
        return;
    }
    for at in [0, n - 512] {
        let c = checksum(&img[at..at + 512], 64);
        img[at + 64..at + 68].copy_from_slice(&c.to_be_bytes());
    }
    let data_offset = u64::from_be_bytes(img[16..24].try_into().unwrap());
    if let Some(h) = usize::try_from(data_offset)
        .ok()
        .filter(|&h| h.checked_add(1024).is_some_and(|e| e <= n))
    {
        let c = checksum(&img[h..h + 1024], 36);
        img[h + 36..h + 40].copy_from_slice(&c.to_be_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut img = rest.to_vec();
    if flags & 1 == 1 {
        fix_checksums(&mut img);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.vhd");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&img)
        .unwrap();
    let Ok(file) = std::fs::File::open(&path) else {
        return;
    };
    let opts = OpenOptions {
        ignore_parent_id: flags & 2 == 2,
        ..Default::default()
    };
    let Ok(src) = vhd::open(&path, file, &opts) else {
        return;
    };

    let size = src.size();
    let _ = src.layers();
    let _ = src.extents(0, size.min(READ_BUDGET * 8));
    let mut buf = vec![0u8; 1 << 20];
    let step = (size / 8).max(1);
    let mut off = 0u64;
    while off < size {
        let n = (buf.len() as u64).min(size - off) as usize;
        let _ = src.read_at(&mut buf[..n], off);
        off = off.saturating_add(step.max(n as u64));
    }
    // Reads past the end must be refused, not panic.
    assert!(src.read_at(&mut buf[..1], size).is_err());
});
