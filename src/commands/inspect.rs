//! `imgsafe inspect IMAGE [--json]`: what operating system the image holds, read from
//! the guest as its own OS would assemble it (see [`crate::guest_os`]).

use crate::cli::InspectArgs;
use crate::guest_os::{self, Report};
use crate::session::Session;
use crate::terminal::printable;
use crate::{vm, Error, Result};

/// Run `imgsafe inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
    let report = Session::run_started(
        &args.image,
        &args.image_args.spec(),
        &args.guest.guest(),
        |s| gather(s, &args),
    )?;
    for w in &report.warnings {
        eprintln!("imgsafe: warning: {}: {w}", args.image.display());
    }
    print(&report, args.json)
}

/// Mount the guest's tree and inspect it. A disk with no filesystem to mount (or none
/// that can be chosen) is a disk with no OS, not an error, unless `-m` named one.
fn gather(s: &mut Session, args: &InspectArgs) -> Result<Report> {
    let list = s.filesystems()?;
    let mut early = None;
    match s.mount_chosen(&args.mount.choice()) {
        Ok(()) => {}
        Err(Error::Filesystem { what, .. })
            if args.mount.mount.is_empty() && !vm::reaper::interrupted() =>
        {
            early = Some(what);
        }
        Err(e) => return Err(e),
    }
    let mounts = s.mounts().to_vec();
    let ntfs: Vec<String> = list
        .iter()
        .filter(|f| matches!(f.fstype.as_deref(), Some("ntfs" | "ntfs3")))
        .filter(|f| !mounts.iter().any(|(d, _)| *d == f.device))
        .map(|f| f.device.clone())
        .collect();
    let mut report = guest_os::inspect(s.fs(), &mounts, &ntfs)?;
    if let Some(what) = early {
        report
            .warnings
            .insert(0, format!("{}; nothing is mounted", printable(&what)));
    }
    Ok(report)
}

fn print(r: &Report, json: bool) -> Result<()> {
    let text = if json {
        let mut t = serde_json::to_string_pretty(r).map_err(|e| Error::Output(e.into()))?;
        t.push('\n');
        t
    } else {
        summary(r)
    };
    crate::error::print_output(text.as_bytes())
}

/// A short human summary; guest text shown with control characters as `?`.
pub fn summary(r: &Report) -> String {
    let opt = |v: &Option<String>| v.as_deref().map_or("-".to_string(), printable);
    let mut lines = vec![("os", r.os.to_string())];
    let distro = match (&r.distro, &r.version) {
        (Some(d), Some(v)) => format!("{} {}", printable(d), printable(v)),
        (d, _) => opt(d),
    };
    lines.push(("distro", distro));
    lines.push(("product", opt(&r.product_name)));
    lines.push(("hostname", opt(&r.hostname)));
    lines.push(("arch", r.arch.unwrap_or("-").to_string()));
    lines.push(("root", opt(&r.root)));
    let mounts: Vec<String> = r
        .mountpoints
        .iter()
        .map(|(d, m)| format!("{d} on {}", printable(m)))
        .collect();
    lines.push((
        "mounts",
        if mounts.is_empty() {
            "-".into()
        } else {
            mounts.join(", ")
        },
    ));
    let packages = match (r.package_format, &r.packages) {
        (Some(f), Some(p)) => format!("{f}, {} installed", p.len()),
        (Some(f), None) => format!("{f}, list not read"),
        (None, _) => "-".into(),
    };
    lines.push(("packages", packages));
    let kernels: Vec<String> = r.kernels.iter().map(|k| printable(&k.release)).collect();
    lines.push((
        "kernels",
        if kernels.is_empty() {
            "-".into()
        } else {
            kernels.join(", ")
        },
    ));
    lines
        .into_iter()
        .map(|(k, v)| format!("{:<10}{v}\n", format!("{k}:")))
        .collect()
}
