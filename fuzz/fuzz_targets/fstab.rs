//! Fuzz the guest's /etc/fstab as the host parses and plans it: never panic, and every
//! planned mount is one the host would accept (a normalised absolute mountpoint).
#![no_main]

use imgsafe::inspect::{normalise_mountpoint, not_for_us, parse_fstab};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for e in parse_fstab(data) {
        let _ = not_for_us(&e);
        if let Some(mp) = normalise_mountpoint(&e.mountpoint) {
            assert!(mp.starts_with('/'), "{mp}");
            assert!(!mp.split('/').any(|c| c == ".." || c == "."), "{mp}");
        }
    }
});
