//! Fuzz the whole ploop open and read path through a real file: open never panics, and an
//! opened image reads (up to 4 MiB of it) and reports extents without error or panic.
#![no_main]

use imgsafe::format::{self, Format, OpenOptions};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(data).unwrap();
    let opts = OpenOptions {
        format: Some(Format::Ploop),
        ..OpenOptions::default()
    };
    let Ok(src) = format::open(file.path(), &opts) else {
        return;
    };
    let len = src.size().min(4 << 20);
    let mut buf = vec![0u8; len as usize];
    src.read_at(&mut buf, 0).expect("a validated image reads");
    let extents = src.extents(0, len).unwrap();
    assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), len);
    let _ = src.layers();
});
