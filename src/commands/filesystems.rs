//! `imgsafe filesystems`: partitions, volumes and filesystems the appliance finds.

use crate::cli::FilesystemsArgs;
use crate::session::{self, Session};
use crate::{Error, Result};
use imgsafe_proto::FsInfo;
use std::io::Write;

/// Run `imgsafe filesystems`.
pub fn run(args: FilesystemsArgs) -> Result<()> {
    let mut s = Session::start(&args.image, &args.image_args, &args.guest)?;
    let found = s.filesystems().and_then(|l| Ok((s.detect_root()?, l)));
    let (detected, list) = match found {
        Ok(r) => r,
        Err(e) => {
            let e = s.annotate(e);
            s.abort();
            return Err(e);
        }
    };
    s.finish()?;
    // What ls/cat mount at / without -m: the detected root, else the one choose() picks.
    let (found, os) = match detected {
        Some((f, os)) => (Some(f.device), os),
        None => (None, false),
    };
    let detected = found.clone().filter(|_| os);
    let root = found.or_else(|| session::choose(&list, None).ok().map(|f| f.device.clone()));
    let out = if args.json {
        json(&list, root.as_deref(), detected.as_deref())
    } else {
        table(&list, root.as_deref(), detected.is_some())
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| Error::Other(format!("writing output: {e}")))
}

/// Human-readable size with binary units.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Guest-supplied text made safe before it reaches a terminal.
fn clean(s: &str) -> String {
    crate::terminal::printable(s)
}

fn table(list: &[FsInfo], root: Option<&str>, detected: bool) -> String {
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|f| {
            let mut kind = f.fstype.clone().unwrap_or_else(|| {
                if f.partitioned {
                    "(partition table)".into()
                } else {
                    "-".into()
                }
            });
            if root == Some(f.device.as_str()) {
                kind.push_str(" *");
            }
            [
                clean(&f.device),
                clean(&kind),
                human_size(f.size),
                clean(f.label.as_deref().unwrap_or("-")),
                clean(f.uuid.as_deref().unwrap_or("-")),
                clean(f.partuuid.as_deref().unwrap_or("-")),
            ]
        })
        .collect();
    let head = ["DEVICE", "TYPE", "SIZE", "LABEL", "UUID", "PARTUUID"];
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(head.map(String::from)).chain(rows) {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if detected {
        out.push_str("* the guest's root filesystem (mounted at / by default, with what its /etc/fstab lists)\n");
    } else if root.is_some() {
        out.push_str("* mounted by default\n");
    }
    out
}

fn json(list: &[FsInfo], root: Option<&str>, detected: Option<&str>) -> String {
    let v: Vec<serde_json::Value> = list
        .iter()
        .map(|f| {
            serde_json::json!({
                "device": f.device,
                "type": f.fstype,
                "size": f.size,
                "label": f.label,
                "uuid": f.uuid,
                "partition": f.partition,
                "partuuid": f.partuuid,
                "partitioned": f.partitioned,
                "default": root == Some(f.device.as_str()),
                "root": detected == Some(f.device.as_str()),
            })
        })
        .collect();
    let mut s =
        serde_json::to_string_pretty(&serde_json::json!({ "filesystems": v })).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(64 << 20), "64.0 MiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }

    #[test]
    fn control_characters_from_the_guest_are_neutralised() {
        assert_eq!(clean("lab\x1b[2Jel\n"), "lab?[2Jel?");
    }
}
