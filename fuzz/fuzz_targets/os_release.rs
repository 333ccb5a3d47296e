//! Fuzz os-release and the older release files as `imgsafe inspect` reads them from a
//! guest: never panic, and every accepted value stays within the length limit.
#![no_main]

use imgsafe::guest_os::release::{parse_os_release, parse_release_file, MAX_VALUE, RELEASE_FILES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse_os_release(data) {
        for v in [r.id, r.version_id, r.pretty_name, r.name].into_iter().flatten() {
            assert!(v.len() <= MAX_VALUE);
        }
    }
    for (_, kind) in RELEASE_FILES {
        if let Ok(f) = parse_release_file(*kind, data) {
            assert!(f.product_name.is_none_or(|p| p.len() <= MAX_VALUE));
        }
    }
});
