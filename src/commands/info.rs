//! `imgsafe info`: container format, sizes and the chain of files, without starting a VM.

use crate::cli::InfoArgs;
use crate::format::{count_allocated, BlockSource, LayerInfo, SnapshotInfo, MAX_COUNTED_EXTENTS};
use crate::terminal::human_size_exact;
use crate::Result;
use std::path::Path;

/// What `info` reports, gathered from a decoded image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Format of the top file (`raw`, `ploop`, `vhd`, ...).
    pub format: String,
    /// Its version or subformat.
    pub version: Option<String>,
    /// The descriptor the chain was read through, if any.
    pub descriptor: Option<String>,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster or block size of the top file.
    pub cluster_size: Option<u64>,
    /// Bytes of the virtual disk some file of the image stores data for; `None` when the
    /// disk has more than [`MAX_COUNTED_EXTENTS`] extents and was not counted.
    pub allocated_bytes: Option<u64>,
    /// Every file, top first.
    pub chain: Vec<LayerInfo>,
    /// Internal snapshots of the top file (qcow2).
    pub snapshots: Vec<SnapshotInfo>,
}

impl Info {
    /// Gather the report; `descriptor` is the resolved path when it is a DiskDescriptor.xml.
    pub fn gather(src: &dyn BlockSource, descriptor: Option<&Path>) -> std::io::Result<Info> {
        let mut chain = src.layers();
        let allocated_bytes = count_allocated(src, MAX_COUNTED_EXTENTS)?;
        // A lone file that cannot count its own data (raw) stores everything allocated.
        if let ([only], Some(n)) = (chain.as_mut_slice(), allocated_bytes) {
            only.allocated_bytes.get_or_insert(n);
        }
        let top = chain.first();
        Ok(Info {
            format: top.map_or_else(|| "unknown".into(), |l| l.format.clone()),
            version: top.and_then(|l| l.version.clone()),
            descriptor: descriptor.map(|p| p.display().to_string()),
            virtual_size: src.size(),
            cluster_size: top.and_then(|l| l.cluster_size),
            allocated_bytes,
            chain,
            snapshots: src.snapshots(),
        })
    }

    /// The `--json` document, keys in a stable, readable order. Paths are written lossily so
    /// non-UTF-8 names still print.
    pub fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Layer<'a> {
            path: String,
            format: &'a str,
            version: &'a Option<String>,
            role: &'a str,
            cluster_size: Option<u64>,
            allocated_bytes: Option<u64>,
        }
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            format: &'a str,
            version: &'a Option<String>,
            descriptor: &'a Option<String>,
            virtual_size: u64,
            cluster_size: Option<u64>,
            allocated_bytes: Option<u64>,
            chain: Vec<Layer<'a>>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            snapshots: &'a [SnapshotInfo],
        }
        let chain = self
            .chain
            .iter()
            .map(|l| Layer {
                path: l.path.to_string_lossy().into_owned(),
                format: &l.format,
                version: &l.version,
                role: &l.role,
                cluster_size: l.cluster_size,
                allocated_bytes: l.allocated_bytes,
            })
            .collect();
        let doc = Doc {
            format: &self.format,
            version: &self.version,
            descriptor: &self.descriptor,
            virtual_size: self.virtual_size,
            cluster_size: self.cluster_size,
            allocated_bytes: self.allocated_bytes,
            chain,
            snapshots: &self.snapshots,
        };
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_string(&doc).unwrap_or_default()
    }

    /// Human-readable report: aligned `key: value` lines, then one line per chain file.
    pub fn to_text(&self) -> String {
        let mut lines: Vec<(String, String)> = Vec::new();
        let format = match &self.version {
            Some(v) => format!("{} ({v})", self.format),
            None => self.format.clone(),
        };
        lines.push(("format".into(), format));
        if let Some(d) = &self.descriptor {
            lines.push(("descriptor".into(), d.clone()));
        }
        lines.push(("virtual size".into(), bytes(self.virtual_size)));
        if let Some(cs) = self.cluster_size {
            lines.push(("cluster size".into(), bytes(cs)));
        }
        let allocated = match self.allocated_bytes {
            Some(n) => bytes(n),
            None => format!("not counted (more than {MAX_COUNTED_EXTENTS} extents)"),
        };
        lines.push(("allocated".into(), allocated));
        let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        let mut out: String = lines
            .iter()
            .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
            .collect();
        out.push_str("chain:\n");
        let rows: Vec<[String; 5]> = self
            .chain
            .iter()
            .map(|l| {
                [
                    l.role.clone(),
                    format!(
                        "{}{}",
                        l.format,
                        l.version
                            .as_deref()
                            .map(|v| format!(" {v}"))
                            .unwrap_or_default()
                    ),
                    l.cluster_size.map_or_else(
                        || "-".into(),
                        |c| format!("cluster {}", human_size_exact(c)),
                    ),
                    l.allocated_bytes.map_or_else(
                        || "-".into(),
                        |a| format!("allocated {}", human_size_exact(a)),
                    ),
                    // Parent names come from the image (locators, descriptors).
                    crate::terminal::printable(l.path.as_os_str().as_encoded_bytes()),
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..4)
            .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            out.push_str(&format!(
                "  {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}\n",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3]
            ));
        }
        if !self.snapshots.is_empty() {
            out.push_str("snapshots:\n");
            for sn in &self.snapshots {
                let date =
                    i64::try_from(sn.date).map_or_else(|_| "-".into(), super::ls::format_time);
                out.push_str(&format!(
                    "  {}  {:?}  {}  {date}\n",
                    sn.id,
                    sn.name,
                    human_size_exact(sn.disk_size)
                ));
            }
        }
        out
    }
}

/// `N bytes (1.5 MiB)`.
fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} bytes")
    } else {
        format!("{n} bytes ({})", human_size_exact(n))
    }
}

/// Run `imgsafe info`.
pub fn run(args: InfoArgs) -> Result<()> {
    let path = crate::image::resolve(&args.image, &args.image_args.vz_root)?;
    let src = crate::image::open(&path, &args.image_args.spec())?;
    let format = match args.image_args.format {
        Some(f) => f,
        None => crate::format::detect(&path, &crate::format::open_image_file(&path)?)?,
    };
    let is_descriptor = format == crate::format::Format::Descriptor;
    let info = Info::gather(&*src, is_descriptor.then_some(path.as_path()))
        .map_err(|e| crate::format::FormatError::io(&path, e))?;
    let text = if args.json {
        format!("{}\n", info.to_json())
    } else {
        info.to_text()
    };
    crate::error::print_output(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sample() -> Info {
        Info {
            format: "ploop".into(),
            version: Some("v2".into()),
            descriptor: None,
            virtual_size: 1 << 30,
            cluster_size: Some(1 << 20),
            allocated_bytes: Some(3 << 20),
            chain: vec![LayerInfo {
                path: PathBuf::from("/x/root.hds"),
                format: "ploop".into(),
                version: Some("v2".into()),
                role: "image".into(),
                cluster_size: Some(1 << 20),
                allocated_bytes: Some(3 << 20),
            }],
            snapshots: Vec::new(),
        }
    }

    #[test]
    fn text_lines_are_aligned() {
        let text = sample().to_text();

        assert!(text.contains("format:       ploop (v2)\n"), "{text}");
        assert!(
            text.contains("virtual size: 1073741824 bytes (1 GiB)\n"),
            "{text}"
        );
        assert!(
            text.contains("  image  ploop v2  cluster 1 MiB  allocated 3 MiB  /x/root.hds\n"),
            "{text}"
        );
    }

    #[test]
    fn parent_names_from_the_image_are_shown_printable() {
        let mut info = sample();
        info.chain[0].path = std::path::PathBuf::from("/x/\u{1b}]0;t\u{7}\u{9b}2J.hds");

        let text = info.to_text();

        assert!(text.contains("/x/?]0;t??2J.hds\n"), "{text:?}");
    }

    #[test]
    fn json_has_chain() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();

        assert_eq!(v["format"], "ploop");
        assert_eq!(v["virtual_size"], 1u64 << 30);
        assert_eq!(v["chain"][0]["path"], "/x/root.hds");
        assert_eq!(v["chain"][0]["role"], "image");
    }

    #[test]
    fn uncounted_allocation_is_null_in_json_and_said_in_text() {
        let info = Info {
            allocated_bytes: None,
            ..sample()
        };

        let v: serde_json::Value = serde_json::from_str(&info.to_json()).unwrap();
        let text = info.to_text();

        assert!(v["allocated_bytes"].is_null());
        assert!(
            text.contains("allocated:    not counted (more than 16777216 extents)\n"),
            "{text}"
        );
    }

    #[test]
    fn lone_raw_file_layer_gets_the_counted_bytes() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(f.as_file(), &[1u8; 65536], 1 << 20).unwrap();
        let src = crate::format::raw::Raw::new(f.path(), f.reopen().unwrap()).unwrap();

        let info = Info::gather(&src, None).unwrap();

        assert_eq!(info.allocated_bytes, Some(65536));
        assert_eq!(info.chain[0].allocated_bytes, Some(65536));
    }

    #[test]
    fn snapshots_are_listed_in_text_and_json() {
        let mut info = sample();
        info.snapshots = vec![SnapshotInfo {
            id: "1".into(),
            name: "before upgrade".into(),
            disk_size: 1 << 30,
            date: 1_700_000_000,
            vm_state_size: 0,
        }];

        let text = info.to_text();
        let json: serde_json::Value = serde_json::from_str(&info.to_json()).unwrap();

        assert!(
            text.ends_with("snapshots:\n  1  \"before upgrade\"  1 GiB  2023-11-14 22:13:20\n"),
            "{text}"
        );
        assert_eq!(json["snapshots"][0]["name"], "before upgrade");
        assert!(
            serde_json::from_str::<serde_json::Value>(&sample().to_json()).unwrap()["snapshots"]
                .is_null()
        );
    }
}
