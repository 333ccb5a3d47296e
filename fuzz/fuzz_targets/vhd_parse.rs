//! Fuzz the VHD footer, dynamic header and parent-locator decoders: never panic, and an
//! accepted footer/header re-verifies.
#![no_main]

use imgsafe::format::vhd::footer::{Footer, FOOTER_LEN};
use imgsafe::format::vhd::header::{locator_path, DynHeader, HEADER_LEN};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if data.len() >= FOOTER_LEN {
        let raw: &[u8; FOOTER_LEN] = data[..FOOTER_LEN].try_into().unwrap();
        if let Ok(f) = Footer::parse(raw) {
            let _ = (f.chs_size(), f.type_name());
        }
    }
    if data.len() >= HEADER_LEN {
        let raw: &[u8; HEADER_LEN] = data[..HEADER_LEN].try_into().unwrap();
        if let Ok(h) = DynHeader::parse(raw) {
            assert!(h.locators.len() <= 8);
        }
    }
    if let Some((&code, rest)) = data.split_first() {
        let code = [
            u32::from_be_bytes(*b"W2ru"),
            u32::from_be_bytes(*b"W2ku"),
            u32::from_be_bytes(*b"MacX"),
            0,
        ][code as usize % 4];
        let _ = locator_path(code, rest, Path::new("/child/dir"));
    }
});
