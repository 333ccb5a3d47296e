//! Fuzz the ELF header reader `imgsafe inspect` uses for a guest's /bin/sh: never panic,
//! and only a header with the ELF magic names an architecture.
#![no_main]

use imgsafe::guest_os::elf::arch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if arch(data).is_some() {
        assert!(data.starts_with(b"\x7fELF"));
    }
});
