//! Fuzz the ploop header and BAT parsers: never panic, and every accepted BAT entry points
//! after the header/BAT and inside the file.
#![no_main]

use imgsafe::format::ploop::{parse_bat, Header, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::parse(data) else {
        return;
    };
    let file_len = data.len() as u64;
    let Ok(bat) = parse_bat(&header, &data[HEADER_SIZE as usize..], file_len) else {
        return;
    };
    assert_eq!(bat.len() as u64, header.clusters_needed());
    for (i, &entry) in bat.iter().enumerate() {
        if entry != 0 {
            let host = header.host_offset(entry);
            assert!(host >= header.bat_end());
            assert!(host + header.cluster_len(i as u64) <= file_len);
        }
    }
});
