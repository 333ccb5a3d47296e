//! Fuzz the parser of dpkg's /var/lib/dpkg/status as `imgsafe inspect` reads it from a guest: never panic,
//! and every accepted name and version is short printable ASCII.
#![no_main]

use imgsafe::guest_os::packages::{parse_dpkg_status, MAX_PACKAGES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pkgs) = parse_dpkg_status(data) {
        assert!(pkgs.len() <= MAX_PACKAGES);
        for p in pkgs {
            assert!(p.name.bytes().chain(p.version.bytes()).all(|b| b.is_ascii_graphic()));
        }
    }
});
