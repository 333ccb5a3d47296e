//! Unit tests of probing, footer selection and the open-time checks, on images built in
//! memory with the test-only footer/header builders.

use super::*;
use std::io::Write;

/// A dynamic image: footer copy, header at 512, BAT at 1536, blocks after, footer.
/// `blocks[i] = Some(fill)` allocates block i filled with `fill`.
fn dynamic_image(size: u64, block_size: u32, blocks: &[Option<u8>]) -> Vec<u8> {
    let entries = blocks.len() as u32;
    let foot = footer::build(footer::TYPE_DYNAMIC, size, 512, [9; 16]);
    let head = header::build(1536, entries, block_size, [0; 16], &[]);
    let mut img = Vec::new();
    img.extend_from_slice(&foot);
    img.extend_from_slice(&head);
    let bat_len = (entries as usize * 4).div_ceil(512) * 512;
    img.resize(1536 + bat_len, 0xFF);
    let bm = dynamic::bitmap_len(block_size) as usize;
    for (i, b) in blocks.iter().enumerate() {
        if let Some(fill) = b {
            let sector = (img.len() / 512) as u32;
            img[1536 + i * 4..1536 + i * 4 + 4].copy_from_slice(&sector.to_be_bytes());
            img.extend(std::iter::repeat_n(0xFF, bm));
            img.extend(std::iter::repeat_n(*fill, block_size as usize));
        }
    }
    img.extend_from_slice(&foot);
    img
}

fn tmp(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    let file = File::open(f.path()).unwrap();
    (f, file)
}

fn open_bytes(bytes: &[u8]) -> Result<Box<dyn BlockSource>, FormatError> {
    let (f, file) = tmp(bytes);
    open(f.path(), file, &OpenOptions::default())
}

#[test]
fn probe_finds_footer_at_start_end_and_old_511_byte_end() {
    let foot = footer::build(footer::TYPE_FIXED, 512, u64::MAX, [1; 16]);
    let mut fixed = vec![0u8; 1024];
    fixed.extend_from_slice(&foot);
    let mut old = vec![0u8; 1024];
    old.extend_from_slice(&foot[..511]);
    let (f1, h1) = tmp(&fixed);
    let (f2, h2) = tmp(&old);
    let (f3, h3) = tmp(&[0u8; 4096]);

    assert!(probe(f1.path(), &h1, &[0; 16]).unwrap());
    assert!(probe(f2.path(), &h2, &[0; 16]).unwrap());
    assert!(!probe(f3.path(), &h3, &[0; 16]).unwrap());
    assert!(probe(f3.path(), &h3, b"conectix\0\0").unwrap());
}

#[test]
fn old_511_byte_footer_opens_as_fixed() {
    let foot = footer::build(footer::TYPE_FIXED, 1024, u64::MAX, [1; 16]);
    let mut img = vec![0x5Au8; 1024];
    img.extend_from_slice(&foot[..511]);

    let src = open_bytes(&img).unwrap();
    let mut buf = vec![0u8; 1024];
    src.read_at(&mut buf, 0).unwrap();

    assert_eq!(src.size(), 1024);
    assert!(buf.iter().all(|&b| b == 0x5A));
}

#[test]
fn fixed_current_size_larger_than_file_is_corrupt() {
    let foot = footer::build(footer::TYPE_FIXED, 1 << 20, u64::MAX, [1; 16]);
    let mut img = vec![0u8; 4096];
    img.extend_from_slice(&foot);

    let err = open_bytes(&img).err().unwrap().to_string();

    assert!(
        err.contains("current_size 1048576 is larger than the 4096 data bytes"),
        "{err}"
    );
}

#[test]
fn current_size_is_rounded_down_to_sectors() {
    let foot = footer::build(footer::TYPE_FIXED, 1000, u64::MAX, [1; 16]);
    let mut img = vec![0u8; 1024];
    img.extend_from_slice(&foot);

    assert_eq!(open_bytes(&img).unwrap().size(), 512);
}

#[test]
fn dynamic_reads_blocks_and_zero_holes_across_edges() {
    let img = dynamic_image(4 * 4096, 4096, &[Some(1), None, Some(3), Some(4)]);
    let src = open_bytes(&img).unwrap();
    let mut buf = vec![0u8; 4096 * 3];

    src.read_at(&mut buf, 2048).unwrap();

    assert!(buf[..2048].iter().all(|&b| b == 1));
    assert!(buf[2048..6144].iter().all(|&b| b == 0));
    assert!(buf[6144..10240].iter().all(|&b| b == 3));
    assert!(buf[10240..].iter().all(|&b| b == 4));
}

#[test]
fn dynamic_extents_show_unallocated_blocks_as_holes() {
    let img = dynamic_image(4 * 4096, 4096, &[Some(1), None, None, Some(4)]);
    let src = open_bytes(&img).unwrap();

    let ext = src.extents(0, src.size()).unwrap();

    let want = [(0, 4096, true), (4096, 8192, false), (12288, 4096, true)];
    assert_eq!(
        ext.iter()
            .map(|e| (e.offset, e.length, e.allocated))
            .collect::<Vec<_>>(),
        want
    );
    assert_eq!(src.layers()[0].allocated_bytes, Some(8192));
}

#[test]
fn read_past_end_is_invalid_input_not_panic() {
    let src = open_bytes(&dynamic_image(4096, 4096, &[Some(1)])).unwrap();
    let mut buf = [0u8; 2];

    let err = src.read_at(&mut buf, u64::MAX).unwrap_err();

    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn header_offset_past_eof_is_corrupt() {
    let mut img = dynamic_image(4096, 4096, &[None]);
    let foot = footer::build(footer::TYPE_DYNAMIC, 4096, 1 << 40, [9; 16]);
    let n = img.len();
    img[n - 512..].copy_from_slice(&foot);

    let err = open_bytes(&img).err().unwrap().to_string();

    assert!(
        err.ends_with("footer data_offset 1099511627776 points past the end of the file"),
        "{err}"
    );
}

#[test]
fn unknown_disk_type_is_unsupported() {
    let mut img = vec![0u8; 1024];
    img.extend_from_slice(&footer::build(7, 512, u64::MAX, [1; 16]));

    let err = open_bytes(&img).err().unwrap().to_string();

    assert!(err.ends_with("unsupported: VHD disk type 7"), "{err}");
}

#[test]
fn huge_current_size_is_corrupt() {
    let mut img = vec![0u8; 1024];
    img.extend_from_slice(&footer::build(
        footer::TYPE_FIXED,
        u64::MAX,
        u64::MAX,
        [1; 16],
    ));

    let err = open_bytes(&img).err().unwrap().to_string();

    assert!(err.contains("exceeds the VHD maximum of 2040 GiB"), "{err}");
}

#[test]
fn chain_bat_budget_refuses_the_file_that_crosses_it() {
    let mut chain = Chain::default();
    let quarter = (MAX_CHAIN_BAT_BYTES / 4 / 4) as usize;
    let path = Path::new("parent3.vhd");

    let first_four: Vec<bool> = (0..4)
        .map(|_| chain.charge_bat(path, quarter).is_ok())
        .collect();
    let fifth = chain.charge_bat(path, 1).unwrap_err().to_string();

    assert_eq!(first_four, [true; 4]);
    assert!(fifth.starts_with("parent3.vhd: "), "{fifth}");
    assert!(fifth.contains("more than 512 MiB of memory"), "{fifth}");
}
