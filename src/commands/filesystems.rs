//! `imgsafe filesystems`: partitions, volumes and filesystems the appliance finds.

use crate::cli::FilesystemsArgs;
use crate::session::{self, Session};
use crate::Result;
use imgsafe_proto::{FsInfo, Subvolume};
use std::collections::BTreeMap;

/// Each btrfs device's subvolumes: (default id, list).
type Subvolumes = BTreeMap<String, (u64, Vec<Subvolume>)>;

/// The subvolumes of each btrfs in `list`; one the kernel will not mount shows none.
fn subvolumes_of(s: &mut Session, list: &[FsInfo]) -> Result<Subvolumes> {
    let mut out = Subvolumes::new();
    for f in list.iter().filter(|f| f.fstype.as_deref() == Some("btrfs")) {
        match s.subvolumes(&f.device) {
            Ok(found) => {
                out.insert(f.device.clone(), found);
            }
            Err(crate::Error::Filesystem { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Run `imgsafe filesystems`.
pub fn run(args: FilesystemsArgs) -> Result<()> {
    let (detected, list, subvolumes) = Session::run_started(
        &args.image,
        &args.image_args.spec(),
        &args.guest.guest(),
        |s| {
            let list = s.filesystems()?;
            let subvolumes = subvolumes_of(s, &list)?;
            Ok((s.detect_root()?, list, subvolumes))
        },
    )?;
    // What ls/cat mount at / without -m: the detected root, else the one choose() picks.
    let (found, os) = match detected {
        Some((f, os)) => (Some(f.device), os),
        None => (None, false),
    };
    let detected = found.clone().filter(|_| os);
    let root = found.or_else(|| session::choose(&list).ok().map(|f| f.device.clone()));
    let out = if args.json {
        json(&list, root.as_deref(), detected.as_deref(), &subvolumes)
    } else {
        table(&list, root.as_deref(), detected.is_some()) + &subvolume_table(&subvolumes)
    };
    crate::error::print_output(out.as_bytes())
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
                crate::terminal::human_size(f.size),
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

/// The subvolumes of each btrfs, for `-m DEV@PATH`; empty when there are none.
fn subvolume_table(subvolumes: &Subvolumes) -> String {
    let mut out = String::new();
    for (device, (default, list)) in subvolumes.iter().filter(|(_, (_, l))| !l.is_empty()) {
        out.push_str(&format!(
            "\nbtrfs subvolumes of {} (mount one with -m DEV@PATH):\n",
            clean(device)
        ));
        for sv in list {
            let mark = if sv.id == *default { "  (default)" } else { "" };
            out.push_str(&format!("  {:>6}  {}{mark}\n", sv.id, clean(&sv.path)));
        }
    }
    out
}

fn json(
    list: &[FsInfo],
    root: Option<&str>,
    detected: Option<&str>,
    subvolumes: &Subvolumes,
) -> String {
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
                "default_subvolume": subvolumes.get(&f.device).map(|(d, _)| d),
                "subvolumes": subvolumes.get(&f.device).map(|(_, l)| {
                    l.iter()
                        .map(|s| serde_json::json!({ "id": s.id, "path": s.path }))
                        .collect::<Vec<_>>()
                }),
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
    fn subvolumes_are_listed_per_device_with_the_default_marked() {
        let sv = |id, p: &str| Subvolume { id, path: p.into() };
        let mut all = Subvolumes::new();
        all.insert(
            "/dev/vda2".into(),
            (257, vec![sv(256, "@"), sv(257, "@\x1bhome")]),
        );
        all.insert("/dev/vdb".into(), (5, vec![]));

        let text = subvolume_table(&all);

        assert_eq!(
            text,
            "\nbtrfs subvolumes of /dev/vda2 (mount one with -m DEV@PATH):\n     256  @\n     257  @?home  (default)\n"
        );
    }

    #[test]
    fn control_characters_from_the_guest_are_neutralised() {
        assert_eq!(clean("lab\x1b[2Jel\n"), "lab?[2Jel?");
    }
}
