//! Unit tests of probing, footer selection and the open-time checks, on images built in
//! memory with the test-only footer/header builders.
//!
//! These builders are not the integration tests' writer (tests/support/vhdwriter.rs) on
//! purpose: that one is written from the spec with none of the decoder's code, so that
//! it can check the decoder; these use the decoder's own constants and checksum to set
//! up one field at a time for the checks here, and unit tests cannot reach the other
//! (it lives in the integration tests' crate).

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

/// A differencing image with unique id `[8; 16]` over the parent `parent_id`: footer copy,
/// header at 512, BAT at 1536, the `locators` data (platform code, bytes), the stored
/// `blocks` (bitmap byte, data byte), footer. `bat[i] = Some(n)` maps block i to stored
/// block n, so several entries may share one block.
fn differencing_image(
    size: u64,
    block_size: u32,
    parent_id: [u8; 16],
    locators: &[(u32, Vec<u8>)],
    blocks: &[(u8, u8)],
    bat: &[Option<usize>],
) -> Vec<u8> {
    let foot = footer::build(footer::TYPE_DIFFERENCING, size, 512, [8; 16]);
    let bat_len = (bat.len() * 4).div_ceil(512) * 512;
    let mut loc_entries = Vec::new();
    let mut loc_data = Vec::new();
    for (code, data) in locators {
        let at = 1536 + bat_len + loc_data.len();
        loc_entries.push((*code, data.len() as u32, at as u64));
        loc_data.extend_from_slice(data);
        loc_data.resize(loc_data.len().div_ceil(512) * 512, 0);
    }
    let head = header::build(1536, bat.len() as u32, block_size, parent_id, &loc_entries);
    let mut img = Vec::new();
    img.extend_from_slice(&foot);
    img.extend_from_slice(&head);
    img.resize(1536 + bat_len, 0xFF);
    img.extend_from_slice(&loc_data);
    let bm = dynamic::bitmap_len(block_size) as usize;
    let mut sectors = Vec::new();
    for &(bitmap, fill) in blocks {
        sectors.push((img.len() / 512) as u32);
        img.extend(std::iter::repeat_n(bitmap, bm));
        img.extend(std::iter::repeat_n(fill, block_size as usize));
    }
    for (i, b) in bat.iter().enumerate() {
        if let Some(n) = b {
            img[1536 + i * 4..1536 + i * 4 + 4].copy_from_slice(&sectors[*n].to_be_bytes());
        }
    }
    img.extend_from_slice(&foot);
    img
}

/// A fixed VHD of `size` bytes with `unique_id`: a sparse file whose only data is `data`
/// at offset 0.
fn write_fixed(path: &Path, size: u64, data: &[u8], unique_id: [u8; 16]) {
    use std::os::unix::fs::FileExt;
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(data, 0).unwrap();
    f.write_all_at(
        &footer::build(footer::TYPE_FIXED, size, u64::MAX, unique_id),
        size,
    )
    .unwrap();
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

fn open_path(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockSource>, FormatError> {
    open(path, File::open(path).unwrap(), opts)
}

/// A child of 1 MiB with no blocks of its own, so every byte reads from its parent, found
/// through these locators.
fn write_child(path: &Path, locators: &[(u32, Vec<u8>)]) {
    let img = differencing_image(1 << 20, 1 << 20, [1; 16], locators, &[], &[None]);
    std::fs::write(path, img).unwrap();
}

fn first_byte(src: &dyn BlockSource) -> u8 {
    let mut b = [0u8; 1];
    src.read_at(&mut b, 0).unwrap();
    b[0]
}

#[test]
fn parent_candidate_with_the_wrong_id_is_skipped_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.vhd");
    write_fixed(&dir.path().join("stale.vhd"), 1 << 20, &[0x22], [2; 16]);
    write_fixed(&good, 1 << 20, &[0x11], [1; 16]);
    let child = dir.path().join("child.vhd");
    write_child(
        &child,
        &[
            (PLATFORM_W2RU, utf16le(".\\stale.vhd")),
            (PLATFORM_W2KU, utf16le(good.to_str().unwrap())),
        ],
    );

    // The parent's footer time stamp (1000) differs from the child's record (0): only the
    // unique id decides.
    let src = open_path(&child, &OpenOptions::default()).unwrap();

    assert_eq!(first_byte(&*src), 0x11);
    assert_eq!(src.layers()[1].path, good);
}

#[test]
fn missing_parent_candidate_is_skipped_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    write_fixed(&dir.path().join("good.vhd"), 1 << 20, &[0x11], [1; 16]);
    let child = dir.path().join("child.vhd");
    write_child(
        &child,
        &[
            (PLATFORM_W2RU, utf16le("gone.vhd")),
            (PLATFORM_MACX, b"file://./good.vhd".to_vec()),
        ],
    );

    let src = open_path(&child, &OpenOptions::default()).unwrap();

    assert_eq!(first_byte(&*src), 0x11);
}

#[test]
fn ignore_parent_id_takes_the_first_existing_candidate() {
    let dir = tempfile::tempdir().unwrap();
    write_fixed(&dir.path().join("stale.vhd"), 1 << 20, &[0x22], [2; 16]);
    write_fixed(&dir.path().join("good.vhd"), 1 << 20, &[0x11], [1; 16]);
    let child = dir.path().join("child.vhd");
    write_child(
        &child,
        &[
            (PLATFORM_W2RU, utf16le("stale.vhd")),
            (PLATFORM_W2KU, utf16le("good.vhd")),
        ],
    );
    let opts = OpenOptions {
        ignore_parent_id: true,
        ..Default::default()
    };

    let src = open_path(&child, &opts).unwrap();

    assert_eq!(first_byte(&*src), 0x22);
}

#[test]
fn when_no_candidate_fits_the_first_id_mismatch_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_fixed(&dir.path().join("stale2.vhd"), 1 << 20, &[0x22], [2; 16]);
    write_fixed(&dir.path().join("stale3.vhd"), 1 << 20, &[0x33], [3; 16]);
    let child = dir.path().join("child.vhd");
    write_child(
        &child,
        &[
            (PLATFORM_W2RU, utf16le("gone.vhd")),
            (PLATFORM_W2KU, utf16le("stale2.vhd")),
            (PLATFORM_MACX, b"file://./stale3.vhd".to_vec()),
        ],
    );

    let err = open_path(&child, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();

    assert!(
        err.starts_with(&format!("{}: parent ", child.display())),
        "{err}"
    );
    assert!(err.contains("stale2.vhd has unique id 02020202"), "{err}");
    assert!(err.contains("--ignore-parent-id"), "{err}");
}

#[test]
fn dangling_symlink_parent_is_named_as_the_parent_of_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("base.vhd");
    std::os::unix::fs::symlink("nowhere.vhd", &link).unwrap();
    let child = dir.path().join("child.vhd");
    write_child(&child, &[(PLATFORM_W2RU, utf16le("base.vhd"))]);

    let err = open_path(&child, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();

    assert!(err.starts_with(&format!("{}: ", link.display())), "{err}");
    assert!(
        err.ends_with(&format!(
            "(it is the parent of differencing disk {})",
            child.display()
        )),
        "{err}"
    );
}

#[test]
fn no_existing_candidate_lists_every_path_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let child = dir.path().join("child.vhd");
    write_child(
        &child,
        &[
            (PLATFORM_W2RU, utf16le("a.vhd")),
            (PLATFORM_W2KU, utf16le("/nonexistent/b.vhd")),
        ],
    );

    let err = open_path(&child, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();

    assert_eq!(
        err,
        format!(
            "{}: parent image not found (looked for {}, /nonexistent/b.vhd)",
            child.display(),
            dir.path().join("a.vhd").display()
        )
    );
}

#[test]
fn fixed_vhd_reports_the_holes_of_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fixed.vhd");
    write_fixed(&path, 4 << 20, &[1u8; 65536], [1; 16]);

    let ext = open_path(&path, &OpenOptions::default())
        .unwrap()
        .extents(0, 4 << 20)
        .unwrap();

    let got: Vec<_> = ext
        .iter()
        .map(|e| (e.offset, e.length, e.allocated))
        .collect();
    assert_eq!(got, [(0, 65536, true), (65536, (4 << 20) - 65536, false)]);
}

#[test]
fn differencing_chain_is_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    write_fixed(
        &dir.path().join("base.vhd"),
        8 << 20,
        &[9u8; 1 << 20],
        [1; 16],
    );
    let child = dir.path().join("child.vhd");
    // Block 0: sectors alternate 4 own, 4 from the parent; block 2: all own.
    let img = differencing_image(
        8 << 20,
        2 << 20,
        [1; 16],
        &[(PLATFORM_W2RU, utf16le("base.vhd"))],
        &[(0xF0, 1), (0xFF, 2)],
        &[Some(0), None, Some(1), None],
    );
    std::fs::write(&child, img).unwrap();
    let src = open_path(&child, &OpenOptions::default()).unwrap();

    let allocated = crate::format::count_allocated(&*src, crate::format::MAX_COUNTED_EXTENTS);
    let mid = src.extents(1 << 20, 8192).unwrap();

    // 0..1 MiB: own or parent data; 1..2 MiB: own half; 4..6 MiB: own.
    assert_eq!(
        allocated.unwrap(),
        Some((1 << 20) + (512 << 10) + (2 << 20))
    );
    let got: Vec<_> = mid
        .iter()
        .map(|e| (e.offset, e.length, e.allocated))
        .collect();
    let m = 1u64 << 20;
    assert_eq!(
        got,
        [
            (m, 2048, true),
            (m + 2048, 2048, false),
            (m + 4096, 2048, true),
            (m + 6144, 2048, false)
        ]
    );
}

#[test]
fn hostile_differencing_map_is_not_counted_and_info_returns_quickly() {
    let dir = tempfile::tempdir().unwrap();
    write_fixed(&dir.path().join("base.vhd"), 1 << 20, &[9], [1; 16]);
    let child = dir.path().join("child.vhd");
    // 2040 GiB whose every block is the one stored block, its sectors alternating between
    // this file and the parent: billions of extents.
    let blocks = (footer::MAX_DISK_SIZE / (2 << 20)) as usize;
    let img = differencing_image(
        footer::MAX_DISK_SIZE,
        2 << 20,
        [1; 16],
        &[(PLATFORM_W2RU, utf16le("base.vhd"))],
        &[(0xAA, 1)],
        &vec![Some(0); blocks],
    );
    std::fs::write(&child, img).unwrap();
    let src = open_path(&child, &OpenOptions::default()).unwrap();
    let started = std::time::Instant::now();

    let allocated = crate::format::count_allocated(&*src, crate::format::MAX_COUNTED_EXTENTS);

    assert_eq!(src.size(), footer::MAX_DISK_SIZE);
    // Too many extents to count: given up on, not counted for ever (`info` says
    // "not counted").
    assert_eq!(allocated.unwrap(), None);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn failure_further_down_a_parent_chain_is_reported_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let middle = dir.path().join("middle.vhd");
    // Both candidates carry the id the child expects ([8; 16]); the first one's own parent
    // is missing.
    let orphan = differencing_image(
        1 << 20,
        1 << 20,
        [5; 16],
        &[(PLATFORM_W2RU, utf16le("gone.vhd"))],
        &[],
        &[None],
    );
    std::fs::write(&middle, orphan).unwrap();
    write_fixed(&dir.path().join("other.vhd"), 1 << 20, &[0x11], [8; 16]);
    let child = dir.path().join("child.vhd");
    let img = differencing_image(
        1 << 20,
        1 << 20,
        [8; 16],
        &[
            (PLATFORM_W2RU, utf16le("middle.vhd")),
            (PLATFORM_W2KU, utf16le("other.vhd")),
        ],
        &[],
        &[None],
    );
    std::fs::write(&child, img).unwrap();

    let err = open_path(&child, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();

    assert!(
        err.starts_with(&format!("{}: parent image not found", middle.display())),
        "{err}"
    );
}
