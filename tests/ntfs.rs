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
    assert_eq!(ok_stdout(&exact), "hello NTFS\n");
    assert_eq!(ok_stdout(&folded), "hello NTFS\n");
    assert_eq!(ok_stdout(&unicode), "unicode\n");
    assert_eq!(ok_stdout(&cp), "");
    // The copy is named as the source was given, like any cp.
    assert!(fs::read(out.path().join("BIG.bin")).unwrap() == big);
    assert_eq!(fs::read(out.path().join(UNICODE)).unwrap(), b"unicode\n");
    img.assert_unchanged();
}
