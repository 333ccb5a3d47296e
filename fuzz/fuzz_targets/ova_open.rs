//! Fuzz the OVA (tar) walk and the in-place open of the disk inside: never panic, hang
//! or over-allocate. The input is the archive; the first byte picks `--disk N`.
#![no_main]

use imgsafe::format::{self, Format, OpenOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&disk, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.ova");
    std::fs::write(&path, rest).unwrap();
    let opts = OpenOptions {
        format: Some(Format::Ova),
        disk: (disk != 0).then_some(usize::from(disk % 8)),
        ..OpenOptions::default()
    };
    let Ok(src) = format::open(&path, &opts) else {
        return;
    };
    let size = src.size();
    let _ = src.layers();
    let _ = src.extents(0, size.min(16 << 20));
    let mut buf = vec![0u8; 1 << 20];
    let n = (buf.len() as u64).min(size) as usize;
    let _ = src.read_at(&mut buf[..n], 0);
    assert!(src.read_at(&mut buf[..1], size).is_err());
});
