//! OVA: a tar archive (POSIX ustar, with GNU long names and pax size/path records) of
//! an OVF descriptor and its disks. A disk is read in place, as the stream-optimized
//! VMDK that OVF tools store, from its member's offset: nothing is extracted.

use super::descriptor::{self, ExtentKind, NO_PARENT_CID};
use super::sparse::{self, Sparse, Window, SECTOR};
use super::{Part, Piece, Vmdk};
use crate::format::{FormatError, OpenOptions};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Bytes of a tar header block.
const BLOCK: u64 = 512;
/// Most archive members looked at.
pub const MAX_MEMBERS: usize = 4096;
/// Largest pax or GNU long-name record read.
const MAX_RECORD: u64 = 64 << 10;

/// True if the file's first block is a tar header ("ustar" at offset 257).
pub fn probe(head: &[u8]) -> bool {
    head.get(257..262) == Some(b"ustar")
}

/// One regular file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name in the archive.
    pub name: String,
    /// Where its data starts in the archive file.
    pub offset: u64,
    /// Its length.
    pub size: u64,
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A numeric header field: octal text, or base-256 when the top bit of its first byte
/// is set (GNU tar, for members of 8 GiB and more).
fn number(b: &[u8]) -> Option<u64> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        let mut v: u64 = u64::from(b[0] & 0x7f);
        for &c in &b[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(c))?;
        }
        return Some(v);
    }
    let t = cstr(b);
    let t = t.trim_matches([' ', '\0']);
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(t, 8).ok()
}

/// The `size` and `path` records of a pax extended header.
fn pax(data: &[u8]) -> (Option<u64>, Option<String>) {
    let (mut size, mut path) = (None, None);
    let text = String::from_utf8_lossy(data);
    for rec in text.split('\n') {
        let Some((_, kv)) = rec.split_once(' ') else {
            continue;
        };
        match kv.split_once('=') {
            Some(("size", v)) => size = v.parse().ok(),
            Some(("path", v)) => path = Some(v.to_string()),
            _ => {}
        }
    }
    (size, path)
}

/// The regular files of the archive, in order.
pub fn members(path: &Path, file: &File) -> Result<Vec<Member>, FormatError> {
    let bad = |what: String| FormatError::corrupt(path, what);
    let len = crate::format::file_len(path, file)?;
    let mut out = Vec::new();
    let (mut next_size, mut next_name): (Option<u64>, Option<String>) = (None, None);
    let mut pos = 0u64;
    for _ in 0..MAX_MEMBERS * 2 {
        if pos + BLOCK > len {
            break;
        }
        let mut h = [0u8; BLOCK as usize];
        crate::format::read_exact_at(file, &mut h, pos).map_err(|e| FormatError::io(path, e))?;
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let stored = number(&h[148..156]);
        let computed: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if stored != Some(computed) {
            return Err(bad(format!(
                "tar header at offset {pos}: checksum mismatch"
            )));
        }
        let size = number(&h[124..136])
            .ok_or_else(|| bad(format!("tar header at offset {pos}: bad size field")))?;
        let data = pos + BLOCK;
        let size = next_size.take().unwrap_or(size);
        if data.checked_add(size).is_none_or(|e| e > len) {
            return Err(bad(format!(
                "tar member at offset {pos} ({size} bytes) extends past the end of the file"
            )));
        }
        let record = |n: u64| -> Result<Vec<u8>, FormatError> {
            if n > MAX_RECORD {
                return Err(bad(format!("tar record at offset {pos} is {n} bytes long")));
            }
            let mut v = vec![0u8; n as usize];
            crate::format::read_exact_at(file, &mut v, data)
                .map_err(|e| FormatError::io(path, e))?;
            Ok(v)
        };
        match h[156] {
            b'x' => {
                let (s, p) = pax(&record(size)?);
                next_size = s;
                next_name = p;
            }
            b'L' => next_name = Some(cstr(&record(size)?)),
            b'0' | b'\0' | b'7' => {
                let name = next_name.take().unwrap_or_else(|| {
                    let (prefix, name) = (cstr(&h[345..500]), cstr(&h[0..100]));
                    if prefix.is_empty() || &h[257..263] != b"ustar\0" {
                        name
                    } else {
                        format!("{prefix}/{name}")
                    }
                });
                if out.len() >= MAX_MEMBERS {
                    return Err(FormatError::Unsupported {
                        path: path.to_path_buf(),
                        what: format!("tar archive with more than {MAX_MEMBERS} files"),
                    });
                }
                out.push(Member {
                    name,
                    offset: data,
                    size,
                });
            }
            _ => next_name = None,
        }
        pos = data + size.next_multiple_of(BLOCK);
    }
    Ok(out)
}

/// Open the disk of an OVA: its only `.vmdk`, or the one `--disk N` names.
pub fn open(path: &Path, file: File, opts: &OpenOptions) -> Result<Vmdk, FormatError> {
    let disks: Vec<Member> = members(path, &file)?
        .into_iter()
        .filter(|m| {
            let b = m.name.as_bytes();
            b.len() > 5 && b[b.len() - 5..].eq_ignore_ascii_case(b".vmdk")
        })
        .collect();
    let list = || {
        disks
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{} {} ({} bytes)", i + 1, m.name, m.size))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let m =
        match (disks.len(), opts.disk) {
            (0, _) => return Err(FormatError::Unsupported {
                path: path.to_path_buf(),
                what:
                    "a tar archive with no .vmdk disk inside: extract the disk image from it first"
                        .into(),
            }),
            (1, None | Some(1)) => &disks[0],
            (n, Some(k)) if (1..=n).contains(&k) => &disks[k - 1],
            (_, Some(k)) => {
                return Err(FormatError::corrupt(
                    path,
                    format!("OVA has no disk {k}; its disks are: {}", list()),
                ))
            }
            (n, None) => {
                return Err(FormatError::corrupt(
                    path,
                    format!("OVA holds {n} disks ({}): choose one with --disk N", list()),
                ))
            }
        };
    let shown = PathBuf::from(format!("{}[{}]", path.display(), m.name));
    let bad = |what: String| FormatError::corrupt(&shown, what);
    let window = Window {
        file,
        base: m.offset,
        len: m.size,
    };
    let mut head = [0u8; sparse::HEADER_LEN];
    window
        .read(&mut head, 0)
        .map_err(|e| FormatError::io(&shown, e))?;
    let h = sparse::Header::parse(&head).map_err(|e| FormatError::Unsupported {
        path: shown.clone(),
        what: format!("OVA disk that is not a sparse VMDK ({e}): extract it first"),
    })?;
    let n = h.desc_sectors.saturating_mul(SECTOR);
    if h.desc_offset == 0 || n == 0 || n > descriptor::MAX_DESCRIPTOR_LEN {
        return Err(bad("sparse extent has no usable embedded descriptor".into()));
    }
    let mut raw = vec![0u8; n as usize];
    window
        .read(&mut raw, h.desc_offset.saturating_mul(SECTOR))
        .map_err(|e| FormatError::io(&shown, e))?;
    let d = descriptor::parse(&raw).map_err(|p| super::problem(&shown, p))?;
    let [line] = d.extents.as_slice() else {
        return Err(bad("OVA disk whose descriptor has several extents".into()));
    };
    if !matches!(line.kind, ExtentKind::Sparse { .. }) || d.parent_cid != NO_PARENT_CID {
        return Err(FormatError::Unsupported {
            path: shown,
            what: "OVA disk that is not one self-contained sparse extent: extract it first".into(),
        });
    }
    if h.capacity < line.sectors {
        return Err(bad(format!(
            "sparse extent holds {} sectors but the descriptor gives it {}",
            h.capacity, line.sectors
        )));
    }
    let version = format!("{} v{} in OVA", d.create_type, h.version);
    let s = Sparse::open_in(&shown, window, h, 1).map_err(bad)?;
    let size = line.sectors * SECTOR;
    Ok(Vmdk {
        path: shown,
        size,
        cid: d.cid,
        parts: vec![Part {
            start: 0,
            len: size,
            piece: Piece::Sparse(Box::new(s)),
        }],
        parent: None,
        role: "image".into(),
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_octal_or_base_256() {
        assert_eq!(number(b"00000001750\0"), Some(1000));
        assert_eq!(number(b"   1750 \0"), Some(1000));
        assert_eq!(
            number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]),
            Some(2 << 24)
        );
        assert_eq!(number(b"9\0"), None);
    }

    #[test]
    fn pax_records_give_size_and_path() {
        let rec = b"30 size=12884901888\n22 path=disk-1.vmdk\n";

        assert_eq!(pax(rec), (Some(12 << 30), Some("disk-1.vmdk".into())));
    }
}
