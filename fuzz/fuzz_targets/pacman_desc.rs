//! Fuzz the parser of one pacman `local/*/desc` as `imgsafe inspect` reads it from a
//! guest: never panic, and an accepted name and version are short printable ASCII.
#![no_main]

use imgsafe::guest_os::packages::parse_pacman_desc;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse_pacman_desc(data) {
        assert!(p.name.bytes().chain(p.version.bytes()).all(|b| b.is_ascii_graphic()));
    }
});
