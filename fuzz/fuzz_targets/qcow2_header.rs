//! Fuzz the qcow2 header, header-extension and snapshot-entry parsers: never panic, and an
//! accepted header is within the limits the reader relies on.
#![no_main]

use imgsafe::format::qcow2::header::{
    parse_snapshot, Header, MAX_CLUSTER_BITS, MAX_L1_ENTRIES, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes give the file length the header is checked against.
    let Some((len, head)) = data.split_at_checked(8) else {
        return;
    };
    let file_len = u64::from_le_bytes(len.try_into().unwrap()) % (1 << 44);
    if let Ok(h) = Header::parse(head, file_len) {
        assert!((MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits));
        assert!(h.size <= MAX_VIRTUAL_SIZE);
        assert!(h.l1_size <= MAX_L1_ENTRIES && h.l1_size >= h.l1_needed(h.size));
        assert!(h.l1_size == 0 || h.l1_offset + h.l1_size * 8 <= file_len);
        assert!(h.backing.as_ref().is_none_or(|b| !b.is_empty() && b.len() <= 1023));
    }
    if let Ok(Some((snap, used))) = parse_snapshot(head, 1 << 30) {
        assert!(used <= head.len() + 7 && used % 8 == 0);
        assert!(snap.disk_size <= MAX_VIRTUAL_SIZE);
    }
});
