//! Formats imgsafe recognises but does not decode: other VM image containers, and
//! compressed or archived files. Probing would otherwise serve them as raw disks, and the
//! user would get "no filesystem found" from the appliance instead of the real reason.

/// What a foreign file is, and what the user can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Foreign {
    /// Its name, as people call it.
    pub name: &'static str,
    /// What to do instead.
    pub hint: &'static str,
}

const CONVERT: &str = "convert it to raw first (qemu-img convert -O raw)";
const DECOMPRESS: &str = "decompress it first";
const EXTRACT: &str = "extract the disk image from it first";

/// How many leading bytes [`identify`] looks at.
pub const HEAD_NEEDED: usize = 512;

/// The foreign format `head` (the file's first bytes) starts with, if any.
pub fn identify(head: &[u8]) -> Option<Foreign> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let f = |name, hint| Some(Foreign { name, hint });
    // qcow2 is decoded (format::qcow2, probed before this); version 1 is not.
    if at(0, b"QFI\xfb") && head.get(4..8) == Some(&[0, 0, 0, 1]) {
        return f("qcow (version 1) image", CONVERT);
    }
    if at(0, b"QED\0") {
        return f("QED image", CONVERT);
    }
    if at(0, b"COWD") {
        return f("VMware ESXi vmfsSparse (COWD) VMDK delta", CONVERT);
    }
    if at(0, b"\xfd7zXZ\0") {
        return f("xz-compressed file", DECOMPRESS);
    }
    if at(0, &[0x1f, 0x8b, 0x08]) {
        return f("gzip-compressed file", DECOMPRESS);
    }
    if at(0, &[0x28, 0xb5, 0x2f, 0xfd]) {
        return f("zstd-compressed file", DECOMPRESS);
    }
    if at(0, b"BZh") && head.get(3).is_some_and(|d| (b'1'..=b'9').contains(d)) && at(4, b"1AY&SY") {
        return f("bzip2-compressed file", DECOMPRESS);
    }
    if at(0, &[0x04, 0x22, 0x4d, 0x18]) {
        return f("lz4-compressed file", DECOMPRESS);
    }
    if at(0, b"7z\xbc\xaf\x27\x1c") {
        return f("7-Zip archive", EXTRACT);
    }
    if at(257, b"ustar") {
        return f("tar archive (an OVA?)", EXTRACT);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(off: usize, magic: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; HEAD_NEEDED];
        h[off..off + magic.len()].copy_from_slice(magic);
        h
    }

    #[test]
    fn container_and_compression_magics_are_named() {
        let cases: [(usize, &[u8], &str); 5] = [
            (0, b"QFI\xfb\0\0\0\x01", "qcow (version 1) image"),
            (0, b"COWD", "VMware ESXi vmfsSparse (COWD) VMDK delta"),
            (0, b"\xfd7zXZ\0", "xz-compressed file"),
            (0, b"BZh91AY&SY", "bzip2-compressed file"),
            (257, b"ustar\x0000", "tar archive (an OVA?)"),
        ];

        let named: Vec<Option<&str>> = cases
            .iter()
            .map(|(off, magic, _)| identify(&head_with(*off, magic)).map(|f| f.name))
            .collect();

        let expected: Vec<Option<&str>> = cases.iter().map(|c| Some(c.2)).collect();
        assert_eq!(named, expected);
    }

    #[test]
    fn disks_and_short_files_are_not_foreign() {
        let mut mbr = vec![0u8; HEAD_NEEDED];
        mbr[0..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        mbr[510..512].copy_from_slice(&[0x55, 0xaa]);

        assert_eq!(identify(&mbr), None);
        assert_eq!(identify(&[0u8; HEAD_NEEDED]), None);
        assert_eq!(identify(b"QF"), None);
        assert_eq!(identify(b"BZh9 not bzip2"), None);
    }
}
