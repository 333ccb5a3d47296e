//! Fuzz opening and reading a whole VDI file: never panic, hang or over-allocate; an
//! opened image reads (up to 4 MiB of it, sampled across the disk) and reports extents
//! that cover what was asked.
//!
//! The input is written as `fuzz.vdi` beside a copy of itself with the creation UUID
//! replaced by the link UUID, so a differencing input finds a parent and the fuzzer
//! reaches the chain code (and, with both files differencing, the loop check).
#![no_main]

use imgsafe::format::{self, Format, OpenOptions};
use libfuzzer_sys::fuzz_target;

/// Virtual bytes read per input at most.
const READ_BUDGET: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.vdi");
    std::fs::write(&path, data).unwrap();
    if data.len() >= 0x1b8 {
        let mut parent = data.to_vec();
        parent.copy_within(0x1a8..0x1b8, 0x188);
        std::fs::write(dir.path().join("parent.vdi"), parent).unwrap();
    }
    let opts = OpenOptions {
        format: Some(Format::Vdi),
        ..OpenOptions::default()
    };
    let Ok(src) = format::open(&path, &opts) else {
        return;
    };
    let size = src.size();
    let _ = src.layers();
    let span = size.min(READ_BUDGET * 4);
    let extents = src.extents(0, span).expect("a validated image maps");
    assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), span);
    let mut buf = vec![0u8; 1 << 20];
    let step = (size / 4).max(1);
    let mut off = 0u64;
    while off < size {
        let n = (buf.len() as u64).min(size - off) as usize;
        let _ = src.read_at(&mut buf[..n], off);
        off = off.saturating_add(step.max(n as u64));
    }
    assert!(src.read_at(&mut buf[..1], size).is_err());
});
