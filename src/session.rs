//! A session: decoded image + NBD server + appliance VM + agent connection, torn down in
//! reverse order (agent, VM, NBD server, temp dir) on every path.

use crate::agent_client::{AgentClient, GuestFs};
use crate::format::BlockSource;
use crate::image::ImageSpec;
use crate::inspect::{self, Planned};
use crate::vm::{self, Vm};
use crate::{appliance, image, nbd, trace, warm, Error, Result};
use imgsafe_proto::{FileType, FsInfo, Subvolume};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A step of setting a session up on the host that failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The private run directory (sockets, overlays) could not be made.
    #[error(transparent)]
    RunDir(#[from] crate::rundir::RunDirError),
    /// A disk's NBD server could not listen on its socket.
    #[error("starting the NBD server on {}: {source}", socket.display())]
    NbdServer {
        /// The socket in the run directory.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A disk's throwaway copy-on-write overlay (`shell --overlay`) could not be made.
    #[error("creating the overlay {}: {source}", path.display())]
    Overlay {
        /// The overlay file in the run directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Default limit for the guest to boot and answer, and for each later answer
/// (`IMGSAFE_TIMEOUT` seconds overrides).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a clean shutdown may take before QEMU is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Filesystem types the agent can mount.
/// Files whose presence marks a filesystem as an operating system's root.
const ROOT_MARKERS: [&[u8]; 2] = [b"/etc/fstab", b"/etc/os-release"];

/// The filesystem found to be the guest's root.
/// What [`Session::root_at`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootKind {
    /// A [`ROOT_MARKERS`] file: an installed OS (left mounted).
    Os,
    /// Only an /etc directory (unmounted again).
    Etc,
}

enum Root {
    /// It has /etc/fstab or /etc/os-release: an installed OS, whose fstab is followed;
    /// on a btrfs, maybe in a subvolume other than the default one.
    Os(FsInfo, Option<Subvolume>),
    /// Of several filesystems, the only one with an /etc directory.
    EtcOnly(FsInfo),
}

/// A running appliance with the image attached.
pub struct Session {
    image: PathBuf,
    /// Every file the decoded image was read from (a chain has several).
    image_files: Vec<PathBuf>,
    // Field order is teardown order: agent channel, VM, NBD server, temp dir.
    agent: AgentClient,
    vm: Vm,
    /// One NBD server per disk, in disk order.
    nbd: Vec<nbd::Server>,
    _dir: crate::rundir::RunDir,
    filesystems: Option<Vec<FsInfo>>,
    /// Each btrfs device's subvolumes once asked for: (default id, list).
    subvolumes: std::collections::HashMap<String, (u64, Vec<Subvolume>)>,
    /// The decoded disk the NBD server serves, for the bulk data path (None with an
    /// overlay: the guest may have written, and the image no longer says what it reads).
    bulk: Option<Arc<dyn BlockSource>>,
    /// What is mounted now: (device, mountpoint), in mount order.
    mounts: Vec<(String, String)>,
}

/// The guest's other disks and its key, as the command line gave them.
#[derive(Debug, Clone, Default)]
pub struct Guest {
    /// More images of the same guest, attached after the image in order.
    pub add: Vec<PathBuf>,
    /// The LUKS key's file (`-`: the terminal, or stdin).
    pub key_file: Option<PathBuf>,
}

/// Which filesystems to mount, as the command line chose them.
#[derive(Debug, Clone, Default)]
pub struct MountChoice {
    /// `-m DEV[:MOUNTPOINT]`, in order (empty: found by inspection or the only one).
    pub mount: Vec<String>,
    /// `-i`: find the root and mount what its fstab lists.
    pub inspect: bool,
}

/// Decode the image and each `--add` image, in order. `--format`, `--snapshot` and
/// `--disk` are about the image; an added image is probed on its own.
fn open_disks(
    image_arg: &Path,
    image_args: &ImageSpec,
    guest: &Guest,
) -> Result<Vec<(PathBuf, Arc<dyn BlockSource>)>> {
    let mut out = vec![(image_arg.to_path_buf(), image::open(image_arg, image_args)?)];
    let added = ImageSpec {
        options: crate::format::OpenOptions {
            format: None,
            disk: None,
            snapshot: None,
            ..image_args.options.clone()
        },
        vz_root: image_args.vz_root.clone(),
    };
    for extra in &guest.add {
        out.push((extra.clone(), image::open(extra, &added)?));
    }
    Ok(out)
}

/// The `--key-file` key, read before anything boots (a prompt comes first).
fn read_key(guest: &Guest) -> Result<Option<crate::key::Key>> {
    guest.key_file.as_deref().map(crate::key::read).transpose()
}

/// Guest memory when a LUKS key is given: LUKS2's largest default Argon2 memory cost
/// (1 GiB) plus the appliance's own.
const LUKS_MEMORY_MIB: u32 = 1024 + vm::config::DEFAULT_MEMORY_MIB;

/// The per-answer timeout in force.
pub fn timeout() -> Result<Duration> {
    match std::env::var("IMGSAFE_TIMEOUT") {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(s) => s
            .parse::<f64>()
            .ok()
            .filter(|n| *n > 0.0 && *n <= 1e9)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "IMGSAFE_TIMEOUT={s:?}: expected a number of seconds"
                ))
            }),
    }
}

impl Session {
    /// Decode the image and the `--add` images, serve each over NBD, boot the appliance
    /// with the disks attached read-only, and handshake with the agent.
    pub fn start(image_arg: &Path, image_args: &ImageSpec, guest: &Guest) -> Result<Session> {
        vm::reaper::install_signal_handlers();
        let sources = open_disks(image_arg, image_args, guest)?;
        let key = read_key(guest)?;
        Self::start_with_sources(image_arg, sources, false, key)
    }

    /// [`Session::start`], then [`Session::run`].
    pub fn run_started<T>(
        image_arg: &Path,
        image_args: &ImageSpec,
        guest: &Guest,
        f: impl FnOnce(&mut Session) -> Result<T>,
    ) -> Result<T> {
        Self::start(image_arg, image_args, guest)?.run(f)
    }

    /// [`Session::open_mounted`], then [`Session::run`].
    pub fn run_mounted<T>(
        image_arg: &Path,
        image_args: &ImageSpec,
        guest: &Guest,
        mount: &MountChoice,
        f: impl FnOnce(&mut Session) -> Result<T>,
    ) -> Result<T> {
        Self::open_mounted(image_arg, image_args, guest, mount)?.run(f)
    }

    /// Like [`Session::start`] for already decoded disks (the image first, then each
    /// `--add` image with its name). With `overlay`, each disk sits under a throwaway
    /// copy-on-write layer (a qcow2 file in the session's private temp dir, deleted with
    /// it) and filesystems are mounted read-write: the guest may write, the images
    /// (served read-only over NBD) never change. With `key`, the LUKS containers are
    /// opened with it (see [`Session::unlock`]) and the key is wiped.
    pub fn start_with_sources(
        image_arg: &Path,
        sources: Vec<(PathBuf, Arc<dyn BlockSource>)>,
        overlay: bool,
        key: Option<crate::key::Key>,
    ) -> Result<Session> {
        Self::boot_with_sources(image_arg, sources, overlay, key)
            .map_err(|e| e.about_image(image_arg))
    }

    fn boot_with_sources(
        image_arg: &Path,
        sources: Vec<(PathBuf, Arc<dyn BlockSource>)>,
        overlay: bool,
        key: Option<crate::key::Key>,
    ) -> Result<Session> {
        let timeout = timeout()?;
        if sources.len() > vm::config::MAX_DISKS as usize {
            return Err(Error::Usage(format!(
                "{} disks given; at most {} (the image and {} --add)",
                sources.len(),
                vm::config::MAX_DISKS,
                vm::config::MAX_DISKS - 1
            )));
        }
        let image_files = sources
            .iter()
            .flat_map(|(_, s)| s.layers())
            .map(|l| l.path)
            .collect();
        let dir = crate::rundir::create().map_err(SessionError::RunDir)?;
        // The bulk data path reads the image (the first disk) itself; never under an
        // overlay, where the guest may have written.
        let bulk = (!overlay).then(|| sources[0].1.clone());
        let served = serve_disks(dir.path(), sources, overlay)?;

        let stage = trace::stage("appliance");
        let app = appliance::ensure()?;
        stage.done(&format!("{} (pvh={})", app.kernel_release, app.pvh));

        let mut cfg = vm_config(&app, dir.path())?;
        if key.is_some() {
            // LUKS2's Argon2 key slots take up to 1 GiB to open (cryptsetup's default
            // on a machine with that much); guest memory is only allocated when the
            // guest touches it, so a bigger VM costs nothing more for other commands.
            // Its saved state is its own (the memory size is part of the warm key).
            cfg.memory_mib = cfg.memory_mib.max(LUKS_MEMORY_MIB);
        }
        if overlay {
            // QEMU may write the overlays, the console log still far less.
            cfg.max_file_bytes = cfg
                .max_file_bytes
                .max(served.overlay_bytes.saturating_add(64 << 20));
        }
        if trace::verbose() {
            let argv: Vec<String> = cfg
                .argv()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            trace::note(&format!("qemu: {} {}", cfg.qemu.display(), argv.join(" ")));
        }
        let (vm, mut agent) = boot(&cfg, &served.disks, timeout)?;
        agent.writable_mounts = overlay;
        let mut s = Session {
            image: image_arg.to_path_buf(),
            image_files,
            agent,
            vm,
            nbd: served.servers,
            _dir: dir,
            filesystems: None,
            subvolumes: Default::default(),
            mounts: Vec::new(),
            bulk,
        };
        if let Some(key) = key {
            let r = s.unlock(&key);
            drop(key);
            if let Err(e) = r {
                let e = s.annotate(e);
                s.abort();
                return Err(e);
            }
        }
        Ok(s)
    }

    /// Open every LUKS container with `key`. One the key does not open is left closed
    /// with a warning; when it opens none at all, that is the error (no filesystem can
    /// be used).
    fn unlock(&mut self, key: &crate::key::Key) -> Result<()> {
        let stage = trace::stage("unlock");
        let (opened, refused) = self
            .agent
            .unlock(key.bytes())
            .map_err(|e| self.annotate(e))?;
        stage.done(&format!(
            "{} opened, {} refused",
            opened.len(),
            refused.len()
        ));
        let shown = |l: &[String]| {
            l.iter()
                .map(|d| inspect::shown(d))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (opened.is_empty(), refused.is_empty()) {
            (true, true) => eprintln!(
                "imgsafe: warning: {}: no LUKS container found; the key is not used",
                self.image.display()
            ),
            (true, false) => {
                return Err(self.fs_error(format!(
                    "{}: wrong key (it opens no key slot of the LUKS container)",
                    shown(&refused)
                )))
            }
            (false, false) => eprintln!(
                "imgsafe: warning: {}: wrong key (it opens no key slot); left closed",
                shown(&refused)
            ),
            (false, true) => {}
        }
        Ok(())
    }

    /// Start, then choose and mount the filesystem (see [`choose`]).
    pub fn open_mounted(
        image_arg: &Path,
        image_args: &ImageSpec,
        guest: &Guest,
        mount: &MountChoice,
    ) -> Result<Session> {
        Self::open_mounted_with(image_arg, image_args, guest, mount, false, false)
    }

    /// [`Session::open_mounted`], with the disk under a copy-on-write overlay and the
    /// filesystems mounted read-write when `overlay` (see [`Session::start_with_sources`]).
    /// With `nothing_ok`, a disk with no mountable filesystem at all (blank, encrypted,
    /// unknown) gives a session with nothing mounted and a warning, not an error.
    pub fn open_mounted_with(
        image_arg: &Path,
        image_args: &ImageSpec,
        guest: &Guest,
        mount: &MountChoice,
        overlay: bool,
        nothing_ok: bool,
    ) -> Result<Session> {
        vm::reaper::install_signal_handlers();
        let sources = open_disks(image_arg, image_args, guest)?;
        let key = read_key(guest)?;
        let mut s = Session::start_with_sources(image_arg, sources, overlay, key)?;
        let r = match s.mount_chosen(mount) {
            Err(Error::Filesystem { .. })
                if nothing_ok
                    && mount.mount.is_empty()
                    && !mount.inspect
                    && !vm::reaper::interrupted()
                    && s.filesystems
                        .as_deref()
                        .is_some_and(|l| inspect::root_candidates(l).is_empty()) =>
            {
                eprintln!(
                    "imgsafe: warning: {}: no filesystem found, nothing is mounted (the disk is /dev/vda)",
                    s.image.display()
                );
                Ok(())
            }
            r => r,
        };
        match r {
            Ok(()) => Ok(s),
            Err(e) => {
                let e = s.annotate(e);
                s.abort();
                Err(e)
            }
        }
    }

    /// What is mounted in the guest: (device, mountpoint), in mount order.
    pub fn mounts(&self) -> &[(String, String)] {
        &self.mounts
    }

    /// The files the image was decoded from (top first); `cp` never replaces them.
    pub fn image_files(&self) -> &[PathBuf] {
        &self.image_files
    }

    /// The image as the user named it.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// What the agent found on the disk (asked once, then remembered).
    pub fn filesystems(&mut self) -> Result<Vec<FsInfo>> {
        if self.filesystems.is_none() {
            let stage = trace::stage("probe");
            let list = self
                .agent
                .list_filesystems()
                .map_err(|e| self.annotate(e))?;
            stage.done(&format!("{} devices", list.len()));
            self.filesystems = Some(list);
        }
        Ok(self.filesystems.clone().unwrap_or_default())
    }

    /// Mount the tree the commands work on: the `-m` list (manual assembly); else, with
    /// `-i` or when the disk has several filesystems, the root found by inspection plus
    /// what its /etc/fstab lists; else the single filesystem (see [`choose`]).
    pub fn mount_chosen(&mut self, mount: &MountChoice) -> Result<()> {
        let list = self.filesystems()?;
        if !mount.mount.is_empty() {
            let plan =
                inspect::plan_manual(&mount.mount, &list).map_err(|what| self.fs_error(what))?;
            for p in &plan {
                self.mount_one(p)?;
            }
            return Ok(());
        }
        let candidates = inspect::root_candidates(&list);
        // A lone btrfs may keep its root in a subvolume: look for it too.
        let btrfs = candidates
            .iter()
            .any(|f| f.fstype.as_deref() == Some("btrfs"));
        if mount.inspect || candidates.len() > 1 || btrfs {
            match self.find_root(&list, !mount.inspect)? {
                Some(Root::Os(root, subvol)) => {
                    return self.mount_fstab(&root, subvol.as_ref(), &list)
                }
                // Looks like a Linux root but says nothing of its mounts: it alone.
                Some(Root::EtcOnly(_)) => return Ok(()),
                None => {}
            }
            if mount.inspect {
                return Err(self.fs_error(format!(
                    "no root filesystem (one with /etc/fstab or /etc/os-release) among {}",
                    inspect::describe(&list)
                )));
            }
        }
        let fs = choose(&list).map_err(|what| self.fs_error(what))?.clone();
        self.mount_one(&Planned {
            device: fs.device,
            fstype: fs.fstype,
            mountpoint: "/".into(),
            subvol: None,
        })
    }

    /// The root filesystem `ls` would mount without -m: one with /etc/fstab or
    /// /etc/os-release, else (of several) the only one with /etc. Nothing stays mounted.
    /// The flag says whether it is an installed OS's root (has one of those files).
    pub fn detect_root(&mut self) -> Result<Option<(FsInfo, bool)>> {
        let list = self.filesystems()?;
        let root = self.find_root(&list, inspect::root_candidates(&list).len() > 1)?;
        if root.is_some() {
            self.agent.unmount("/").map_err(|e| self.annotate(e))?;
            self.mounts.clear();
        }
        Ok(root.map(|r| match r {
            Root::Os(f, _) => (f, true),
            Root::EtcOnly(f) => (f, false),
        }))
    }

    /// Mount each root candidate at / in turn until one has a [`ROOT_MARKERS`] file; that
    /// one stays mounted. Failing that, with `etc_only`, the single candidate that has an
    /// /etc directory (mounted again); several such, or none, is no root.
    fn find_root(&mut self, list: &[FsInfo], etc_only: bool) -> Result<Option<Root>> {
        let stage = trace::stage("inspect");
        let mut with_etc: Vec<FsInfo> = Vec::new();
        for f in inspect::root_candidates(list) {
            match self.root_at(f, None)? {
                Some(RootKind::Os) => {
                    stage.done(&format!("root is {}", f.device));
                    self.mounts.push((f.device.clone(), "/".into()));
                    return Ok(Some(Root::Os(f.clone(), None)));
                }
                Some(RootKind::Etc) => with_etc.push(f.clone()),
                None => {}
            }
            if f.fstype.as_deref() != Some("btrfs") {
                continue;
            }
            if let Some(sv) = self.root_subvolume(f)? {
                stage.done(&format!("root is {}@{}", f.device, sv.path));
                self.mounts.push((f.device.clone(), "/".into()));
                return Ok(Some(Root::Os(f.clone(), Some(sv))));
            }
        }
        if let (true, [only]) = (etc_only, with_etc.as_slice()) {
            self.agent
                .mount(&only.device, "/", only.fstype.as_deref(), None)
                .map_err(|e| self.annotate(e))?;
            stage.done(&format!("root is {} (has /etc)", only.device));
            self.mounts.push((only.device.clone(), "/".into()));
            return Ok(Some(Root::EtcOnly(only.clone())));
        }
        stage.done("no root found");
        Ok(None)
    }

    /// Mount `f` (its subvolume `subvolid`, if given) at / and say whether it looks like
    /// a root; it stays mounted only when it has a [`ROOT_MARKERS`] file. None when it
    /// is not a root, or the kernel refuses it.
    fn root_at(&mut self, f: &FsInfo, subvolid: Option<u64>) -> Result<Option<RootKind>> {
        match self
            .agent
            .mount(&f.device, "/", f.fstype.as_deref(), subvolid)
        {
            Ok(_) => {}
            // A candidate the kernel refuses is simply not the root.
            Err(Error::Filesystem { .. }) => return Ok(None),
            Err(e) => return Err(self.annotate(e)),
        }
        for marker in ROOT_MARKERS {
            match self.agent.stat(marker) {
                Ok(_) => return Ok(Some(RootKind::Os)),
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(self.annotate(e)),
            }
        }
        let etc = match self.agent.stat(b"/etc") {
            Ok(e) if e.kind == FileType::Directory => Some(RootKind::Etc),
            Ok(_) | Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(self.annotate(e)),
        };
        self.agent.unmount("/").map_err(|e| self.annotate(e))?;
        Ok(etc)
    }

    /// The default subvolume's id and the subvolumes of the btrfs on `device`.
    pub fn subvolumes(&mut self, device: &str) -> Result<(u64, Vec<Subvolume>)> {
        self.subvolumes_of(device)
    }

    /// The subvolumes of the btrfs on `device` (asked once).
    fn subvolumes_of(&mut self, device: &str) -> Result<(u64, Vec<Subvolume>)> {
        if !self.subvolumes.contains_key(device) {
            let found = self
                .agent
                .subvolumes(device)
                .map_err(|e| self.annotate(e))?;
            self.subvolumes.insert(device.to_string(), found);
        }
        Ok(self.subvolumes[device].clone())
    }

    /// The subvolume of `f` other than its default one that holds an installed OS's
    /// root, left mounted at / (see [`inspect::root_subvolumes`] for the order).
    fn root_subvolume(&mut self, f: &FsInfo) -> Result<Option<Subvolume>> {
        let (default, list) = match self.subvolumes_of(&f.device) {
            Ok(found) => found,
            Err(Error::Filesystem { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        for sv in inspect::root_subvolumes(&list, default) {
            if self.root_at(f, Some(sv.id))? == Some(RootKind::Os) {
                return Ok(Some(sv.clone()));
            }
        }
        Ok(None)
    }

    /// With `root` mounted at /, mount what its /etc/fstab lists; entries that cannot be
    /// resolved or mounted are skipped with a one-line warning.
    fn mount_fstab(
        &mut self,
        root: &FsInfo,
        root_subvol: Option<&Subvolume>,
        list: &[FsInfo],
    ) -> Result<()> {
        let text = match self.read_fstab() {
            Ok(t) => t,
            Err(what) => {
                eprintln!(
                    "imgsafe: warning: /etc/fstab: {what}; only {} is mounted",
                    root.device
                );
                Vec::new()
            }
        };
        let (plan, warnings) =
            inspect::plan_fstab(&inspect::parse_fstab(&text), list, root, root_subvol);
        for w in warnings {
            eprintln!("imgsafe: warning: {w}");
        }
        for p in &plan {
            if let Err(e) = self.mount_one(p) {
                if vm::reaper::interrupted() || !matches!(e, Error::Filesystem { .. }) {
                    return Err(e);
                }
                let why = match e {
                    Error::Filesystem { what, .. } => what,
                    other => other.to_string(),
                };
                eprintln!(
                    "imgsafe: warning: /etc/fstab: {}: {}; skipped",
                    p.mountpoint,
                    inspect::shown(&why)
                );
            }
        }
        Ok(())
    }

    /// The root's /etc/fstab, bounded by [`inspect::MAX_FSTAB`]; empty when it has none.
    fn read_fstab(&mut self) -> std::result::Result<Vec<u8>, String> {
        match self.agent.stat(b"/etc/fstab") {
            Err(Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.to_string()),
            Ok(st) if st.size > inspect::MAX_FSTAB => {
                return Err(format!("{} bytes, more than imgsafe reads", st.size))
            }
            Ok(_) => {}
        }
        let mut out = Bounded {
            data: Vec::new(),
            limit: inspect::MAX_FSTAB,
        };
        match self.agent.read_file(b"/etc/fstab", &mut out) {
            Ok(_) => Ok(out.data),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Mount one filesystem of the tree.
    fn mount_one(&mut self, p: &Planned) -> Result<()> {
        let stage = trace::stage("mount");
        let subvolid = match &p.subvol {
            None => None,
            Some(sv) => {
                let (_, list) = self.subvolumes_of(&p.device)?;
                let Some(id) = sv.resolve(&list) else {
                    let name = match sv {
                        inspect::Subvol::Path(p) => inspect::shown(p),
                        inspect::Subvol::Id(id) => format!("id {id}"),
                    };
                    return Err(self.fs_error(format!("{}: no btrfs subvolume {name}", p.device)));
                };
                Some(id)
            }
        };
        let fstype = self
            .agent
            .mount(&p.device, &p.mountpoint, p.fstype.as_deref(), subvolid)
            .map_err(|e| self.annotate(e))?;
        stage.done(&format!("{} on {} ({fstype})", p.device, p.mountpoint));
        self.mounts.push((p.device.clone(), p.mountpoint.clone()));
        Ok(())
    }

    fn fs_error(&self, what: String) -> Error {
        Error::Filesystem {
            image: self.image.clone(),
            what,
        }
    }

    /// The image as the host reads it for the bulk data path: None when the mounts are
    /// writable (`--overlay`) or `IMGSAFE_BULK=0`.
    pub fn host_reader(&self) -> Option<crate::bulk::HostReader> {
        if self.agent.writable_mounts || std::env::var_os("IMGSAFE_BULK").is_some_and(|v| v == "0")
        {
            return None;
        }
        let source = self.bulk.clone()?;
        Some(crate::bulk::HostReader::new(
            source,
            vm::DiskSpec::serial(0),
        ))
    }

    /// The mounted guest filesystem.
    pub fn fs(&mut self) -> &mut dyn GuestFs {
        &mut self.agent
    }

    /// Name the image in an error (see [`Error::about_image`]), add what the guest
    /// console said when QEMU is gone, and turn any failure after a signal into
    /// [`Error::Interrupted`].
    pub fn annotate(&mut self, e: Error) -> Error {
        if vm::reaper::interrupted() {
            return Error::Interrupted;
        }
        let e = match e {
            e @ (Error::Appliance { .. }
            | Error::Guest { .. }
            | Error::GuestFrame(_)
            | Error::Vm(_))
                if self.vm.exit_status().is_some() =>
            {
                Error::QemuGone {
                    cause: Box::new(e),
                    said: diagnostics(&mut self.vm),
                }
            }
            other => other,
        };
        e.about_image(&self.image)
    }

    /// Run `f` on the session and always tear it down: a clean shutdown after
    /// success, and after a failure the error annotated (see [`Session::annotate`])
    /// and the VM killed.
    pub fn run<T>(mut self, f: impl FnOnce(&mut Session) -> Result<T>) -> Result<T> {
        match f(&mut self) {
            Ok(v) => self.finish().map(|()| v),
            Err(e) => {
                let e = self.annotate(e);
                self.abort();
                Err(e)
            }
        }
    }

    /// Shut the appliance down cleanly (agent unmounts, QEMU quits), then stop the NBD
    /// server.
    pub fn finish(mut self) -> Result<()> {
        let stage = trace::stage("shutdown");
        let _ = self.agent.set_timeout(Some(SHUTDOWN_GRACE));
        let bye = self.agent.shutdown();
        let _ = self.vm.shutdown(SHUTDOWN_GRACE);
        for n in self.nbd.drain(..) {
            n.stop();
        }
        stage.done("");
        if vm::reaper::interrupted() {
            return Err(Error::Interrupted);
        }
        match bye {
            // An agent that breaks the protocol on its way out is reported like any
            // other time it does.
            Err(e @ (Error::Guest { .. } | Error::GuestFrame(_))) => {
                Err(e.about_image(&self.image))
            }
            // The command's work is done and QEMU is stopped either way; a guest that
            // powered off before answering loses nothing (the image is never written,
            // an overlay is thrown away), so this is only worth a note.
            Err(e) => {
                trace::note(&format!("the agent's goodbye failed: {e}"));
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Tear down without asking the guest (after an error).
    pub fn abort(mut self) {
        let _ = self.vm.kill();
        for n in self.nbd.drain(..) {
            n.stop();
        }
    }
}

/// The disks of a session, each served on its own NBD socket in the run directory.
struct Served {
    /// One server per disk, in disk order.
    servers: Vec<nbd::Server>,
    /// How QEMU attaches each.
    disks: Vec<vm::DiskSpec>,
    /// The most the overlays can grow to (0 without `--overlay`).
    overlay_bytes: u64,
}

/// Serve each of `sources` over NBD in `dir` and describe it for QEMU; with `overlay`,
/// each gets an empty copy-on-write overlay there too.
fn serve_disks(
    dir: &Path,
    sources: Vec<(PathBuf, Arc<dyn BlockSource>)>,
    overlay: bool,
) -> Result<Served> {
    let mut served = Served {
        servers: Vec::new(),
        disks: Vec::new(),
        overlay_bytes: 0,
    };
    for (i, (name, source)) in sources.into_iter().enumerate() {
        let disk_size = source.size();
        image::check_vm_size(&name, disk_size)?;
        // The first disk keeps the socket name it always had.
        let nbd_sock = match i {
            0 => dir.join("nbd.sock"),
            _ => dir.join(format!("nbd{i}.sock")),
        };
        let nbd = nbd::Server::start(source, &nbd_sock, "").map_err(|source| {
            SessionError::NbdServer {
                socket: nbd_sock.clone(),
                source,
            }
        })?;
        served.servers.push(nbd);
        let overlay_file = dir.join(match i {
            0 => "overlay.qcow2".to_string(),
            _ => format!("overlay{i}.qcow2"),
        });
        if overlay {
            vm::qcow2::create(&overlay_file, disk_size).map_err(|source| {
                SessionError::Overlay {
                    path: overlay_file.clone(),
                    source,
                }
            })?;
            // An overlay grows to at most its disk plus its tables (~0.02%).
            served.overlay_bytes = served
                .overlay_bytes
                .saturating_add(disk_size)
                .saturating_add(disk_size / 256);
        }
        served.disks.push(vm::DiskSpec {
            nbd_socket: nbd_sock,
            export: String::new(),
            read_only: true,
            overlay: overlay.then_some(overlay_file),
        });
    }
    Ok(served)
}

/// What QEMU and the guest console said, for an error message: the guest's panic line
/// if there is one, else the last console lines.
fn diagnostics(vm: &mut Vm) -> String {
    let status = vm
        .exit_status()
        .map(|s| format!(" (QEMU exited: {s})"))
        .unwrap_or_default();
    let said = vm
        .console_panic()
        .or_else(|| vm.console_tail())
        .or_else(|| vm.messages_tail());
    let said: String = said
        .map(|t| {
            t.lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_string()
        })
        .filter(|t| !t.is_empty())
        .map(|t| format!("; guest said: {t}"))
        .unwrap_or_default();
    format!("{status}{said}")
}

/// Connect to the agent's socket and handshake (waiting for `disks`), failing early if
/// QEMU dies. The guest has `hello_timeout` to answer, counted in time it could run:
/// time QEMU spent waiting for a CPU (a host busy with other VMs or builds) is not
/// counted, so a loaded host slows the command down rather than failing it. Later
/// answers get `timeout` each.
fn connect_agent(
    vm: &mut Vm,
    timeout: Duration,
    hello_timeout: Duration,
    disks: &[String],
) -> Result<AgentClient> {
    let stream = vm.connect_agent()?;
    crate::agent_client::set_channel_timeout(&stream, Some(timeout))?;
    let started = std::time::Instant::now();
    let waited_before = vm.run_queue_wait();
    let mut keep_waiting = || {
        if vm::reaper::interrupted() || vm.exit_status().is_some() {
            return false;
        }
        let kept_off = vm.run_queue_wait().saturating_sub(waited_before);
        started.elapsed().saturating_sub(kept_off) < hello_timeout
    };
    match AgentClient::connect_waiting(stream, disks, &mut keep_waiting) {
        Ok(c) => Ok(c),
        Err(_) if vm::reaper::interrupted() => Err(Error::Interrupted),
        Err(e) => Err(Error::NoAnswer {
            what: format!(
                "the appliance did not start within {} s (IMGSAFE_TIMEOUT): {e}{}",
                hello_timeout.as_secs_f64(),
                diagnostics(vm)
            ),
        }),
    }
}

/// The VM config for this host and environment: accelerator (said once on stderr
/// when it is TCG), machine, debug flag; sockets and console log in `run_dir`.
pub fn vm_config(app: &appliance::Appliance, run_dir: &Path) -> Result<vm::VmConfig> {
    let (accel, note) = vm::accel::choose()?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let mut cfg = vm::VmConfig::new(accel, &app.kernel, &app.initrd, run_dir);
    cfg.root_ports = vm::config::MAX_DISKS;
    vm::machine::apply_env(&mut cfg).map_err(|e| Error::Usage(e.to_string()))?;
    if std::env::var_os("IMGSAFE_DEBUG").is_some() {
        cfg.extra_cmdline.push("imgsafe.debug=1".into());
    }
    Ok(cfg)
}

/// The config of a VM that saves or restores a warm state: `cfg` with
/// [`vm::config::TCG_WARM_CPUS`] vCPUs under TCG (KVM keeps its own choice).
pub fn warm_config(cfg: &vm::VmConfig) -> vm::VmConfig {
    let mut c = cfg.clone();
    if c.accel == vm::Accel::Tcg {
        c.cpus = vm::config::TCG_WARM_CPUS;
    }
    c
}

/// How long a restored guest may take to answer its hello (it answers in well under
/// a second; the bound is for a host busy with many sessions).
const RESTORED_HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU may take to save or to load a device state (tens of ms).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

/// A running VM with `disk` attached and the agent answering: restored from the saved
/// state for this configuration when there is one, else booted cold. The first cold
/// boot of a configuration boots without the disk, saves the state, and restores it.
/// Whatever goes wrong on the warm path is said in one `-v` line and ends in a plain
/// cold boot: the user never sees it fail.
fn boot(
    cfg: &vm::VmConfig,
    disks: &[vm::DiskSpec],
    timeout: Duration,
) -> Result<(Vm, AgentClient)> {
    if !warm::enabled().map_err(Error::Usage)? {
        return cold_boot(cfg, disks, timeout);
    }
    let store = match appliance::cache_root()
        .map_err(|e| e.to_string())
        .and_then(|root| warm::Store::open(&root).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(why) => {
            trace::note(&format!("warm start: {why}; booting cold"));
            return cold_boot(cfg, disks, timeout);
        }
    };
    let cold_cfg = cfg;
    let cfg = &warm_config(cfg);
    let key = warm::key(cfg);
    let memory = u64::from(cfg.memory_mib) << 20;
    let state = match store.lookup(&key, memory) {
        Ok(Some(state)) => Some(state),
        Ok(None) => None,
        Err(why) => {
            trace::note(&format!("warm start: {why}; removed"));
            store.discard_key(&key);
            None
        }
    };
    // Restore `state`; if that fails, say why in one `-v` line (`what` names the
    // attempt), remove the state and boot cold.
    let restore_or_cold =
        |state: &warm::State, what: &str| match restore(cfg, state, disks, timeout) {
            Ok(booted) => Ok(booted),
            Err(_) if vm::reaper::interrupted() => Err(Error::Interrupted),
            Err(e) => {
                trace::note(&format!(
                    "{what} failed ({e}); the saved state is removed, booting cold"
                ));
                store.discard(state);
                cold_boot(cold_cfg, disks, timeout)
            }
        };
    if let Some(state) = state {
        return restore_or_cold(&state, "warm start");
    }
    let pending = match store.begin_save(&key, memory) {
        Ok(Some(p)) => p,
        Ok(None) => {
            trace::note("warm start: another imgsafe is saving the state; booting cold");
            return cold_boot(cold_cfg, disks, timeout);
        }
        Err(why) => {
            trace::note(&format!("warm start: {why}; booting cold"));
            return cold_boot(cold_cfg, disks, timeout);
        }
    };
    let saved =
        save(cfg, &pending, timeout).and_then(|()| store.publish(pending).map_err(Error::from));
    match saved {
        Ok(state) => restore_or_cold(&state, "restoring the state just saved"),
        Err(_) if vm::reaper::interrupted() => Err(Error::Interrupted),
        Err(e) => {
            trace::note(&format!(
                "saving the appliance state failed ({e}); booting cold"
            ));
            cold_boot(cold_cfg, disks, timeout)
        }
    }
}

/// Boot with the disk attached from the start (no saved state involved). A boot whose
/// guest never answers is tried once more before the error is reported: under TCG on
/// a loaded host a guest very rarely goes silent during boot (seen twice in CI runs,
/// not in 200 cold boots in a row), and a second boot of the same appliance works.
/// The agent's boot milestones on the console say in the error how far it got.
fn cold_boot(
    cfg: &vm::VmConfig,
    disks: &[vm::DiskSpec],
    timeout: Duration,
) -> Result<(Vm, AgentClient)> {
    match cold_boot_once(cfg, disks, timeout) {
        Err(Error::NoAnswer { what }) if !vm::reaper::interrupted() => {
            trace::note(&format!("boot failed ({what}); booting once more"));
            cold_boot_once(cfg, disks, timeout)
        }
        r => r,
    }
}

fn cold_boot_once(
    cfg: &vm::VmConfig,
    disks: &[vm::DiskSpec],
    timeout: Duration,
) -> Result<(Vm, AgentClient)> {
    let stage = trace::stage("boot");
    // Sub-stage times for `-v`: QEMU start-up (until QMP answers), plugging the disk
    // in and resuming, then the guest's own boot until the agent answers.
    let t0 = std::time::Instant::now();
    let mut vm = Vm::launch(cfg)?;
    let t_qemu = t0.elapsed();
    // In order: the guest names them vda, vdb, ... as their root ports come.
    for disk in disks {
        match &disk.overlay {
            Some(overlay) => {
                vm.attach_nbd_disk_with_overlay(&disk.nbd_socket, &disk.export, overlay)?
            }
            None => vm.attach_nbd_disk(&disk.nbd_socket, &disk.export, disk.read_only)?,
        };
    }
    vm.start()?;
    let t_plug = t0.elapsed();
    let agent = connect_agent(&mut vm, timeout, timeout, &serials(disks))?;
    let t_all = t0.elapsed();
    stage.done(&format!(
        "{:?}, guest kernel {} (qemu {:.3}s, plug {:.3}s, guest {:.3}s)",
        cfg.accel,
        agent.kernel,
        t_qemu.as_secs_f64(),
        (t_plug - t_qemu).as_secs_f64(),
        (t_all - t_plug).as_secs_f64()
    ));
    Ok((vm, agent))
}

/// The virtio serials of `disks`, which the agent waits for.
fn serials(disks: &[vm::DiskSpec]) -> Vec<String> {
    (0u32..)
        .zip(disks)
        .map(|(i, _)| vm::DiskSpec::serial(i))
        .collect()
}

/// Boot with no disk until the agent answers, save the state into `pending`, and stop
/// that VM (the state is restored next, with the disk).
fn save(cfg: &vm::VmConfig, pending: &warm::Pending, timeout: Duration) -> Result<()> {
    let stage = trace::stage("boot");
    let mut c = cfg.clone();
    c.ram = vm::GuestRam::SaveTo(pending.ram.clone());
    let t0 = std::time::Instant::now();
    let mut vm = Vm::launch(&c)?;
    vm.start()?;
    let agent = connect_agent(&mut vm, timeout, timeout, &[])?;
    let t_boot = t0.elapsed();
    vm.save_state(&pending.dev, MIGRATION_TIMEOUT)?;
    vm.kill()?;
    stage.done(&format!(
        "{:?}, guest kernel {}, no disk; state saved (boot {:.3}s, save {:.3}s)",
        c.accel,
        agent.kernel,
        t_boot.as_secs_f64(),
        (t0.elapsed() - t_boot).as_secs_f64()
    ));
    Ok(())
}

/// Ask the kernel to read the saved RAM into the page cache now, in the background
/// (`POSIX_FADV_WILLNEED`), while QEMU starts. The restored guest touches tens of MiB
/// of it in random order; where the cache lost the file (memory pressure, a proactive
/// reclaimer) one sequential readahead costs far less than that many page faults.
fn prefetch(ram: &Path) {
    if let Ok(f) = std::fs::File::open(ram) {
        // SAFETY: advice on a descriptor we own; no memory is passed.
        unsafe {
            libc::posix_fadvise(
                std::os::unix::io::AsRawFd::as_raw_fd(&f),
                0,
                0,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }
}

/// Start QEMU on a saved state with `disk` on its command line, let the guest run, and
/// handshake; the agent rescans PCI and waits for the disk.
fn restore(
    cfg: &vm::VmConfig,
    state: &warm::State,
    disks: &[vm::DiskSpec],
    timeout: Duration,
) -> Result<(Vm, AgentClient)> {
    let stage = trace::stage("restore");
    prefetch(&state.ram);
    let mut c = cfg.clone();
    c.ram = vm::GuestRam::RestoreFrom(state.ram.clone());
    c.incoming = true;
    c.disks = disks.to_vec();
    let t0 = std::time::Instant::now();
    let mut vm = Vm::launch(&c)?;
    let t_qemu = t0.elapsed();
    vm.restore_state(&state.dev, MIGRATION_TIMEOUT)?;
    vm.start()?;
    let t_restore = t0.elapsed();
    let agent = connect_agent(
        &mut vm,
        timeout,
        timeout.min(RESTORED_HELLO_TIMEOUT),
        &serials(disks),
    )?;
    let t_all = t0.elapsed();
    stage.done(&format!(
        "{:?}, guest kernel {} (qemu {:.3}s, restore {:.3}s, guest and disk {:.3}s)",
        c.accel,
        agent.kernel,
        t_qemu.as_secs_f64(),
        (t_restore - t_qemu).as_secs_f64(),
        (t_all - t_restore).as_secs_f64()
    ));
    Ok((vm, agent))
}

/// Pick the filesystem to mount at `/` when the user gave no `-m` (a `-m` is resolved
/// by [`inspect::find_device`]): the single mountable filesystem; with several, an
/// error that lists them and says how to pick one (the session has looked for a root
/// among them first, see `find_root`).
pub fn choose(list: &[FsInfo]) -> std::result::Result<&FsInfo, String> {
    let mountable: Vec<&FsInfo> = list.iter().filter(|f| inspect::is_mountable(f)).collect();
    match mountable.as_slice() {
        [] => Err("no filesystem found in the image".into()),
        [one] => Ok(one),
        // The session looked for a Linux root (/etc) among them before asking here.
        several => Err(format!(
            "several filesystems found and none looks like a Linux root (has /etc): {}; choose one with -m DEVICE or -m PARTITION-NUMBER",
            describe(several)
        )),
    }
}

/// A writer that refuses to grow past `limit` bytes (hostile files are read bounded).
struct Bounded {
    data: Vec<u8>,
    limit: u64,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.data.len() as u64).saturating_add(buf.len() as u64) > self.limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "file larger than the limit",
            ));
        }
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn describe(list: &[&FsInfo]) -> String {
    if list.is_empty() {
        return "nothing mountable".into();
    }
    list.iter()
        .map(|f| format!("{} ({})", f.device, f.fstype.as_deref().unwrap_or("?")))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(device: &str, fstype: Option<&str>, partition: Option<u32>) -> FsInfo {
        FsInfo {
            device: device.into(),
            size: 1 << 20,
            fstype: fstype.map(Into::into),
            label: None,
            uuid: None,
            partition,
            partuuid: None,
            partitioned: partition.is_none() && fstype.is_none(),
        }
    }

    #[test]
    fn warm_states_have_one_vcpu_under_tcg_and_keep_kvms_choice() {
        let dir = tempfile::tempdir().unwrap();
        let tcg = vm::VmConfig::new(vm::Accel::Tcg, Path::new("/k"), Path::new("/i"), dir.path());
        let kvm = vm::VmConfig::new(vm::Accel::Kvm, Path::new("/k"), Path::new("/i"), dir.path());

        assert_eq!(warm_config(&tcg).cpus, vm::config::TCG_WARM_CPUS);
        assert_eq!(tcg.cpus, vm::config::TCG_CPUS);
        assert_eq!(warm_config(&kvm).cpus, kvm.cpus);
    }

    #[test]
    fn single_filesystem_is_chosen() {
        let list = vec![fs("/dev/vda", Some("ext4"), None)];

        let f = choose(&list).unwrap();

        assert_eq!(f.device, "/dev/vda");
    }

    #[test]
    fn filesystem_type_alone_does_not_pick_one_of_several() {
        // vfat beside an ext4 without /etc: the type says nothing of which the user wants.
        let list = vec![
            fs("/dev/vda", None, None),
            fs("/dev/vda1", Some("vfat"), Some(1)),
            fs("/dev/vda2", Some("ext4"), Some(2)),
        ];

        let err = choose(&list).unwrap_err();

        assert!(
            err.contains("/dev/vda1 (vfat)")
                && err.contains("/dev/vda2 (ext4)")
                && err.contains("-m"),
            "{err}"
        );
    }

    #[test]
    fn ambiguous_disk_lists_the_choices() {
        let list = vec![
            fs("/dev/vda1", Some("ext4"), Some(1)),
            fs("/dev/vda2", Some("xfs"), Some(2)),
        ];

        let err = choose(&list).unwrap_err();

        assert!(
            err.contains("/dev/vda1 (ext4)")
                && err.contains("/dev/vda2 (xfs)")
                && err.contains("-m"),
            "{err}"
        );
    }

    #[test]
    fn nothing_mountable_is_an_error() {
        let list = vec![
            fs("/dev/vda", None, None),
            fs("/dev/vda1", Some("swap"), Some(1)),
        ];

        assert_eq!(
            choose(&list).unwrap_err(),
            "no filesystem found in the image"
        );
    }
}
