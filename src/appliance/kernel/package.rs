//! The distribution's own kernel, fetched without root when the host kernel under
//! /boot cannot be read by this user (Ubuntu installs `/boot/vmlinuz-*` mode 0600).
//!
//! `apt-get download` works as an ordinary user and verifies the package against apt's
//! signed lists; `dpkg-deb -x` unpacks it. Both run in a private temp dir inside the
//! appliance cache, and the kernel is kept there (`kernel/<package>-<size>-<mtime>/`,
//! keyed on the host file it stands in for, so a kernel upgrade fetches again).

use super::super::ApplianceError;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A step of fetching one kernel package that failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A file or folder in the cache could not be made, read or moved.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A tool (apt-get, dpkg-deb, depmod) is not installed.
    #[error("{tool} not found")]
    ToolMissing { tool: String },
    /// A tool could not be started.
    #[error("{tool}: {source}")]
    ToolStart {
        tool: String,
        #[source]
        source: io::Error,
    },
    /// A tool failed; `said` is the last line it printed on stderr.
    #[error("{tool}: {said}")]
    ToolFailed { tool: String, said: String },
    /// apt-get did not leave exactly one package.
    #[error("apt-get wrote {0} packages, expected one")]
    Packages(usize),
    /// The package has no /boot.
    #[error("the package has no /boot")]
    NoBoot,
    /// The package's /boot does not hold exactly one kernel.
    #[error("the package has {0} kernels in /boot, expected one")]
    Kernels(usize),
    /// The cache entry lacks a part after it was made.
    #[error("{} is incomplete", path.display())]
    Incomplete { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A kernel unpacked from its package into the cache.
#[derive(Debug)]
pub struct Fetched {
    /// The unpacked `vmlinuz-<release>`.
    pub kernel: PathBuf,
    /// Its release, from the file name.
    pub release: String,
    /// Modules unpacked with it (depmod'ed), when the host has none for this release.
    pub modules_dir: Option<PathBuf>,
}

/// Get the package of the unreadable host kernel `host` (release `release`) into the
/// cache, or return the one already there. The first element is true when it was
/// downloaded now (the caller says so once).
pub fn fetch(cache: &Path, host: &Path, release: &str) -> Result<(Fetched, bool), ApplianceError> {
    let candidates = package_candidates(host, release);
    if candidates.is_empty() {
        return Err(ApplianceError::KernelNotFetched {
            host: host.to_path_buf(),
            tries: Vec::new(),
        });
    }
    let meta = fs::metadata(host).map_err(|e| ApplianceError::io(host, e))?;
    let store = cache.join("kernel");
    fs::create_dir_all(cache).map_err(|e| ApplianceError::io(cache, e))?;
    crate::rundir::private_dir(cache).map_err(|e| ApplianceError::io(cache, e))?;
    crate::rundir::private_dir(&store).map_err(|e| ApplianceError::io(&store, e))?;
    sweep(&store);
    let mut tries = Vec::new();
    for pkg in candidates {
        let dir = store.join(format!("{pkg}-{}-{}", meta.len(), meta.mtime()));
        if let Some(f) = load(&dir) {
            return Ok((f, false));
        }
        match download_into(&store, &dir, &pkg) {
            Ok(f) => return Ok((f, true)),
            Err(e) => tries.push((pkg, e)),
        }
    }
    Err(ApplianceError::KernelNotFetched {
        host: host.to_path_buf(),
        tries,
    })
}

/// Remove temp dirs left by a fetch that was killed (older than an hour), best effort.
fn sweep(store: &Path) {
    let Ok(rd) = fs::read_dir(store) else { return };
    for e in rd.flatten() {
        let stale = e.file_name().to_string_lossy().starts_with(".fetching-")
            && e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a.as_secs() > 3600);
        if stale {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Package names to try, best first: the package that owns the file (`dpkg -S`), then
/// Debian's and Ubuntu's naming, `linux-image-<release>` of the file and of the
/// running kernel. Only names apt could mean are kept (no option look-alikes).
pub fn package_candidates(host: &Path, release: &str) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(owner) = owner_of(host) {
        names.push(owner);
    }
    names.push(format!("linux-image-{release}"));
    if let Some(running) = running_release() {
        names.push(format!("linux-image-{running}"));
    }
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if is_package_name(&n) && !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// `dpkg -S FILE` → the owning package (`pkg: /path`, or `pkg:arch: /path`).
fn owner_of(file: &Path) -> Option<String> {
    let out = Command::new("dpkg")
        .arg("-S")
        .arg(file)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_dpkg_search(&String::from_utf8_lossy(&out.stdout))
}

/// The package of the first line of `dpkg -S` output (diversions print several
/// packages separated by `, `: the first is the one installed).
pub fn parse_dpkg_search(out: &str) -> Option<String> {
    let line = out.lines().next()?;
    let (pkgs, _) = line.split_once(": ")?;
    let first = pkgs.split(", ").next()?.trim();
    (!first.is_empty()).then(|| first.to_string())
}

fn running_release() -> Option<String> {
    let s = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    Some(s.trim().to_string()).filter(|s| !s.is_empty())
}

/// A Debian package name (policy 5.6.7), optionally `:arch`.
pub fn is_package_name(s: &str) -> bool {
    let (name, arch) = match s.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (s, None),
    };
    let name_ok = name.len() >= 2
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    let arch_ok = arch.is_none_or(|a| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    });
    name_ok && arch_ok
}

/// A finished entry: `complete` marker, one `vmlinuz-*`, and modules if it kept any.
fn load(dir: &Path) -> Option<Fetched> {
    if !dir.join("complete").is_file() {
        return None;
    }
    let release = fs::read_to_string(dir.join("release")).ok()?;
    let kernel = dir.join(format!("vmlinuz-{release}"));
    let modules = dir.join("lib/modules").join(&release);
    kernel.is_file().then(|| Fetched {
        kernel,
        modules_dir: modules.join("modules.dep").is_file().then_some(modules),
        release,
    })
}

/// Download and unpack `pkg` in a private temp dir of `store`, then rename the result
/// to `dir` (another imgsafe may have won the race: its entry is used).
fn download_into(store: &Path, dir: &Path, pkg: &str) -> Result<Fetched, FetchError> {
    let tmp = tempfile::Builder::new()
        .prefix(".fetching-")
        .tempdir_in(store)
        .map_err(io_err(store))?;
    let dl = tmp.path().join("download");
    fs::create_dir(&dl).map_err(io_err(&dl))?;
    run(Command::new("apt-get")
        .args(["download", "-q", "--", pkg])
        .current_dir(&dl))?;
    let deb = only_deb(&dl)?;
    let root = tmp.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let out = tmp.path().join("out");
    fs::create_dir(&out).map_err(io_err(&out))?;
    let (vmlinuz, release) = unpacked_kernel(&root.join("boot"))?;
    fs::rename(&vmlinuz, out.join(format!("vmlinuz-{release}"))).map_err(io_err(&vmlinuz))?;
    // The host's own modules for this release are the same files; keep the unpacked
    // ones only when the host has none (the package ships no modules.dep: depmod).
    let host_modules = Path::new("/lib/modules").join(&release).join("modules.dep");
    let unpacked = root.join("lib/modules").join(&release);
    if !host_modules.is_file() && unpacked.join("kernel").is_dir() {
        run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
        let modules = out.join("lib/modules");
        fs::create_dir_all(&modules).map_err(io_err(&modules))?;
        fs::rename(&unpacked, modules.join(&release)).map_err(io_err(&unpacked))?;
    }
    let (release_file, complete) = (out.join("release"), out.join("complete"));
    fs::write(&release_file, &release).map_err(io_err(&release_file))?;
    fs::write(&complete, pkg).map_err(io_err(&complete))?;
    match fs::rename(&out, dir) {
        Ok(()) => {}
        Err(_) if load(dir).is_some() => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    load(dir).ok_or_else(|| FetchError::Incomplete {
        path: dir.to_path_buf(),
    })
}

/// Run a tool; its failure as one line (the last line it printed on stderr).
fn run(cmd: &mut Command) -> Result<(), FetchError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => FetchError::ToolMissing { tool: tool.clone() },
            _ => FetchError::ToolStart {
                tool: tool.clone(),
                source,
            },
        })?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("failed");
    Err(FetchError::ToolFailed {
        tool,
        said: crate::terminal::printable_max(last, 300),
    })
}

/// The one `.deb` apt-get wrote.
fn only_deb(dir: &Path) -> Result<PathBuf, FetchError> {
    let debs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    match debs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(FetchError::Packages(debs.len())),
    }
}

/// The `vmlinuz-<release>` of an unpacked package's `/boot`.
fn unpacked_kernel(boot: &Path) -> Result<(PathBuf, String), FetchError> {
    let found: Vec<(PathBuf, String)> = fs::read_dir(boot)
        .map_err(|_| FetchError::NoBoot)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rel = name.strip_prefix("vmlinuz-")?.to_string();
            let plain = !rel.is_empty() && !rel.contains('/') && e.file_type().ok()?.is_file();
            plain.then(|| (e.path(), rel))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(FetchError::Kernels(found.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_search_gives_the_owning_package() {
        let out = "linux-image-6.1.0-57-cloud-amd64: /boot/vmlinuz-6.1.0-57-cloud-amd64\n";

        assert_eq!(
            parse_dpkg_search(out).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
    }

    #[test]
    fn dpkg_search_with_arch_and_diversion_takes_the_first_package() {
        let out = "linux-image-6.8.0-1017-azure:amd64, other: /boot/vmlinuz-6.8.0-1017-azure\n";

        assert_eq!(
            parse_dpkg_search(out).as_deref(),
            Some("linux-image-6.8.0-1017-azure:amd64")
        );
    }

    #[test]
    fn package_names_that_look_like_options_or_paths_are_refused() {
        assert!(is_package_name("linux-image-6.18.44-fc-v1045"));
        assert!(is_package_name("linux-image-6.8.0-1017-azure:amd64"));
        assert!(!is_package_name("-oDebug::pkgAcquire=1"));
        assert!(!is_package_name("linux-image-../../x"));
        assert!(!is_package_name("linux image"));
    }
}
