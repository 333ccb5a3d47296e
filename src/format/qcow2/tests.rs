//! Header parser tests over headers built in memory (the real images are made by qemu-img
//! in tests/qcow2.rs).

use super::header::*;

/// A valid v3 header cluster of 64 KiB clusters, 1 MiB disk, L1 of one entry at 3 clusters,
/// in a file of `FILE_LEN` bytes.
fn v3() -> Vec<u8> {
    let mut b = vec![0u8; 65536];
    b[..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&16u32.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    b[36..40].copy_from_slice(&1u32.to_be_bytes());
    b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&112u32.to_be_bytes());
    b
}

const FILE_LEN: u64 = 5 << 16;

fn ext(b: &mut [u8], at: usize, kind: u32, data: &[u8]) -> usize {
    b[at..at + 4].copy_from_slice(&kind.to_be_bytes());
    b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
    b[at + 8..at + 8 + data.len()].copy_from_slice(data);
    at + 8 + data.len().div_ceil(8) * 8
}

#[test]
fn parses_a_v3_header_with_extensions() {
    let mut b = v3();
    let next = ext(&mut b, 112, EXT_BACKING_FORMAT, b"raw");
    ext(&mut b, next, EXT_DATA_FILE, b"disk.data");
    b[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes());
    b[8..16].copy_from_slice(&512u64.to_be_bytes());
    b[16..20].copy_from_slice(&8u32.to_be_bytes());
    b[512..520].copy_from_slice(b"base.img");

    let h = Header::parse(&b, FILE_LEN).unwrap();

    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.backing.as_deref(), Some("base.img"));
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
    assert_eq!(h.data_file.as_deref(), Some("disk.data"));
    assert_eq!(h.compression, Compression::Deflate);
}

#[test]
fn unknown_incompatible_bit_is_named_from_the_feature_table() {
    let mut b = v3();
    let mut entry = [0u8; 48];
    entry[1] = 9;
    entry[2..12].copy_from_slice(b"future-fmt");
    ext(&mut b, 112, EXT_FEATURE_NAMES, &entry);
    b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());

    let err = Header::parse(&b, FILE_LEN).unwrap_err();

    assert_eq!(
        err,
        HeaderError::Unsupported("incompatible feature future-fmt (not known to imgsafe)".into())
    );
}

#[test]
fn extension_running_past_the_cluster_is_corrupt() {
    let mut b = v3();
    b[112..116].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
    b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());

    let err = Header::parse(&b, FILE_LEN).unwrap_err();

    assert!(matches!(err, HeaderError::Corrupt(w) if w.contains("runs past the header cluster")));
}

#[test]
fn l1_too_small_for_the_disk_or_overlapping_the_header_is_corrupt() {
    let mut small = v3();
    small[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let mut at_zero = v3();
    at_zero[40..48].copy_from_slice(&0u64.to_be_bytes());

    let small = Header::parse(&small, FILE_LEN).unwrap_err().to_string();
    let at_zero = Header::parse(&at_zero, FILE_LEN).unwrap_err().to_string();

    assert!(
        small.contains("fewer than the 2048 the disk size needs"),
        "{small}"
    );
    assert!(
        at_zero.contains("not a cluster boundary after the header"),
        "{at_zero}"
    );
}

#[test]
fn zstd_without_its_incompatible_bit_is_corrupt() {
    let mut b = v3();
    b[104] = 1;

    let err = Header::parse(&b, FILE_LEN).unwrap_err().to_string();

    assert!(err.contains("compression incompatible bit is not"), "{err}");
}

#[test]
fn snapshot_entry_reads_extra_data_and_strings() {
    let mut e = vec![0u8; 40];
    e[0..8].copy_from_slice(&(4u64 << 16).to_be_bytes());
    e[8..12].copy_from_slice(&1u32.to_be_bytes());
    e[12..14].copy_from_slice(&1u16.to_be_bytes());
    e[14..16].copy_from_slice(&4u16.to_be_bytes());
    e[16..20].copy_from_slice(&1_700_000_000u32.to_be_bytes());
    e[36..40].copy_from_slice(&16u32.to_be_bytes());
    e.extend_from_slice(&0u64.to_be_bytes());
    e.extend_from_slice(&(2u64 << 20).to_be_bytes());
    e.extend_from_slice(b"7snap");

    let (snap, len) = parse_snapshot(&e, 1 << 20).unwrap().unwrap();
    let short = parse_snapshot(&e[..50], 1 << 20).unwrap();

    assert_eq!((snap.id.as_str(), snap.name.as_str()), ("7", "snap"));
    assert_eq!(snap.disk_size, 2 << 20);
    assert_eq!(len, 64);
    assert!(short.is_none());
}
