//! Unit tests on VDI images built in memory from the v1.1 layout (`header::build`):
//! block states, differencing chains found by UUID, and hostile headers.

use super::*;
use header::{build, TYPE_DIFF, TYPE_DYNAMIC};

const BS: u32 = 4096;

/// A VDI of `blocks.len()` blocks of [`BS`] bytes; `blocks[i]` is the map entry state:
/// `Some(fill)` allocates a data block filled with `fill`, `None` is free, and
/// `Some(-1)`-like zero blocks are given as [`BLOCK_ZERO`] through `zero`.
struct Spec {
    image_type: u32,
    uuid: [u8; 16],
    link: [u8; 16],
    blocks: Vec<Block>,
}

#[derive(Clone, Copy)]
enum Block {
    Free,
    Zero,
    Data(u8),
}

impl Spec {
    fn new(image_type: u32, blocks: Vec<Block>) -> Spec {
        Spec {
            image_type,
            uuid: [0x11; 16],
            link: [0; 16],
            blocks,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let n = self.blocks.len() as u32;
        let mut img = build(self.image_type, u64::from(n * BS), BS, n);
        img[0x188..0x198].copy_from_slice(&self.uuid);
        img[0x1a8..0x1b8].copy_from_slice(&self.link);
        let data_off = u32::from_le_bytes(img[0x158..0x15c].try_into().unwrap()) as usize;
        img.resize(data_off, 0);
        // Data blocks are stored in reverse order, so the map is not the identity.
        let mut next = self
            .blocks
            .iter()
            .filter(|b| matches!(b, Block::Data(_)))
            .count() as u32;
        let mut data = vec![Vec::new(); next as usize];
        for (i, b) in self.blocks.iter().enumerate() {
            let e = match b {
                Block::Free => BLOCK_FREE,
                Block::Zero => BLOCK_ZERO,
                Block::Data(fill) => {
                    next -= 1;
                    data[next as usize] = vec![*fill; BS as usize];
                    next
                }
            };
            img[512 + i * 4..516 + i * 4].copy_from_slice(&e.to_le_bytes());
        }
        for d in data {
            img.extend_from_slice(&d);
        }
        img
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn open_path(p: &Path) -> Result<Box<dyn BlockSource>, FormatError> {
    open(p, super::super::open_image_file(p)?)
}

fn read_all(src: &dyn BlockSource) -> Vec<u8> {
    let mut buf = vec![0u8; src.size() as usize];
    // Two reads, the first ending inside a block, to cross block edges.
    let cut = (BS as usize + 100).min(buf.len());
    src.read_at(&mut buf[..cut], 0).unwrap();
    src.read_at(&mut buf[cut..], cut as u64).unwrap();
    buf
}

fn expect(fills: &[u8]) -> Vec<u8> {
    fills
        .iter()
        .flat_map(|&f| std::iter::repeat_n(f, BS as usize))
        .collect()
}

fn err_of(p: &Path) -> String {
    match open_path(p) {
        Ok(_) => panic!("{} opened but should not", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn dynamic_reads_data_free_and_zero_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new(
        TYPE_DYNAMIC,
        vec![Block::Data(1), Block::Free, Block::Zero, Block::Data(4)],
    );
    let p = write(dir.path(), "d.vdi", &spec.bytes());

    let src = open_path(&p).unwrap();

    assert_eq!(read_all(src.as_ref()), expect(&[1, 0, 0, 4]));
    assert_eq!(
        src.extents(0, src.size()).unwrap(),
        [
            Extent {
                offset: 0,
                length: 4096,
                allocated: true
            },
            Extent {
                offset: 4096,
                length: 8192,
                allocated: false
            },
            Extent {
                offset: 12288,
                length: 4096,
                allocated: true
            },
        ]
    );
    let l = &src.layers()[0];
    assert_eq!(
        (l.format.as_str(), l.version.as_deref(), l.role.as_str()),
        ("vdi", Some("1.1 dynamic"), "image")
    );
    assert_eq!(
        (l.cluster_size, l.allocated_bytes),
        (Some(4096), Some(8192))
    );
}

#[test]
fn block_extra_bytes_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = Spec::new(TYPE_DYNAMIC, vec![Block::Free]).bytes();
    img[0x17c..0x180].copy_from_slice(&512u32.to_le_bytes());
    img[512..516].copy_from_slice(&0u32.to_le_bytes());
    img.extend(std::iter::repeat_n(0xEE, 512));
    img.extend(std::iter::repeat_n(0x42, BS as usize));
    let p = write(dir.path(), "x.vdi", &img);

    let got = read_all(open_path(&p).unwrap().as_ref());

    assert_eq!(got, expect(&[0x42]));
}

/// A parent with data everywhere and a child over it: data, free (parent shows) and zero
/// (zeros although the parent has data).
fn parent_and_child(dir: &Path) -> PathBuf {
    let mut parent = Spec::new(TYPE_DYNAMIC, vec![Block::Data(7); 4]);
    parent.uuid = [0xAA; 16];
    let mut child = Spec::new(
        TYPE_DIFF,
        vec![Block::Data(9), Block::Free, Block::Zero, Block::Free],
    );
    child.link = [0xAA; 16];
    write(dir, "base.VDI", &parent.bytes());
    write(
        dir,
        "unrelated.vdi",
        &Spec::new(TYPE_DYNAMIC, vec![Block::Free]).bytes(),
    );
    write(dir, "notes.txt", b"not an image");
    // A name whose last 4 bytes split a character must not trip the .vdi check.
    write(dir, "x\u{e9}t\u{e9}", b"not an image either");
    write(dir, "snap.vdi", &child.bytes())
}

#[test]
fn differencing_finds_its_parent_beside_it_by_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let child = parent_and_child(dir.path());

    let src = open_path(&child).unwrap();

    assert_eq!(read_all(src.as_ref()), expect(&[9, 7, 0, 7]));
    let roles: Vec<String> = src.layers().iter().map(|l| l.role.clone()).collect();
    assert_eq!(roles, ["top", "parent"]);
    assert!(src.layers()[1].path.ends_with("base.VDI"));
    assert_eq!(
        src.extents(0, src.size()).unwrap(),
        [
            Extent {
                offset: 0,
                length: 8192,
                allocated: true
            },
            Extent {
                offset: 8192,
                length: 4096,
                allocated: false
            },
            Extent {
                offset: 12288,
                length: 4096,
                allocated: true
            },
        ]
    );
}

#[test]
fn missing_parent_names_the_uuid_and_folder() {
    let dir = tempfile::tempdir().unwrap();
    let child = parent_and_child(dir.path());
    std::fs::remove_file(dir.path().join("base.VDI")).unwrap();

    let err = err_of(&child);

    assert!(
        err.contains("snap.vdi")
            && err.contains("aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa")
            && err.contains("not found among the 2 .vdi files"),
        "{err}"
    );
}

#[test]
fn two_files_with_the_parent_uuid_are_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    let child = parent_and_child(dir.path());
    std::fs::copy(dir.path().join("base.VDI"), dir.path().join("copy.vdi")).unwrap();

    let err = err_of(&child);

    assert!(
        err.contains("several files") && err.contains("copy.vdi"),
        "{err}"
    );
}

#[test]
fn parent_cycle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Spec::new(TYPE_DIFF, vec![Block::Free]);
    let mut b = Spec::new(TYPE_DIFF, vec![Block::Free]);
    (a.uuid, a.link) = ([1; 16], [2; 16]);
    (b.uuid, b.link) = ([2; 16], [1; 16]);
    let pa = write(dir.path(), "a.vdi", &a.bytes());
    write(dir.path(), "b.vdi", &b.bytes());

    let err = err_of(&pa);

    assert!(err.contains("a.vdi: parent loop"), "{err}");
}

#[test]
fn hostile_headers_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = Spec::new(TYPE_DYNAMIC, vec![Block::Data(1), Block::Free]).bytes();
    let patch = |at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            patch(512, &0x00FF_0000u32.to_le_bytes()),
            "block map entry 0 (16711680) is not below the block count 2",
        ),
        (
            patch(0x180, &1u32.to_le_bytes()),
            "disk size 8192 is larger than its 1 blocks",
        ),
        (
            patch(0x180, &0x1000_0000u32.to_le_bytes()),
            "extends past the end of the file",
        ),
        (
            patch(0x178, &3000u32.to_le_bytes()),
            "block size 3000 is not a power of two",
        ),
        (
            patch(0x170, &u64::MAX.to_le_bytes()),
            "disk size 18446744073709551615 overflows",
        ),
        (
            patch(0x154, &64u32.to_le_bytes()),
            "block map (offset 64) overlaps the header",
        ),
        (
            patch(0x158, &516u32.to_le_bytes()),
            "data area (offset 516) overlaps the block map",
        ),
        (
            patch(0x4c, &3u32.to_le_bytes()),
            "unsupported: VDI undo image",
        ),
        (
            patch(0x168, &4096u32.to_le_bytes()),
            "unsupported: VDI sector size 4096",
        ),
        (
            good[..good.len() - 1].to_vec(),
            "block map entry 0 points past the end of the file",
        ),
        (
            patch(68, &0x0001_0000u32.to_le_bytes()),
            "VDI header: VDI version 1.0",
        ),
    ];

    let errs: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, (bytes, _))| err_of(&write(dir.path(), &format!("h{i}.vdi"), bytes)))
        .collect();

    for ((_, want), got) in cases.iter().zip(&errs) {
        assert!(got.contains(want), "{got:?} lacks {want:?}");
    }
}

#[test]
fn uuid_text_uses_virtualbox_byte_order() {
    let u: [u8; 16] = std::array::from_fn(|i| i as u8);

    assert_eq!(uuid_text(&u), "03020100-0504-0706-0809-0a0b0c0d0e0f");
}

#[test]
fn reads_past_the_end_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.vdi",
        &Spec::new(TYPE_DYNAMIC, vec![Block::Free]).bytes(),
    );
    let src = open_path(&p).unwrap();

    let err = src.read_at(&mut [0u8; 2], src.size() - 1).unwrap_err();

    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn chains_deeper_than_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // File i links to file i + 1; the last one is a dynamic base.
    let n = MAX_CHAIN_DEPTH + 1;
    for i in 0..n {
        let last = i + 1 == n;
        let mut s = Spec::new(
            if last { TYPE_DYNAMIC } else { TYPE_DIFF },
            vec![Block::Free],
        );
        s.uuid = [i as u8 + 1; 16];
        s.link = if last { [0; 16] } else { [i as u8 + 2; 16] };
        write(dir.path(), &format!("f{i:02}.vdi"), &s.bytes());
    }
    let ok = open_path(&dir.path().join("f01.vdi"));

    let err = err_of(&dir.path().join("f00.vdi"));

    assert!(
        ok.is_ok(),
        "a chain of exactly {MAX_CHAIN_DEPTH} files opens"
    );
    assert!(
        err.contains(&format!("deeper than {MAX_CHAIN_DEPTH} files")),
        "{err}"
    );
}
