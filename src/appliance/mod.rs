//! The appliance: a kernel and an initramfs whose `/init` is this very binary (the guest
//! agent), built from declared host inputs as an ordinary user, cached per user and
//! rebuilt only when an input changes (the supermin model).
//!
//! Inputs: a kernel and its modules (`/boot/vmlinuz-*` + `/lib/modules/<version>`, or
//! `IMGSAFE_KERNEL`), busybox-static, the kernel modules the agent needs (with their
//! dependencies from `modules.dep` and `modules.softdep`), and this executable with the
//! shared libraries it loads. The cache key is a hash of every input's path, size and
//! modification time, so a rebuilt imgsafe, an upgraded kernel or busybox gives a new
//! appliance.

pub mod cpio;
pub mod elf;
pub mod kernel;
pub mod modules;

use sha2::{Digest, Sha256};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why the appliance could not be built or found.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// A required input is not installed.
    #[error("{what} not found ({where_}): install the Debian package {package}")]
    Missing {
        what: &'static str,
        where_: String,
        package: &'static str,
    },
    /// Reading an input or writing the cache failed.
    #[error("building the appliance: {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// An input exists but is unusable.
    #[error("building the appliance: {0}")]
    Invalid(String),
    /// The host kernel is unreadable and no package of it could be fetched; `tries`
    /// holds each package name tried and why it failed (none when no name could be
    /// derived). The message names both ways out.
    #[error(
        "building the appliance: kernel {} is not readable by this user and its package \
         could not be fetched with apt-get ({}); make the kernel readable (sudo chmod \
         0644 {}) or point IMGSAFE_KERNEL at a readable kernel",
        host.display(),
        fetch_tries(tries),
        host.display()
    )]
    KernelNotFetched {
        host: PathBuf,
        tries: Vec<(String, kernel::FetchError)>,
    },
}

/// Each package tried and why it failed, for [`ApplianceError::KernelNotFetched`].
fn fetch_tries(tries: &[(String, kernel::FetchError)]) -> String {
    if tries.is_empty() {
        return "no package name could be derived from its name".into();
    }
    let each: Vec<String> = tries.iter().map(|(p, e)| format!("{p}: {e}")).collect();
    each.join("; ")
}

impl ApplianceError {
    fn io(path: &Path, source: io::Error) -> Self {
        ApplianceError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A ready appliance in the cache.
#[derive(Debug, Clone)]
pub struct Appliance {
    /// Kernel to boot: an uncompressed ELF `vmlinux` (PVH entry) when it could be
    /// extracted, else the distribution's bzImage.
    pub kernel: PathBuf,
    /// True when `kernel` is the extracted ELF (booted through PVH).
    pub pvh: bool,
    /// Uncompressed newc cpio initramfs.
    pub initrd: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
}

/// Modules the agent loads at boot, by module name (dependencies are added from
/// modules.dep): the virtio PCI transport and devices, and crc32c for ext4 checksums.
/// No virtio_mmio: every device is on PCI(e) on both machine types, and each module
/// loaded costs boot time under TCG.
pub const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_console", "crc32c_intel"];

/// Modules loaded only when the agent needs them (see its `load_fs_modules`), beyond
/// each filesystem type's own list in [`imgsafe_proto::fstypes::FILESYSTEMS`]: the
/// device-mapper targets LVM volumes use, loaded before LVM is activated; MD RAID's
/// personalities when a RAID member is seen (raid456 only for a parity level: it
/// benchmarks its parity code on load); dm-crypt and the usual LUKS ciphers (AES is
/// built in) with the socket interface cryptsetup decrypts key slots through, only
/// when a key is given.
pub const ON_DEMAND_MODULES: &[(&str, &[&str])] = &[
    (
        "dm",
        &[
            "dm_mod",
            "dm_snapshot",
            "dm_mirror",
            "dm_zero",
            "dm_thin_pool",
        ],
    ),
    ("md", &["md_mod", "linear", "raid0", "raid1", "raid10"]),
    ("md_parity", &["raid456"]),
    (
        "crypt",
        &[
            "dm_mod",
            "dm_crypt",
            "xts",
            "ecb",
            "essiv",
            "af_alg",
            "algif_skcipher",
        ],
    ),
];

/// Every on-demand module group: (name the agent asks for, modules).
fn module_groups() -> impl Iterator<Item = (&'static str, &'static [&'static str])> {
    let fs = imgsafe_proto::fstypes::FILESYSTEMS
        .iter()
        .filter(|t| !t.modules.is_empty())
        .map(|t| (t.name, t.modules));
    fs.chain(ON_DEMAND_MODULES.iter().copied())
}

/// A host program copied into the appliance, with the shared libraries it loads.
#[derive(Debug, Clone, Copy)]
pub struct HostProgram {
    /// Where hosts install it, tried in order.
    pub candidates: &'static [&'static str],
    /// Its path inside the appliance (absolute).
    pub guest: &'static str,
    /// The Debian package that provides it.
    pub package: &'static str,
    /// Without it the appliance is still built (the program is a convenience).
    pub optional: bool,
    /// Data files it needs: (host path, guest path).
    pub data: &'static [(&'static str, &'static str)],
}

/// Host programs copied into the guest: lvm2's `lvm` activates volume groups, `mdadm`
/// assembles RAID arrays and `cryptsetup` opens LUKS containers (the agent runs them
/// only when the disks hold what they are for, and cryptsetup only with a key);
/// ntfs-3g mounts NTFS; `file` gives `imgsafe shell` file-type detection when the host
/// has it.
pub const HOST_PROGRAMS: &[HostProgram] = &[
    HostProgram {
        candidates: &["/sbin/lvm", "/usr/sbin/lvm"],
        guest: "/sbin/lvm",
        package: "lvm2",
        optional: false,
        data: &[],
    },
    // NTFS, through FUSE (the appliance kernel has no ntfs3); lowntfs-3g because it
    // links only libntfs-3g (its own FUSE code, no libfuse or fusermount).
    HostProgram {
        candidates: &["/bin/lowntfs-3g", "/usr/bin/lowntfs-3g"],
        guest: imgsafe_proto::fstypes::NTFS_3G,
        package: "ntfs-3g",
        optional: true,
        data: &[],
    },
    HostProgram {
        candidates: &["/sbin/cryptsetup", "/usr/sbin/cryptsetup"],
        guest: "/sbin/cryptsetup",
        package: "cryptsetup-bin",
        optional: false,
        data: &[],
    },
    HostProgram {
        candidates: &["/sbin/mdadm", "/usr/sbin/mdadm"],
        guest: "/sbin/mdadm",
        package: "mdadm",
        optional: false,
        data: &[],
    },
    HostProgram {
        candidates: &["/usr/bin/file"],
        guest: "/usr/bin/file",
        package: "file",
        optional: true,
        // Where Debian's libmagic looks by default (a symlink on the host).
        data: &[("/usr/lib/file/magic.mgc", "/usr/share/misc/magic.mgc")],
    },
];

/// The appliance's `/etc/lvm/lvm.conf`: no udev (libdevmapper makes the /dev/mapper
/// nodes itself), no daemons, no metadata backups (the image is read-only), only the
/// virtio disks scanned, and no device cache or hints files.
pub const LVM_CONF: &str = r#"# Written by imgsafe for its appliance.
devices {
    dir = "/dev"
    scan = [ "/dev" ]
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    use_devicesfile = 0
    hints = "none"
    # The disks, RAID arrays and opened LUKS containers; a member of a RAID array is
    # left to the array (md_component_detection), never read as a PV of its own.
    filter = [ "a|^/dev/vd|", "a|^/dev/md|", "a|^/dev/mapper/luks-|", "r|.*|" ]
    multipath_component_detection = 0
    md_component_detection = 1
    fw_raid_component_detection = 0
}
activation {
    udev_sync = 0
    udev_rules = 0
    verify_udev_operations = 0
    monitoring = 0
}
global {
    # Thin pools activate without their check tool (the appliance has none; nothing is
    # repaired in a read-only image anyway).
    thin_check_executable = ""
    use_lvmlockd = 0
    use_lvmpolld = 0
    event_activation = 0
    notify_dbus = 0
}
backup {
    backup = 0
    archive = 0
}
"#;

/// The appliance's `/etc/mdadm/mdadm.conf`: members only on the virtio disks (and
/// their partitions), every array treated as this host's (its recorded homehost is not
/// checked, so an array keeps its plain name), no mail, no monitor.
pub const MDADM_CONF: &str = r#"# Written by imgsafe for its appliance.
DEVICE /dev/vd*
HOMEHOST <ignore>
AUTO +all
CREATE owner=root group=root mode=0600
"#;

/// Paths of the build inputs, before hashing.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub kernel: PathBuf,
    pub kernel_release: String,
    pub modules_dir: PathBuf,
    pub busybox: PathBuf,
    /// This executable (becomes `/init`).
    pub agent: PathBuf,
    /// Each of [`HOST_PROGRAMS`] as found on this host.
    pub programs: Vec<(HostProgram, PathBuf)>,
}

/// Where the per-user cache lives: `$XDG_CACHE_HOME/imgsafe`, else `~/.cache/imgsafe`.
pub fn cache_root() -> Result<PathBuf, ApplianceError> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("imgsafe"));
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(h).join(".cache").join("imgsafe"));
    }
    Err(ApplianceError::Invalid(
        "neither XDG_CACHE_HOME nor HOME is set: no place for the appliance cache".into(),
    ))
}

/// Find every input on this host.
pub fn find_inputs() -> Result<Inputs, ApplianceError> {
    let kernel::Found {
        kernel,
        release: kernel_release,
        modules_dir,
    } = kernel::find()?;
    let modules_dir = std::env::var_os("IMGSAFE_MODULES")
        .map(PathBuf::from)
        .or(modules_dir)
        .unwrap_or_else(|| Path::new("/lib/modules").join(&kernel_release));
    if !modules_dir.join("modules.dep").is_file() {
        return Err(ApplianceError::Missing {
            what: "kernel modules",
            where_: modules_dir.display().to_string(),
            package: "linux-image-cloud-amd64 (the modules matching the kernel)",
        });
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or(ApplianceError::Missing {
            what: "busybox",
            where_: "/bin/busybox".into(),
            package: "busybox-static",
        })?;
    if !elf::is_static(&busybox).map_err(|e| ApplianceError::io(&busybox, e))? {
        return Err(ApplianceError::Missing {
            what: "a statically linked busybox",
            where_: busybox.display().to_string(),
            package: "busybox-static",
        });
    }
    let agent =
        std::env::current_exe().map_err(|e| ApplianceError::io(Path::new("/proc/self/exe"), e))?;
    let mut programs = Vec::new();
    for p in HOST_PROGRAMS {
        match find_program(p) {
            Ok(path) => programs.push((*p, path)),
            Err(_) if p.optional => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Inputs {
        kernel,
        kernel_release,
        modules_dir,
        busybox,
        agent,
        programs,
    })
}

/// The host file of one [`HostProgram`].
fn find_program(p: &HostProgram) -> Result<PathBuf, ApplianceError> {
    let data_present = p.data.iter().all(|(host, _)| Path::new(host).is_file());
    let found = p.candidates.iter().map(PathBuf::from).find(|c| c.is_file());
    found
        .filter(|_| data_present)
        .ok_or(ApplianceError::Missing {
            what: p.guest.rsplit('/').next().unwrap_or(p.guest),
            where_: p.candidates.join(" or "),
            package: p.package,
        })
}

/// Everything that goes into the initramfs, resolved but not yet written.
struct Plan {
    /// Loaded at boot, in order.
    modules: Vec<PathBuf>,
    /// Per mount type, loaded before mounting, in order.
    fs_modules: Vec<(&'static str, Vec<PathBuf>)>,
    libs: Vec<(PathBuf, PathBuf)>,
    applets: Vec<String>,
}

fn plan(inputs: &Inputs) -> Result<Plan, ApplianceError> {
    let modules = modules::resolve(&inputs.modules_dir, BOOT_MODULES)?;
    let fs_modules = module_groups()
        .map(|(t, m)| Ok((t, modules::resolve(&inputs.modules_dir, m)?)))
        .collect::<Result<Vec<_>, ApplianceError>>()?;
    let mut libs = elf::closure(&inputs.agent).map_err(|e| ApplianceError::io(&inputs.agent, e))?;
    for (_, path) in &inputs.programs {
        libs.extend(elf::closure(path).map_err(|e| ApplianceError::io(path, e))?);
    }
    // One copy per guest path: the programs share most libraries with the agent.
    libs.sort_by(|a, b| a.1.cmp(&b.1));
    libs.dedup_by(|a, b| a.1 == b.1);
    let applets = busybox_applets(&inputs.busybox)?;
    Ok(Plan {
        modules,
        fs_modules,
        libs,
        applets,
    })
}

/// The cache key: a hash of the format version and every input's identity.
fn cache_key(inputs: &Inputs, plan: &Plan) -> Result<String, ApplianceError> {
    let mut h = Sha256::new();
    h.update(b"imgsafe-appliance-v3\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    let mut files: Vec<&Path> = vec![&inputs.kernel, &inputs.busybox, &inputs.agent];
    files.extend(plan.modules.iter().map(PathBuf::as_path));
    for (t, m) in &plan.fs_modules {
        h.update(t.as_bytes());
        files.extend(m.iter().map(PathBuf::as_path));
    }
    files.extend(plan.libs.iter().map(|(src, _)| src.as_path()));
    for (p, path) in &inputs.programs {
        h.update(p.guest.as_bytes());
        files.push(path);
        for (host, guest) in p.data {
            h.update(guest.as_bytes());
            files.push(Path::new(host));
        }
    }
    h.update(LVM_CONF.as_bytes());
    h.update(MDADM_CONF.as_bytes());
    for f in files {
        let m = fs::metadata(f).map_err(|e| ApplianceError::io(f, e))?;
        h.update(f.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(m.len().to_le_bytes());
        h.update(m.mtime().to_le_bytes());
        h.update(m.mtime_nsec().to_le_bytes());
        h.update(m.ino().to_le_bytes());
    }
    let digest = h.finalize();
    Ok(digest.iter().take(12).map(|b| format!("{b:02x}")).collect())
}

/// Return the cached appliance for the current inputs, building it first if needed.
/// Safe when several imgsafe processes build at once: each builds in a private temp
/// dir and renames it into place; the loser of the race uses the winner's.
pub fn ensure() -> Result<Appliance, ApplianceError> {
    let inputs = find_inputs()?;
    let plan = plan(&inputs)?;
    let key = cache_key(&inputs, &plan)?;
    let root = cache_root()?;
    let dir = root.join(format!("appliance-{key}"));
    // The cache is this user's alone (0700, whatever the umask), also when it was made
    // by an older version or by hand.
    if let Some(parent) = root.parent() {
        fs::create_dir_all(parent).map_err(|e| ApplianceError::io(parent, e))?;
    }
    crate::rundir::private_dir(&root).map_err(|e| ApplianceError::io(&root, e))?;
    if let Some(a) = load(&dir, &inputs) {
        return Ok(a);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".building-")
        .tempdir_in(&root)
        .map_err(|e| ApplianceError::io(&root, e))?;
    build_into(tmp.path(), &inputs, &plan)?;
    let built = tmp.keep();
    match fs::rename(&built, &dir) {
        Ok(()) => {}
        Err(_) if load(&dir, &inputs).is_some() => {
            let _ = fs::remove_dir_all(&built);
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&built);
            return Err(ApplianceError::io(&dir, e));
        }
    }
    prune(&root, &dir);
    load(&dir, &inputs).ok_or_else(|| {
        ApplianceError::Invalid(format!("{} is incomplete after building", dir.display()))
    })
}

/// Read a finished cache entry; `None` if it is missing or incomplete. Marks it used.
fn load(dir: &Path, inputs: &Inputs) -> Option<Appliance> {
    let initrd = dir.join("initrd.cpio");
    let complete = dir.join("complete");
    if !complete.is_file() || !initrd.is_file() {
        return None;
    }
    mark_used(&complete);
    let vmlinux = dir.join("vmlinux");
    let (kernel, pvh) = if vmlinux.is_file() {
        (vmlinux, true)
    } else {
        (inputs.kernel.clone(), false)
    };
    Some(Appliance {
        kernel,
        pvh,
        initrd,
        kernel_release: inputs.kernel_release.clone(),
    })
}

/// An entry unused for this long may be removed by another imgsafe build.
const PRUNE_AFTER: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// The "used" mark is refreshed at most this often (it is a metadata write).
const MARK_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

fn age(p: &Path) -> Option<std::time::Duration> {
    fs::metadata(p).ok()?.modified().ok()?.elapsed().ok()
}

/// Record that the entry is in use (mtime of its `complete` marker), so a different
/// imgsafe binary building its own appliance does not prune it from under us.
fn mark_used(complete: &Path) {
    if age(complete).is_some_and(|a| a > MARK_EVERY) {
        if let Ok(f) = fs::File::options().append(true).open(complete) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
}

/// Remove appliances unused for [`PRUNE_AFTER`] (a debug and a release build, or two
/// versions, may be in use side by side) and stale build dirs, best effort.
fn prune(root: &Path, keep: &Path) {
    let Ok(rd) = fs::read_dir(root) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let stale = if name.starts_with(".building-") {
            age(&p).is_some_and(|a| a.as_secs() > 3600)
        } else if name.starts_with("appliance-") && p != keep {
            age(&p.join("complete")).is_none_or(|a| a > PRUNE_AFTER)
        } else {
            false
        };
        if stale {
            let _ = fs::remove_dir_all(&p);
        }
    }
}

/// Build kernel + initramfs into `dir` (a private temp dir).
fn build_into(dir: &Path, inputs: &Inputs, plan: &Plan) -> Result<(), ApplianceError> {
    let stage = crate::trace::stage("appliance build");
    let pvh = match kernel::extract_vmlinux(&inputs.kernel)? {
        Some(elf) => {
            let p = dir.join("vmlinux");
            fs::write(&p, elf).map_err(|e| ApplianceError::io(&p, e))?;
            true
        }
        None => false,
    };
    let initrd = dir.join("initrd.cpio");
    let file = fs::File::create(&initrd).map_err(|e| ApplianceError::io(&initrd, e))?;
    let mut w = cpio::Writer::new(io::BufWriter::new(file));
    write_tree(&mut w, inputs, plan).map_err(|e| ApplianceError::io(&initrd, e))?;
    let mut out = w.finish().map_err(|e| ApplianceError::io(&initrd, e))?;
    io::Write::flush(&mut out).map_err(|e| ApplianceError::io(&initrd, e))?;
    out.get_ref()
        .sync_all()
        .map_err(|e| ApplianceError::io(&initrd, e))?;
    let done = dir.join("complete");
    fs::write(&done, b"").map_err(|e| ApplianceError::io(&done, e))?;
    let lazy: usize = plan.fs_modules.iter().map(|(_, m)| m.len()).sum();
    stage.done(&format!(
        "{} boot + {lazy} on-demand modules, {} libraries, pvh={pvh}",
        plan.modules.len(),
        plan.libs.len()
    ));
    Ok(())
}

fn write_tree<W: io::Write>(
    w: &mut cpio::Writer<W>,
    inputs: &Inputs,
    plan: &Plan,
) -> io::Result<()> {
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "sysroot",
        "mnt",
        "etc",
        "etc/imgsafe",
        "lib",
        "lib64",
        "root",
    ] {
        w.dir(d, 0o755)?;
    }
    // The kernel opens /dev/console as init's stdin/stdout/stderr only if it exists
    // before devtmpfs is mounted, and Rust's runtime aborts at start-up if fds 0-2 are
    // closed and /dev/null cannot be opened.
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    // The agent without its debug info: a third of the size, the same program.
    let agent = fs::read(&inputs.agent).and_then(|d| elf::strip_to_segments(&d))?;
    w.file("init", 0o755, &agent)?;
    w.file_from("bin/busybox", 0o755, &inputs.busybox)?;
    for a in &plan.applets {
        if a != "busybox" {
            w.symlink(&format!("bin/{a}"), "busybox")?;
        }
    }
    for (p, path) in &inputs.programs {
        let rel = p.guest.trim_start_matches('/');
        w.parents(Path::new(rel))?;
        w.file_from(rel, 0o755, path)?;
        for (host, guest) in p.data {
            let rel = guest.trim_start_matches('/');
            w.parents(Path::new(rel))?;
            w.file_from(rel, 0o644, Path::new(host))?;
        }
    }
    w.parents(Path::new("etc/lvm/lvm.conf"))?;
    w.file("etc/lvm/lvm.conf", 0o644, LVM_CONF.as_bytes())?;
    w.parents(Path::new("etc/mdadm/mdadm.conf"))?;
    w.file("etc/mdadm/mdadm.conf", 0o644, MDADM_CONF.as_bytes())?;
    for (src, dst) in &plan.libs {
        let rel = dst.strip_prefix("/").unwrap_or(dst);
        w.parents(rel)?;
        w.file_from(&rel.to_string_lossy(), 0o755, src)?;
    }
    let mut copied = std::collections::HashSet::new();
    let mut module_list = |w: &mut cpio::Writer<W>, mods: &[PathBuf]| -> io::Result<String> {
        let mut list = String::new();
        for m in mods {
            let rel = Path::new("lib/modules")
                .join(&inputs.kernel_release)
                .join(m.strip_prefix(&inputs.modules_dir).unwrap_or(m));
            if copied.insert(rel.clone()) {
                w.parents(&rel)?;
                w.file_from(&rel.to_string_lossy(), 0o644, m)?;
            }
            list.push('/');
            list.push_str(&rel.to_string_lossy());
            list.push('\n');
        }
        Ok(list)
    };
    let boot = module_list(w, &plan.modules)?;
    w.file("etc/imgsafe/modules", 0o644, boot.as_bytes())?;
    w.dir("etc/imgsafe/fs", 0o755)?;
    for (t, mods) in &plan.fs_modules {
        let list = module_list(w, mods)?;
        w.file(&format!("etc/imgsafe/fs/{t}"), 0o644, list.as_bytes())?;
    }
    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    w.file("etc/group", 0o644, b"root:x:0:\n")?;
    // Last in the archive: the agent refuses to run without it. The kernel unpacks the
    // initramfs into guest memory and, when that runs out, stops with only a log line,
    // leaving the archive's tail missing (modules, tools) and commands failing later
    // in ways that do not say why.
    w.file(
        imgsafe_proto::INITRAMFS_COMPLETE.trim_start_matches('/'),
        0o644,
        b"",
    )?;
    Ok(())
}

/// Busybox's applet names, from `busybox --list` (busybox is static and trusted: it is
/// a host package, not image content).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ApplianceError> {
    let out = std::process::Command::new(busybox)
        .arg("--list")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| ApplianceError::io(busybox, e))?;
    if !out.status.success() {
        return Err(ApplianceError::Invalid(format!(
            "{} --list failed",
            busybox.display()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| {
            !a.is_empty()
                && a.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' || b == b'['
                })
        })
        .map(String::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfetchable_kernel_names_each_try_and_both_ways_out() {
        let e = ApplianceError::KernelNotFetched {
            host: "/boot/vmlinuz-6.1".into(),
            tries: vec![
                (
                    "linux-image-6.1".into(),
                    kernel::FetchError::ToolMissing {
                        tool: "apt-get".into(),
                    },
                ),
                (
                    "linux-image-6.1-cloud".into(),
                    kernel::FetchError::Packages(0),
                ),
            ],
        };
        let none = ApplianceError::KernelNotFetched {
            host: "/boot/vmlinuz-x".into(),
            tries: Vec::new(),
        };

        let (e, none) = (e.to_string(), none.to_string());

        assert!(
            e.contains("(linux-image-6.1: apt-get not found; linux-image-6.1-cloud: apt-get wrote 0 packages, expected one)"),
            "{e}"
        );
        assert!(e.contains("sudo chmod 0644 /boot/vmlinuz-6.1") && e.contains("IMGSAFE_KERNEL"));
        assert!(
            none.contains("(no package name could be derived from its name)"),
            "{none}"
        );
    }

    fn entry(root: &Path, name: &str, age: std::time::Duration) -> PathBuf {
        let d = root.join(name);
        fs::create_dir_all(&d).unwrap();
        let f = fs::File::create(d.join("complete")).unwrap();
        f.set_modified(std::time::SystemTime::now() - age).unwrap();
        d
    }

    #[test]
    fn prune_keeps_recently_used_appliances_and_removes_old_ones() {
        let root = tempfile::tempdir().unwrap();
        let current = entry(root.path(), "appliance-current", std::time::Duration::ZERO);
        let other = entry(
            root.path(),
            "appliance-other-build",
            std::time::Duration::from_secs(60),
        );
        let old = entry(root.path(), "appliance-old", PRUNE_AFTER * 2);

        prune(root.path(), &current);

        assert!(current.exists());
        assert!(
            other.exists(),
            "an appliance another build is using was pruned"
        );
        assert!(!old.exists());
    }
}
