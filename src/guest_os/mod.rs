//! What operating system an image holds, as `virt-inspector` answers it: read from the
//! assembled guest tree through the agent (every path resolved inside the guest's root,
//! symlinks re-rooted there), with every file size-bounded and every parse failure a
//! `null` field plus a warning, never an error.
//!
//! The parsers are pure functions over bytes ([`release`], [`packages`], [`elf`]), each
//! unit-tested and fuzzed; this file only decides which files to read.

pub mod elf;
pub mod packages;
pub mod release;

use crate::agent_client::GuestFs;
use crate::Error;
use imgsafe_proto::FileType;
use packages::Package;
use serde::Serialize;
use std::io::Write;

/// A parse failure: the line (1-based, 0 for the file as a whole) and what was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ParseError {
    /// 1-based line, 0 when it is about the whole file.
    pub line: usize,
    /// What was wrong.
    pub what: &'static str,
}

impl ParseError {
    /// A parse failure at `line`.
    pub const fn new(line: usize, what: &'static str) -> Self {
        ParseError { line, what }
    }
}

/// Largest small text file read (os-release, release files, hostname).
pub const MAX_SMALL_FILE: u64 = 64 << 10;
/// Largest package database read (dpkg status of a big desktop is ~10 MiB).
pub const MAX_PACKAGE_DB: u64 = 64 << 20;
/// Largest pacman `desc` file read.
const MAX_PACMAN_DESC: u64 = 1 << 20;
/// Most directory entries of /boot, /lib/modules or pacman's `local` looked at.
const MAX_LISTED: usize = 100_000;
/// Largest program whose ELF header is read (the whole file streams through the guest).
const MAX_PROGRAM: u64 = 64 << 20;

/// The answer of `imgsafe inspect`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// `linux`, `windows` or `unknown`.
    pub os: &'static str,
    /// Distribution id (os-release `ID`, or from an older release file).
    pub distro: Option<String>,
    /// Distribution version (`VERSION_ID`).
    pub version: Option<String>,
    /// `PRETTY_NAME`, or `NAME`, or the release file's line.
    pub product_name: Option<String>,
    /// The configured host name.
    pub hostname: Option<String>,
    /// Architecture of the root's `/bin/sh` (or `/usr/bin/env`).
    pub arch: Option<&'static str>,
    /// Device of the root filesystem.
    pub root: Option<String>,
    /// Each mounted device and where it is mounted.
    pub mountpoints: std::collections::BTreeMap<String, String>,
    /// `deb`, `rpm`, `apk` or `pacman`.
    pub package_format: Option<&'static str>,
    /// Installed packages, when the database is one imgsafe reads.
    pub packages: Option<Vec<Package>>,
    /// Kernels installed in /boot and /lib/modules.
    pub kernels: Vec<Kernel>,
    /// What could not be read or parsed (also printed on stderr).
    pub warnings: Vec<String>,
}

/// One installed kernel, by release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Kernel {
    /// The release (`6.1.0-57-amd64`), from the file or directory name.
    pub release: String,
    /// Its image in /boot, if there is one.
    pub image: Option<String>,
    /// Its modules directory, if there is one.
    pub modules: Option<String>,
}

/// A file's bytes, at most `limit`.
enum Read {
    Absent,
    Bytes(Vec<u8>),
    /// Present but not read; the reason (too large, not a file, an I/O error).
    Unreadable(String),
}

/// Keeps at most `limit` bytes; a longer file fails the write (the client drains the
/// rest of the stream) and is reported as too large.
struct Bounded {
    data: Vec<u8>,
    limit: u64,
    over: bool,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.data.len() as u64).saturating_add(buf.len() as u64) > self.limit {
            self.over = true;
            return Err(std::io::Error::other("larger than the limit"));
        }
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Gathers the report from a mounted guest tree.
struct Inspector<'a> {
    fs: &'a mut dyn GuestFs,
    warnings: Vec<String>,
}

impl Inspector<'_> {
    /// Read `path` (symlinks followed inside the guest root), at most `limit` bytes.
    /// Errors that mean the guest or the VM failed end the inspection; everything
    /// else about one file is that file's problem.
    fn read(&mut self, path: &str, limit: u64) -> crate::Result<Read> {
        match self.fs.stat(path.as_bytes()) {
            Err(Error::NotFound { .. }) => return Ok(Read::Absent),
            Err(e) => return Err(e),
            Ok(st) if st.kind == FileType::Regular && st.size > limit => {
                return Ok(Read::Unreadable(format!(
                    "{} bytes, more than the {limit} imgsafe reads",
                    st.size
                )))
            }
            Ok(st) if !matches!(st.kind, FileType::Regular | FileType::Symlink) => {
                return Ok(Read::Unreadable("not a regular file".into()))
            }
            Ok(_) => {}
        }
        let mut out = Bounded {
            data: Vec::new(),
            limit,
            over: false,
        };
        match self.fs.read_file(path.as_bytes(), &mut out) {
            Ok(_) => Ok(Read::Bytes(out.data)),
            Err(_) if out.over => Ok(Read::Unreadable(format!(
                "more than the {limit} bytes imgsafe reads"
            ))),
            // A symlink to nowhere, or to a directory.
            Err(Error::NotFound { what, .. }) => Ok(Read::Unreadable(what)),
            Err(e) if e.is_appliance_failure() => Err(e),
            Err(Error::Interrupted) => Err(Error::Interrupted),
            Err(e) => Ok(Read::Unreadable(e.to_string())),
        }
    }

    /// [`Inspector::read`], with an unreadable file turned into a warning.
    fn bytes(&mut self, path: &str, limit: u64) -> crate::Result<Option<Vec<u8>>> {
        Ok(match self.read(path, limit)? {
            Read::Absent => None,
            Read::Bytes(b) => Some(b),
            Read::Unreadable(why) => {
                self.warn(format!("{path}: {why}; not read"));
                None
            }
        })
    }

    /// Parse `path` with `parse`; absent gives None, a failure None and a warning.
    fn parsed<T>(
        &mut self,
        path: &str,
        limit: u64,
        parse: impl FnOnce(&[u8]) -> Result<T, ParseError>,
    ) -> crate::Result<Option<T>> {
        let Some(b) = self.bytes(path, limit)? else {
            return Ok(None);
        };
        Ok(match parse(&b) {
            Ok(v) => Some(v),
            Err(e) => {
                self.warn(format!("{path}: {e}; ignored"));
                None
            }
        })
    }

    fn warn(&mut self, w: String) {
        self.warnings.push(crate::terminal::printable_max(w, 500));
    }

    fn exists(&mut self, path: &str) -> crate::Result<Option<FileType>> {
        match self.fs.stat(path.as_bytes()) {
            Ok(st) => Ok(Some(st.kind)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Names in a directory (following it if a symlink), None when absent.
    fn list(&mut self, path: &str) -> crate::Result<Option<Vec<(String, FileType)>>> {
        match self.fs.read_dir(path.as_bytes()) {
            Ok(entries) => {
                if entries.len() > MAX_LISTED {
                    self.warn(format!("{path}: more than {MAX_LISTED} entries; not read"));
                    return Ok(None);
                }
                let mut names: Vec<(String, FileType)> = entries
                    .into_iter()
                    .filter_map(|e| Some((String::from_utf8(e.name).ok()?, e.kind)))
                    .collect();
                names.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(Some(names))
            }
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) if e.is_appliance_failure() => Err(e),
            Err(Error::Interrupted) => Err(Error::Interrupted),
            Err(e) => {
                self.warn(format!("{path}: {e}; not read"));
                Ok(None)
            }
        }
    }
}

/// Inspect the tree mounted in the guest. `mounts` are (device, mountpoint) as mounted;
/// `unmounted_ntfs` names NTFS filesystems on the disk that could not be looked into.
pub fn inspect(
    fs: &mut dyn GuestFs,
    mounts: &[(String, String)],
    unmounted_ntfs: &[String],
) -> crate::Result<Report> {
    let mut i = Inspector {
        fs,
        warnings: Vec::new(),
    };
    let mut r = Report {
        os: "unknown",
        root: mounts
            .iter()
            .find(|(_, mp)| mp == "/")
            .map(|(d, _)| d.clone()),
        mountpoints: mounts.iter().cloned().collect(),
        ..Report::default()
    };
    if r.root.is_some() {
        linux(&mut i, &mut r)?;
        if r.os == "unknown" && windows(&mut i)? {
            r.os = "windows";
        }
    }
    if r.os == "unknown" {
        for dev in unmounted_ntfs {
            i.warn(format!(
                "{dev}: an NTFS filesystem imgsafe cannot mount yet; whether it holds Windows is not known"
            ));
        }
    }
    r.warnings = i.warnings;
    Ok(r)
}

/// A Windows system volume: `Windows/System32` at its root (any case NTFS keeps).
fn windows(i: &mut Inspector) -> crate::Result<bool> {
    for p in [
        "/Windows/System32",
        "/WINDOWS/system32",
        "/windows/system32",
    ] {
        if i.exists(p)? == Some(FileType::Directory) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Fill in what a Linux root says about itself; `os` becomes `linux` when it has an
/// os-release or a release file, or an `/etc` with an ELF `/bin/sh` or a package
/// database.
fn linux(i: &mut Inspector, r: &mut Report) -> crate::Result<()> {
    let mut os_release = None;
    for p in ["/etc/os-release", "/usr/lib/os-release"] {
        if i.exists(p)?.is_some() {
            os_release = i.parsed(p, MAX_SMALL_FILE, release::parse_os_release)?;
            break;
        }
    }
    let mut found = os_release.is_some();
    if let Some(o) = os_release {
        r.distro = o.id;
        r.version = o.version_id;
        r.product_name = o.pretty_name.or(o.name);
    }
    for (path, kind) in release::RELEASE_FILES {
        if r.distro.is_some() && r.version.is_some() {
            break;
        }
        let Some(f) = i.parsed(path, MAX_SMALL_FILE, |b| {
            release::parse_release_file(*kind, b)
        })?
        else {
            continue;
        };
        found = true;
        // os-release wins; a release file fills in what it lacks (Debian's
        // VERSION_ID is missing on testing/sid, debian_version has it).
        if r.distro.as_deref().is_none_or(|d| d == f.id) {
            r.distro.get_or_insert(f.id);
            if r.version.is_none() {
                r.version = f.version;
            }
            if r.product_name.is_none() {
                r.product_name = f.product_name;
            }
        }
    }
    r.hostname = hostname(i)?;
    for p in ["/bin/sh", "/usr/bin/env"] {
        if let Some(b) = i.bytes(p, MAX_PROGRAM)? {
            r.arch = elf::arch(&b);
            if r.arch.is_none() {
                i.warn(format!("{p}: not an ELF program imgsafe knows"));
            }
            break;
        }
    }
    packages(i, r)?;
    r.kernels = kernels(i)?;
    let etc = i.exists("/etc")? == Some(FileType::Directory);
    if found || (etc && (r.arch.is_some() || r.package_format.is_some())) {
        r.os = "linux";
    }
    Ok(())
}

/// `/etc/hostname`, else the distributions' older places.
fn hostname(i: &mut Inspector) -> crate::Result<Option<String>> {
    type Pick = fn(&str) -> Option<&str>;
    let first_line: Pick = |t| {
        t.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
    };
    let key_line: Pick = |t| {
        t.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("HOSTNAME=")
                    .or_else(|| l.trim().strip_prefix("hostname="))
            })
            .map(|v| v.trim_matches(['"', '\'']))
    };
    let places: [(&str, Pick); 4] = [
        ("/etc/hostname", first_line),
        ("/etc/HOSTNAME", first_line),
        ("/etc/sysconfig/network", key_line),
        ("/etc/conf.d/hostname", key_line),
    ];
    for (path, pick) in places {
        let Some(b) = i.bytes(path, MAX_SMALL_FILE)? else {
            continue;
        };
        let name = std::str::from_utf8(&b)
            .ok()
            .and_then(pick)
            .filter(|n| valid_hostname(n));
        match name {
            Some(n) => return Ok(Some(n.to_string())),
            None => i.warn(format!("{path}: no valid host name in it; ignored")),
        }
    }
    Ok(None)
}

/// A host name as RFC 1123 allows (letters, digits, `-`, dots; `_` tolerated), at most
/// 253 bytes.
fn valid_hostname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

/// The package format and, for the text databases, the installed packages.
fn packages(i: &mut Inspector, r: &mut Report) -> crate::Result<()> {
    if i.exists("/var/lib/dpkg/status")?.is_some() {
        r.package_format = Some("deb");
        r.packages = i.parsed(
            "/var/lib/dpkg/status",
            MAX_PACKAGE_DB,
            packages::parse_dpkg_status,
        )?;
    } else if i.exists("/lib/apk/db/installed")?.is_some() {
        r.package_format = Some("apk");
        r.packages = i.parsed(
            "/lib/apk/db/installed",
            MAX_PACKAGE_DB,
            packages::parse_apk_installed,
        )?;
    } else if i.exists("/var/lib/pacman/local")? == Some(FileType::Directory) {
        r.package_format = Some("pacman");
        r.packages = pacman(i)?;
    } else if i.exists("/var/lib/rpm")?.is_some() || i.exists("/usr/lib/sysimage/rpm")?.is_some() {
        r.package_format = Some("rpm");
        i.warn(
            "rpm: the package list is not read (rpm's database is Berkeley DB, SQLite or NDB, \
             binary formats imgsafe does not parse); packages is null"
                .into(),
        );
    } else if r.distro.as_deref().is_some_and(|d| {
        [
            "rhel",
            "centos",
            "fedora",
            "rocky",
            "almalinux",
            "scientific",
            "ol",
            "opensuse",
            "sles",
        ]
        .contains(&d)
    }) {
        r.package_format = Some("rpm");
        i.warn("rpm: no rpm database found; packages is null".into());
    }
    Ok(())
}

/// Every `local/*/desc` of pacman's database.
fn pacman(i: &mut Inspector) -> crate::Result<Option<Vec<Package>>> {
    let Some(dirs) = i.list("/var/lib/pacman/local")? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (name, kind) in dirs {
        if kind != FileType::Directory {
            continue; // ALPM_DB_VERSION
        }
        let path = format!("/var/lib/pacman/local/{name}/desc");
        match i.parsed(&path, MAX_PACMAN_DESC, packages::parse_pacman_desc)? {
            Some(p) => out.push(p),
            // One bad entry makes the list incomplete: say so by giving none.
            None => return Ok(None),
        }
        if out.len() > packages::MAX_PACKAGES {
            i.warn("/var/lib/pacman/local: too many packages; not read".into());
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// Kernels from `/boot/vmlinuz-*` (and `vmlinux-*`, Arch's `vmlinuz-linux*`) and
/// `/lib/modules/*`, joined by release.
fn kernels(i: &mut Inspector) -> crate::Result<Vec<Kernel>> {
    let mut by_release: std::collections::BTreeMap<String, Kernel> = Default::default();
    for (name, kind) in i.list("/boot")?.unwrap_or_default() {
        let Some(rel) = name
            .strip_prefix("vmlinuz-")
            .or_else(|| name.strip_prefix("vmlinux-"))
        else {
            continue;
        };
        if rel.is_empty() || !matches!(kind, FileType::Regular | FileType::Symlink) {
            continue;
        }
        by_release
            .entry(rel.to_string())
            .or_insert_with(|| Kernel {
                release: rel.to_string(),
                image: None,
                modules: None,
            })
            .image = Some(format!("/boot/{name}"));
    }
    for (name, kind) in i.list("/lib/modules")?.unwrap_or_default() {
        if kind != FileType::Directory {
            continue;
        }
        by_release
            .entry(name.clone())
            .or_insert_with(|| Kernel {
                release: name.clone(),
                image: None,
                modules: None,
            })
            .modules = Some(format!("/lib/modules/{name}"));
    }
    Ok(by_release.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        assert!(valid_hostname("web-01.example.com"));
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname("\x1b]0;x"));
        assert!(!valid_hostname(&"a".repeat(254)));
    }
}
