//! NTFS through ntfs-3g in the appliance: images made rootless by mkntfs and filled by
//! ntfscp (no mount), read back with ls, cat and cp; names are looked up ignoring case
//! as Windows does, alternate data streams are left alone, and `filesystems` shows the
//! volume label and serial.

mod support;

use std::fs;
use support::*;

const UNICODE: &str = "naïve ünïcödé ☺.txt";

/// An NTFS image holding `Hello.TXT`, a Unicode-named file, a 3 MiB file and an
/// alternate data stream on `Hello.TXT`.
fn ntfs_image() -> (Image, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("win.img");
    fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    must(
        tool("mkntfs", "ntfs-3g")
            .args(["-F", "-Q", "-q", "-L", "WinVolume"])
            .arg(&img),
    );
    let files = tempfile::tempdir().unwrap();
    let big = pseudo_random(3 << 20, 5);
    let put = |name: &str, data: &[u8], stream: Option<&str>| {
        let local = files.path().join("f");
        fs::write(&local, data).unwrap();
        let mut c = tool("ntfscp", "ntfs-3g");
        c.arg("-q");
        if let Some(s) = stream {
            c.args(["-N", s]);
        }
        must(c.arg(&img).arg(&local).arg(name));
    };
    put("Hello.TXT", b"hello NTFS\n", None);
    put("Hello.TXT", b"hidden stream\n", Some("secret"));
    put(UNICODE, b"unicode\n", None);
    put("big.bin", &big, None);
    (Image::new(dir, img), big)
}

#[test]
fn ntfs_lists_reads_and_copies_with_case_insensitive_names() {
    let (img, big) = ntfs_image();
    let out = tempfile::tempdir().unwrap();

    let fsl = run(["filesystems", &img.arg()]);
    let ls = run(["ls", &img.arg(), "/"]);
    let long = run(["ls", "-l", &img.arg(), "/"]);
    let exact = run(["cat", &img.arg(), "/Hello.TXT"]);
    let folded = run(["cat", &img.arg(), "/hello.txt"]);
    let unicode = run(["cat", &img.arg(), &format!("/{}", UNICODE.to_uppercase())]);
    let cp = run([
        "cp",
        &format!("{}:/BIG.bin", img.arg()),
        &format!("{}:/{UNICODE}", img.arg()),
        out.path().to_str().unwrap(),
    ]);

    let table = ok_stdout(&fsl);
    let serial = {
        let f = fs::File::open(&img.path).unwrap();
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0x48).unwrap();
        format!("{:016X}", u64::from_le_bytes(b))
    };
    assert!(
        table.contains("ntfs") && table.contains("WinVolume") && table.contains(&serial),
        "{table}"
    );
    let names = ok_stdout(&ls);
    assert!(
        names.contains("Hello.TXT\n") && names.contains("big.bin\n") && names.contains(UNICODE),
        "{names}"
    );
    assert!(!names.contains("secret"), "{names}");
    let modes = ok_stdout(&long);
    assert!(
        modes.lines().all(|l| l.starts_with("-rw-r--r-- ")),
        "{modes}"
    );
    assert_eq!(ok_stdout(&exact), "hello NTFS\n");
    assert_eq!(ok_stdout(&folded), "hello NTFS\n");
    assert_eq!(ok_stdout(&unicode), "unicode\n");
    assert_eq!(ok_stdout(&cp), "");
    // The copy is named as the source was given, like any cp.
    assert!(fs::read(out.path().join("BIG.bin")).unwrap() == big);
    assert_eq!(fs::read(out.path().join(UNICODE)).unwrap(), b"unicode\n");
    img.assert_unchanged();
}

/// NTFS file attribute of a reparse point (MS-FSCC 2.6, FILE_ATTRIBUTE_REPARSE_POINT).
const FILE_ATTRIBUTE_REPARSE_POINT: u32 = 0x400;
/// MFT attribute types (MS-FSCC / NTFS on-disk layout).
const ATTR_STANDARD_INFORMATION: u32 = 0x10;

/// Read-modify-write MFT record `n` of the NTFS in `img`, with its update sequence
/// fixups undone while `edit` runs and redone after.
fn edit_mft_record(img: &std::path::Path, n: u64, edit: impl FnOnce(&mut [u8])) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::options()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut bs = [0u8; 512];
    f.read_exact_at(&mut bs, 0).unwrap();
    let cluster = u64::from(u16::from_le_bytes([bs[11], bs[12]])) * u64::from(bs[13]);
    let mft = u64::from_le_bytes(bs[0x30..0x38].try_into().unwrap()) * cluster;
    let size = 1usize << (bs[0x40] as i8).unsigned_abs();
    let off = mft + n * size as u64;
    let mut r = vec![0u8; size];
    f.read_exact_at(&mut r, off).unwrap();
    assert_eq!(&r[0..4], b"FILE");
    let usa = usize::from(u16::from_le_bytes([r[4], r[5]]));
    let count = usize::from(u16::from_le_bytes([r[6], r[7]]));
    for i in 1..count {
        let (end, fix) = (i * 512, usa + 2 * i);
        r.copy_within(fix..fix + 2, end - 2);
    }
    edit(&mut r);
    for i in 1..count {
        let (end, fix) = (i * 512, usa + 2 * i);
        r.copy_within(end - 2..end, fix);
        r.copy_within(usa..usa + 2, end - 2);
    }
    f.write_all_at(&r, off).unwrap();
}

/// The value of each resident attribute of `kind` in an MFT record: (start, length).
fn resident_values(r: &[u8], kind: u32) -> Vec<(usize, usize)> {
    let le32 = |at: usize| u32::from_le_bytes(r[at..at + 4].try_into().unwrap());
    let mut out = Vec::new();
    let mut at = usize::from(u16::from_le_bytes([r[0x14], r[0x15]]));
    while le32(at) != 0xFFFF_FFFF {
        if le32(at) == kind && r[at + 8] == 0 {
            let voff = usize::from(u16::from_le_bytes([r[at + 0x14], r[at + 0x15]]));
            out.push((at + voff, le32(at + 0x10) as usize));
        }
        at += le32(at + 4) as usize;
    }
    out
}

/// Make file `inode` (which has a $REPARSE_POINT attribute, written by ntfscp -a)
/// a reparse point: its file attributes in $STANDARD_INFORMATION get
/// FILE_ATTRIBUTE_REPARSE_POINT (ntfs-3g takes a file's type from its inode).
fn mark_reparse_point(img: &std::path::Path, inode: u64) {
    edit_mft_record(img, inode, |r| {
        let (si, _) = resident_values(r, ATTR_STANDARD_INFORMATION)[0];
        let attrs = u32::from_le_bytes(r[si + 32..si + 36].try_into().unwrap());
        r[si + 32..si + 36].copy_from_slice(&(attrs | FILE_ATTRIBUTE_REPARSE_POINT).to_le_bytes());
    });
}

/// A symbolic-link reparse buffer (MS-FSCC 2.1.2.4, IO_REPARSE_TAG_SYMLINK) to `target`;
/// `relative` sets SYMLINK_FLAG_RELATIVE.
fn symlink_reparse(target: &str, relative: bool) -> Vec<u8> {
    let t: Vec<u8> = target.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let n = t.len() as u16;
    let mut buf = Vec::new();
    for v in [0u16, n, n, n] {
        buf.extend(v.to_le_bytes());
    }
    buf.extend(u32::from(relative).to_le_bytes());
    buf.extend(&t);
    buf.extend(&t);
    let mut out = 0xA000_000Cu32.to_le_bytes().to_vec();
    out.extend((buf.len() as u16).to_le_bytes());
    out.extend([0, 0]);
    out.extend(buf);
    out
}

/// The inode number ntfsls gives `name` in the root directory.
fn inode_of(img: &std::path::Path, name: &str) -> u64 {
    let out = tool("ntfsls", "ntfs-3g")
        .args(["-i"])
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let (n, rest) = l.trim().split_once(char::is_whitespace)?;
            (rest.trim() == name).then(|| n.parse().ok())?
        })
        .unwrap_or_else(|| panic!("ntfsls -i does not list {name}"))
}

#[test]
fn reparse_points_are_links_resolved_inside_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("links.img");
    fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
    must(tool("mkntfs", "ntfs-3g").args(["-F", "-Q", "-q"]).arg(&img));
    let local = dir.path().join("data");
    let put = |name: &str, data: &[u8], attr: Option<&str>| {
        fs::write(&local, data).unwrap();
        let mut c = tool("ntfscp", "ntfs-3g");
        c.arg("-q");
        if let Some(a) = attr {
            c.args(["-a", a]);
        }
        must(c.arg(&img).arg(&local).arg(name));
    };
    put("Hello.TXT", b"the target\n", None);
    for (name, target, relative) in [
        ("rel", "Hello.TXT", true),
        ("abs", "\\??\\C:\\Windows\\win.ini", false),
    ] {
        put(name, b"", None);
        // 192 = $REPARSE_POINT.
        put(name, &symlink_reparse(target, relative), Some("192"));
        mark_reparse_point(&img, inode_of(&img, name));
    }
    fs::remove_file(&local).unwrap();
    let img = Image::new(dir, img);
    let out = tempfile::tempdir().unwrap();

    let ls = run(["ls", "-l", &img.arg(), "/"]);
    let through = run(["cat", &img.arg(), "/rel"]);
    let outside = run(["cat", &img.arg(), "/abs"]);
    let cp = run([
        "cp",
        &format!("{}:/rel", img.arg()),
        out.path().to_str().unwrap(),
    ]);

    let text = ok_stdout(&ls);
    assert!(text.contains("rel -> Hello.TXT"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with('l') && l.contains("abs -> ")),
        "{text}"
    );
    assert_eq!(ok_stdout(&through), "the target\n");
    assert_eq!(code(&outside), 4, "{}", stderr(&outside));
    assert_eq!(ok_stdout(&cp), "");
    assert_eq!(
        fs::read_link(out.path().join("rel")).unwrap(),
        std::path::Path::new("Hello.TXT")
    );
    img.assert_unchanged();
}
