//! The VMDK text descriptor (VMware "Virtual Disk Format 1.1", section "The Descriptor
//! File"): `key=value` lines and one extent line per piece of the disk,
//! `ACCESS SECTORS TYPE "FILE" [OFFSET]`.

/// Largest descriptor read (embedded or separate). qemu-img writes about 500 bytes; a
/// twoGbMaxExtent descriptor of a 64 TiB disk has about 33,000 lines, so 4 MiB is ample.
pub const MAX_DESCRIPTOR_LEN: u64 = 4 << 20;
/// Most extent lines in one descriptor.
pub const MAX_EXTENTS: usize = 65536;
/// `parentCID` of a disk without a parent.
pub const NO_PARENT_CID: u32 = 0xFFFF_FFFF;

/// The kind of an extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentKind {
    /// A hosted sparse extent (`KDMV` header) in `file`.
    Sparse { file: String },
    /// Raw bytes in `file` from sector `offset` (FLAT, and VMFS on ESXi).
    Flat { file: String, offset: u64 },
    /// Reads as zeros, no file.
    Zero,
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Sectors of the virtual disk it covers.
    pub sectors: u64,
    /// What holds them.
    pub kind: ExtentKind,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `CID`: changes whenever the disk is written.
    pub cid: u32,
    /// `parentCID`: the parent's `CID`, or [`NO_PARENT_CID`].
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: String,
    /// `parentFileNameHint`, if any.
    pub parent_hint: Option<String>,
    /// The extents, in disk order.
    pub extents: Vec<ExtentLine>,
}

/// `createType` values imgsafe reads.
pub const READABLE_TYPES: [&str; 7] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsThin",
];

/// Why a descriptor is refused: `Corrupt` for malformed text, `Unsupported` for valid
/// features imgsafe does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Malformed.
    Corrupt(String),
    /// A createType or extent type imgsafe does not read.
    Unsupported(String),
}

/// True if `text` starts like a descriptor (the `# Disk DescriptorFile` banner).
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"# Disk DescriptorFile")
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

fn hex_cid(key: &str, v: &str) -> Result<u32, Problem> {
    u32::from_str_radix(unquote(v), 16)
        .map_err(|_| Problem::Corrupt(format!("descriptor {key}={v} is not a hex number")))
}

/// Parse a descriptor's text (NUL padding and all).
pub fn parse(raw: &[u8]) -> Result<Descriptor, Problem> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let text = std::str::from_utf8(&raw[..end])
        .map_err(|_| Problem::Corrupt("descriptor is not UTF-8 text".into()))?;
    let (mut cid, mut parent_cid, mut create_type, mut parent_hint) = (None, None, None, None);
    let mut extents = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            if extents.len() >= MAX_EXTENTS {
                return Err(Problem::Unsupported(format!(
                    "descriptor with more than {MAX_EXTENTS} extents"
                )));
            }
            extents.push(parse_extent(line)?);
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k.trim() {
            "CID" => cid = Some(hex_cid("CID", v)?),
            "parentCID" => parent_cid = Some(hex_cid("parentCID", v)?),
            "createType" => create_type = Some(unquote(v).to_string()),
            "parentFileNameHint" => parent_hint = Some(unquote(v).to_string()),
            _ => {}
        }
    }
    let create_type =
        create_type.ok_or_else(|| Problem::Corrupt("descriptor has no createType".into()))?;
    if !READABLE_TYPES.contains(&create_type.as_str()) {
        return Err(Problem::Unsupported(format!(
            "VMDK createType \"{create_type}\" (imgsafe reads {})",
            READABLE_TYPES.join(", ")
        )));
    }
    if extents.is_empty() {
        return Err(Problem::Corrupt("descriptor has no extent lines".into()));
    }
    Ok(Descriptor {
        cid: cid.unwrap_or(0),
        parent_cid: parent_cid.unwrap_or(NO_PARENT_CID),
        create_type,
        parent_hint,
        extents,
    })
}

/// `RW 9766 SPARSE "disk.vmdk"`, `RW 9766 FLAT "disk-flat.vmdk" 0`, `RW 9766 ZERO`.
fn parse_extent(line: &str) -> Result<ExtentLine, Problem> {
    let bad = || Problem::Corrupt(format!("malformed extent line: {line}"));
    let mut words = line.splitn(3, char::is_whitespace);
    let _access = words.next().ok_or_else(bad)?;
    let sectors: u64 = words.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let rest = words.next().unwrap_or("").trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let rest = rest.trim();
    let (file, tail) = if let Some(r) = rest.strip_prefix('"') {
        let close = r.find('"').ok_or_else(bad)?;
        (Some(r[..close].to_string()), r[close + 1..].trim())
    } else {
        (None, rest)
    };
    let kind = match (kind, file) {
        ("ZERO", _) => ExtentKind::Zero,
        ("SPARSE", Some(file)) => ExtentKind::Sparse { file },
        ("FLAT" | "VMFS", Some(file)) => {
            let offset = if tail.is_empty() {
                0
            } else {
                tail.parse().map_err(|_| bad())?
            };
            ExtentKind::Flat { file, offset }
        }
        ("SPARSE" | "FLAT" | "VMFS", None) => return Err(bad()),
        (other, _) => {
            return Err(Problem::Unsupported(format!(
                "VMDK extent type {other} (imgsafe reads SPARSE, FLAT, VMFS and ZERO)"
            )))
        }
    };
    if sectors == 0 {
        return Err(Problem::Corrupt(format!("extent of 0 sectors: {line}")));
    }
    Ok(ExtentLine { sectors, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=80b99924\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 9766 FLAT \"my disk-flat.vmdk\" 0\nRDONLY 10 ZERO\n\n#DDB\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_keys_and_extents_as_qemu_writes_them() {
        let mut raw = QEMU_FLAT.as_bytes().to_vec();
        raw.resize(1024, 0);

        let d = parse(&raw).unwrap();

        assert_eq!((d.cid, d.parent_cid), (0x80b9_9924, NO_PARENT_CID));
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(
            d.extents,
            [
                ExtentLine {
                    sectors: 9766,
                    kind: ExtentKind::Flat {
                        file: "my disk-flat.vmdk".into(),
                        offset: 0
                    }
                },
                ExtentLine {
                    sectors: 10,
                    kind: ExtentKind::Zero
                }
            ]
        );
    }

    #[test]
    fn refuses_unknown_types_and_malformed_lines() {
        let cowd = QEMU_FLAT.replace("monolithicFlat", "vmfsSparse");
        let seq = QEMU_FLAT.replace("FLAT \"my", "SESPARSE \"my");
        let bad_sectors = QEMU_FLAT.replace("9766", "lots");

        assert!(
            matches!(parse(cowd.as_bytes()), Err(Problem::Unsupported(m)) if m.contains("vmfsSparse"))
        );
        assert!(
            matches!(parse(seq.as_bytes()), Err(Problem::Unsupported(m)) if m.contains("SESPARSE"))
        );
        assert!(
            matches!(parse(bad_sectors.as_bytes()), Err(Problem::Corrupt(m)) if m.contains("malformed extent line"))
        );
    }
}
