//! The typed description of one appliance VM and the QEMU command line it becomes.
//!
//! [`VmConfig::argv`] is pure: the same config always gives the same arguments, so the
//! whole command line is checked by unit tests (and once against the real QEMU in
//! tests/vm.rs). Everything impure (host TSC, accelerator probing) is decided before
//! and stored in the config.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The QEMU binary looked up on `PATH` when none is configured.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// Guest memory: enough for the kernel, the initramfs (about 46 MB) unpacked in RAM
/// beside its own image while it unpacks, and page cache for reading files. 192 MiB
/// was too little once mdadm and cryptsetup joined the initramfs: the kernel stopped
/// unpacking ("write error") and the archive's tail was missing. Guest memory is only
/// allocated as the guest touches it, so the headroom costs nothing until used.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// vCPUs under KVM: the appliance does one job at a time.
pub const DEFAULT_CPUS: u32 = 1;
/// vCPUs under TCG. With a single present CPU the kernel rewrites every `lock` prefix
/// of its text for uniprocessor use, one `text_poke` (a page-table switch and TLB
/// flush) each, which under TCG costs about 0.15 s of boot; bringing up a second vCPU
/// is cheaper. Measured with `imgsafe -v ls`: boot median 1.76 s against 2.08 s.
pub const TCG_CPUS: u32 = 2;
/// vCPUs of a VM restored from a saved state under TCG (the state is saved with as
/// many). The UP-patching cost above is paid once, when the state is saved; after
/// that one vCPU is as fast for one command and faster for many at once, since two
/// vCPUs per VM on an overcommitted host wait on each other. Measured on 2 cores,
/// warm `ls` (release build, medians of 4 interleaved rounds): one at a time 0.44 s
/// with 1 vCPU, 0.54 s with 2, 0.42 s with 2 on one TCG thread (`thread=single`);
/// 8 at once 2.14 s, 2.74 s and 2.49 s.
pub const TCG_WARM_CPUS: u32 = 1;
/// Most disks one VM takes (the image and up to seven `--add`): an appliance VM always
/// has this many PCIe root ports, so that one saved warm state serves every number of
/// disks (its machine is fixed before any disk exists). Empty ports cost no measurable
/// boot time: CPU time of a cold `ls` under TCG, medians of 13, 2.89 s with 8 ports
/// against 2.91 s with 1.
pub const MAX_DISKS: u32 = 8;
/// QEMU id of the virtio-serial controller carrying the agent port.
pub const SERIAL_CONTROLLER_ID: &str = "vser0";
/// QEMU chardev id of the agent channel.
pub const AGENT_CHARDEV_ID: &str = "agent";
/// Kernel arguments every appliance boot gets, before the caller's extras.
///
/// - `console=ttyS0`: the console goes to the serial port, i.e. the console log file.
/// - `quiet`: printing to an emulated UART is slow under TCG.
/// - `panic=-1`: reboot at once on panic; with `-no-reboot` QEMU then exits, so a
///   crashed guest is seen as a dead process instead of a hang.
/// - `pcie_ports=native`: let Linux drive the root ports (hot-plug) without ACPI _OSC.
/// - [`imgsafe_proto::APPLIANCE_MARKER`]: the kernel hands it to /init as an
///   environment variable; it is what makes the binary the guest agent (never its pid:
///   a container runs its entrypoint as PID 1 too).
/// - `cryptomgr.notests`: skip crypto self-tests, a measurable part of boot under TCG.
/// - `initcall_blacklist=...`: two built-in initcalls the appliance never needs, the
///   SP800-108 KDF self-test and the kprobe-events tracer set-up. Skipping them cut the
///   guest's boot under TCG from 1.34 s to 1.13 s (medians of 8, alternating runs).
pub const BASE_CMDLINE: &[&str] = &[
    imgsafe_proto::APPLIANCE_MARKER,
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "pcie_ports=native",
    "cryptomgr.notests",
    "initcall_blacklist=crypto_kdf108_init,init_kprobe_trace",
];

/// CPU model under TCG. A plain x86-64 CPU with SSE4.2 (for crc32c) boots the
/// appliance about 0.4 s faster than `-cpu max`, measured to the start of /init on
/// these machines (0.96 s against 1.35-1.45 s): every extra feature `max` offers is
/// emulated, and the kernel spends boot time setting them up.
pub const TCG_CPU: &str = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt";

/// Id of the memory backend object when guest RAM is a file (see [`GuestRam`]).
pub const RAM_BACKEND_ID: &str = "ram";

/// Where guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRam {
    /// Anonymous memory of the QEMU process (the default).
    Anonymous,
    /// A file mapped shared: every page the guest writes lands in it, so once the VM
    /// is stopped the file *is* the RAM of a saved state, and only the device state
    /// needs migrating (`x-ignore-shared`).
    SaveTo(PathBuf),
    /// A saved RAM file, opened read-only and mapped private: pages are read from the
    /// file (through the page cache, so concurrent sessions share them) and the guest's
    /// writes are copy-on-write in this process only. The file never changes.
    RestoreFrom(PathBuf),
}

/// A disk given on the command line (cold-plugged): an NBD export, optionally under a
/// copy-on-write overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The Unix socket the NBD server listens on.
    pub nbd_socket: PathBuf,
    /// Export name.
    pub export: String,
    /// Open the export read-only (the device then has `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// An empty qcow2 file to take the guest's writes (see [`super::qcow2`]).
    pub overlay: Option<PathBuf>,
}

impl DiskSpec {
    /// Block node name of disk `index`.
    pub fn node(index: u32) -> String {
        format!("disk{index}")
    }

    /// Device id of disk `index`.
    pub fn device_id(index: u32) -> String {
        format!("vd{index}")
    }

    /// The virtio-blk serial of disk `index` (`/sys/block/vdX/serial` in the guest).
    pub fn serial(index: u32) -> String {
        format!("imgsafe{index}")
    }

    /// The `blockdev-add` arguments for disk `index`, bottom node first. `None` when a
    /// path is not UTF-8 (QMP and JSON options are text).
    pub fn blockdevs(&self, index: u32) -> Option<Vec<serde_json::Value>> {
        let node = Self::node(index);
        let mut nodes = vec![serde_json::json!({
            "driver": "nbd",
            "node-name": node,
            "server": {"type": "unix", "path": self.nbd_socket.to_str()?},
            "export": self.export,
            "read-only": self.read_only,
        })];
        if let Some(overlay) = &self.overlay {
            nodes.push(serde_json::json!({
                "driver": "qcow2",
                "node-name": format!("{node}-overlay"),
                "file": {"driver": "file", "filename": overlay.to_str()?},
                "backing": node,
                "read-only": false,
            }));
        }
        Some(nodes)
    }

    /// The `device_add` arguments for disk `index`, in root port `index`.
    pub fn device(&self, index: u32) -> serde_json::Value {
        let node = Self::node(index);
        let drive = match self.overlay {
            Some(_) => format!("{node}-overlay"),
            None => node,
        };
        serde_json::json!({
            "driver": "virtio-blk-pci",
            "drive": drive,
            "bus": root_port_id(index),
            "id": Self::device_id(index),
            "serial": Self::serial(index),
        })
    }
}

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation (works everywhere, slower).
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` option and `IMGSAFE_ACCEL` use.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The emulated machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// QEMU's minimal `microvm` with a PCIe host bridge: no firmware tables to build,
    /// no legacy devices, fastest to boot.
    Microvm,
    /// The standard `q35` PC, for QEMU builds or kernels where microvm does not work.
    Q35,
}

/// Everything needed to start one appliance VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The QEMU binary (a bare name is looked up on `PATH`).
    pub qemu: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Machine type.
    pub machine: Machine,
    /// Firmware given with `-bios` (qboot for microvm); `None` keeps QEMU's default.
    pub firmware: Option<PathBuf>,
    /// Kernel: an uncompressed ELF `vmlinux` (booted through PVH, fastest) or a bzImage.
    pub kernel: PathBuf,
    /// Initramfs (an uncompressed cpio loads fastest).
    pub initrd: PathBuf,
    /// Kernel arguments appended after [`BASE_CMDLINE`] and `tsc_early_khz`, one word each.
    pub extra_cmdline: Vec<String>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Host TSC frequency passed as `tsc_early_khz`. Under TCG the guest TSC runs at the
    /// host's rate, and microvm has no other clock to calibrate it against early enough:
    /// without it the kernel hangs at boot about one time in four.
    pub tsc_khz: Option<u64>,
    /// Where QEMU listens for QMP (a Unix socket it creates).
    pub qmp_socket: PathBuf,
    /// Where QEMU listens for the agent channel (a Unix socket it creates).
    pub agent_socket: PathBuf,
    /// File receiving the guest serial console; `None` discards it.
    pub console_log: Option<PathBuf>,
    /// Largest file QEMU may write (its RLIMIT_FSIZE): the console log, its messages,
    /// and a copy-on-write overlay if one is attached.
    pub max_file_bytes: u64,
    /// Number of PCIe root ports (`rp0`, `rp1`, ...) to plug disks into, at least 1.
    pub root_ports: u32,
    /// Confine QEMU with its seccomp filter (`-sandbox on`, denying obsolete calls,
    /// privilege changes, spawning processes and resource control).
    pub sandbox: bool,
    /// Where guest RAM lives (a file when saving or restoring a state).
    pub ram: GuestRam,
    /// Wait for an incoming migration (`-incoming defer`): the VM is restored from a
    /// saved state over QMP instead of booting.
    pub incoming: bool,
    /// Disks plugged in on the command line, into root ports 0, 1, ...
    pub disks: Vec<DiskSpec>,
}

impl VmConfig {
    /// A config with the defaults, keeping its sockets and console log in `run_dir`
    /// (a private directory the caller owns). `tsc_khz` is taken from the host only
    /// for TCG (under KVM the guest gets kvm-clock); the machine is microvm when QEMU
    /// has qboot to boot it with, else q35 ([`super::machine`]).
    pub fn new(accel: Accel, kernel: &Path, initrd: &Path, run_dir: &Path) -> VmConfig {
        let tsc_khz = match accel {
            Accel::Tcg => super::tsc::host_tsc_khz(),
            Accel::Kvm => None,
        };
        let qemu = PathBuf::from(DEFAULT_QEMU);
        let (machine, firmware) = super::machine::auto(&qemu);
        VmConfig {
            qemu,
            accel,
            machine,
            firmware,
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            extra_cmdline: Vec::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: match accel {
                Accel::Tcg => TCG_CPUS,
                Accel::Kvm => DEFAULT_CPUS,
            },
            tsc_khz,
            qmp_socket: run_dir.join("qmp.sock"),
            agent_socket: run_dir.join("agent.sock"),
            console_log: Some(run_dir.join("console.log")),
            max_file_bytes: super::process::MAX_QEMU_FILE_BYTES,
            root_ports: 1,
            sandbox: true,
            ram: GuestRam::Anonymous,
            incoming: false,
            disks: Vec::new(),
        }
    }

    /// The kernel command line given with `-append`.
    pub fn cmdline(&self) -> String {
        let mut words: Vec<String> = BASE_CMDLINE.iter().map(|w| w.to_string()).collect();
        if let Some(khz) = self.tsc_khz {
            words.push(format!("tsc_early_khz={khz}"));
        }
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// The QEMU arguments (without the program name). Pure.
    pub fn argv(&self) -> Vec<OsString> {
        let mut a = Argv::default();
        // No default devices, no config files, no window: only what is listed here
        // exists in the VM. With `-nodefaults` there is no network card either; `-nic
        // none` says so explicitly.
        a.words(&[
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
        ]);
        let mut machine = OsString::from(self.machine_arg());
        if self.ram != GuestRam::Anonymous {
            machine.push(format!(",memory-backend={RAM_BACKEND_ID}"));
        }
        a.pair("-M", machine);
        if let Some(firmware) = &self.firmware {
            a.pair("-bios", firmware.as_os_str());
        }
        if self.machine == Machine::Q35 {
            // q35 hot-plugs into root ports through ACPI by default and then shows the
            // ports' native slots as empty; the guest drives them natively
            // (`pcie_ports=native`) and would power the disk's slot off.
            a.pair(
                "-global",
                "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            );
        }
        match self.accel {
            Accel::Tcg => a.words(&["-accel", "tcg", "-cpu", TCG_CPU]),
            Accel::Kvm => a.words(&["-accel", "kvm", "-cpu", "host"]),
        }
        a.pair("-m", self.memory_mib.to_string());
        let backend = format!(
            "memory-backend-file,id={RAM_BACKEND_ID},size={}M,mem-path=",
            self.memory_mib
        );
        match &self.ram {
            GuestRam::Anonymous => {}
            GuestRam::SaveTo(file) => {
                let mut v = keyval(&backend, file);
                v.push(",share=on");
                a.pair("-object", v);
            }
            GuestRam::RestoreFrom(file) => {
                // readonly=on + rom=off: the file is opened read-only but mapped
                // writable and private, so the guest runs and the file stays as saved.
                let mut v = keyval(&backend, file);
                v.push(",share=off,readonly=on,rom=off");
                a.pair("-object", v);
            }
        }
        a.pair("-smp", self.cpus.max(1).to_string());
        a.pair("-kernel", self.kernel.as_os_str());
        a.pair("-initrd", self.initrd.as_os_str());
        a.pair("-append", self.cmdline());
        match &self.console_log {
            Some(log) => {
                a.pair("-chardev", keyval("file,id=console,path=", log));
                a.pair("-serial", "chardev:console");
            }
            None => a.pair("-serial", "null"),
        }
        // A guest reboot (and `panic=-1`) makes QEMU exit instead of booting again.
        a.word("-no-reboot");
        // Start paused: the disk is plugged over QMP before the guest looks for it.
        a.word("-S");
        if self.incoming {
            a.pair("-incoming", "defer");
        }
        a.pair(
            "-chardev",
            keyval("socket,id=qmp,server=on,wait=off,path=", &self.qmp_socket),
        );
        a.pair("-mon", "chardev=qmp,mode=control");
        // The agent port sits on PCIe like the disks, so the guest needs one virtio
        // transport driver (virtio_pci), not two. Port 0 is reserved for a console, so
        // the agent is port 1; two ports means two virtqueue pairs for the guest to set
        // up instead of the default 31.
        a.pair(
            "-device",
            format!("virtio-serial-pci,id={SERIAL_CONTROLLER_ID},max_ports=2"),
        );
        a.pair(
            "-chardev",
            keyval(
                &format!("socket,id={AGENT_CHARDEV_ID},server=on,wait=off,path="),
                &self.agent_socket,
            ),
        );
        a.pair(
            "-device",
            format!(
                "virtserialport,bus={SERIAL_CONTROLLER_ID}.0,chardev={AGENT_CHARDEV_ID},name={}",
                imgsafe_proto::PORT_NAME
            ),
        );
        // No power controller: QEMU powers an empty slot with one off, and a slot that
        // was empty when a state was saved would keep the disk plugged in after the
        // restore unpowered and invisible. Without one the disk shows up on a PCI
        // rescan, with no hot-plug event and none of the slot's settle delays.
        for i in 0..self.root_ports.max(1) {
            a.pair(
                "-device",
                format!(
                    "pcie-root-port,id={},chassis={},power_controller_present=off",
                    root_port_id(i),
                    i + 1
                ),
            );
        }
        for (i, disk) in (0u32..).zip(&self.disks) {
            // Paths were checked to be UTF-8 when the config was made (see
            // `Vm::launch`); a disk that cannot be described is left out and the
            // guest's wait for it fails.
            for node in disk.blockdevs(i).unwrap_or_default() {
                a.pair("-blockdev", node.to_string());
            }
            a.pair("-device", disk.device(i).to_string());
        }
        a.pair("-nic", "none");
        if self.sandbox {
            a.pair(
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            );
        }
        a.0
    }

    /// The `-M` value.
    fn machine_arg(&self) -> &'static str {
        match self.machine {
            // No option ROMs to load (qboot loads the kernel itself), an ISA UART for the
            // console, an RTC so the guest has wall-clock time; the virtio-mmio slots are
            // unused, so keep them off the kernel command line.
            Machine::Microvm => {
                "microvm,pcie=on,x-option-roms=off,isa-serial=on,rtc=on,auto-kernel-cmdline=off"
            }
            Machine::Q35 => "q35",
        }
    }
}

/// The QEMU id of root port number `index`.
pub fn root_port_id(index: u32) -> String {
    format!("rp{index}")
}

/// `prefix` followed by `path`, with commas doubled: QEMU's option syntax
/// (`key=value,key=value`) reads a single comma inside a value as a separator.
fn keyval(prefix: &str, path: &Path) -> OsString {
    let mut bytes = prefix.as_bytes().to_vec();
    for &b in path.as_os_str().as_bytes() {
        bytes.push(b);
        if b == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

/// Builder for an argument vector.
#[derive(Default)]
struct Argv(Vec<OsString>);

impl Argv {
    fn word(&mut self, w: impl AsRef<OsStr>) {
        self.0.push(w.as_ref().to_os_string());
    }
    fn words(&mut self, ws: &[&str]) {
        for w in ws {
            self.word(w);
        }
    }
    fn pair(&mut self, option: &str, value: impl AsRef<OsStr>) {
        self.word(option);
        self.word(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(accel: Accel) -> VmConfig {
        VmConfig {
            qemu: PathBuf::from(DEFAULT_QEMU),
            accel,
            machine: Machine::Microvm,
            firmware: Some(PathBuf::from("/usr/share/qemu/qboot.rom")),
            kernel: PathBuf::from("/cache/vmlinux"),
            initrd: PathBuf::from("/cache/initrd.cpio"),
            extra_cmdline: vec!["rdinit=/init".to_string()],
            memory_mib: 192,
            cpus: 1,
            tsc_khz: match accel {
                Accel::Tcg => Some(2_095_078),
                Accel::Kvm => None,
            },
            qmp_socket: PathBuf::from("/run/x/qmp.sock"),
            agent_socket: PathBuf::from("/run/x/agent.sock"),
            console_log: Some(PathBuf::from("/run/x/console.log")),
            max_file_bytes: 1 << 20,
            root_ports: 1,
            sandbox: true,
            ram: GuestRam::Anonymous,
            incoming: false,
            disks: Vec::new(),
        }
    }

    fn strings(argv: Vec<OsString>) -> Vec<String> {
        argv.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
    const MICROVM: &str =
        "microvm,pcie=on,x-option-roms=off,isa-serial=on,rtc=on,auto-kernel-cmdline=off";

    #[test]
    fn argv_microvm_tcg_is_exact() {
        let cfg = sample(Accel::Tcg);

        let argv = strings(cfg.argv());

        let expected = [
            "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
            "-M", MICROVM, "-bios", "/usr/share/qemu/qboot.rom",
            "-accel", "tcg", "-cpu", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt",
            "-m", "192", "-smp", "1",
            "-kernel", "/cache/vmlinux", "-initrd", "/cache/initrd.cpio",
            "-append", "imgsafe_appliance=1 console=ttyS0 quiet panic=-1 pcie_ports=native cryptomgr.notests initcall_blacklist=crypto_kdf108_init,init_kprobe_trace tsc_early_khz=2095078 rdinit=/init",
            "-chardev", "file,id=console,path=/run/x/console.log", "-serial", "chardev:console",
            "-no-reboot", "-S",
            "-chardev", "socket,id=qmp,server=on,wait=off,path=/run/x/qmp.sock",
            "-mon", "chardev=qmp,mode=control",
            "-device", "virtio-serial-pci,id=vser0,max_ports=2",
            "-chardev", "socket,id=agent,server=on,wait=off,path=/run/x/agent.sock",
            "-device", "virtserialport,bus=vser0.0,chardev=agent,name=org.imgsafe.agent",
            "-device", "pcie-root-port,id=rp0,chassis=1,power_controller_present=off",
            "-nic", "none",
            "-sandbox", SANDBOX,
        ];
        assert_eq!(argv, expected);
    }

    #[test]
    fn argv_microvm_kvm_is_exact() {
        let mut cfg = sample(Accel::Kvm);
        cfg.extra_cmdline.clear();
        cfg.console_log = None;
        cfg.root_ports = 2;
        cfg.memory_mib = 256;
        cfg.cpus = 2;

        let argv = strings(cfg.argv());

        let expected = [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
            "-M",
            MICROVM,
            "-bios",
            "/usr/share/qemu/qboot.rom",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256",
            "-smp",
            "2",
            "-kernel",
            "/cache/vmlinux",
            "-initrd",
            "/cache/initrd.cpio",
            "-append",
            "imgsafe_appliance=1 console=ttyS0 quiet panic=-1 pcie_ports=native cryptomgr.notests initcall_blacklist=crypto_kdf108_init,init_kprobe_trace",
            "-serial",
            "null",
            "-no-reboot",
            "-S",
            "-chardev",
            "socket,id=qmp,server=on,wait=off,path=/run/x/qmp.sock",
            "-mon",
            "chardev=qmp,mode=control",
            "-device",
            "virtio-serial-pci,id=vser0,max_ports=2",
            "-chardev",
            "socket,id=agent,server=on,wait=off,path=/run/x/agent.sock",
            "-device",
            "virtserialport,bus=vser0.0,chardev=agent,name=org.imgsafe.agent",
            "-device",
            "pcie-root-port,id=rp0,chassis=1,power_controller_present=off",
            "-device",
            "pcie-root-port,id=rp1,chassis=2,power_controller_present=off",
            "-nic",
            "none",
            "-sandbox",
            SANDBOX,
        ];
        assert_eq!(argv, expected);
    }

    #[test]
    fn argv_q35_without_sandbox() {
        let mut cfg = sample(Accel::Tcg);
        cfg.machine = Machine::Q35;
        cfg.firmware = None;
        cfg.sandbox = false;

        let argv = strings(cfg.argv());

        assert_eq!(
            argv[5..11],
            [
                "-M",
                "q35",
                "-global",
                "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                "-accel",
                "tcg"
            ]
        );
        assert!(!argv.iter().any(|a| a == "-sandbox"));
    }

    #[test]
    fn commas_in_socket_paths_are_doubled() {
        let mut cfg = sample(Accel::Tcg);
        cfg.qmp_socket = PathBuf::from("/tmp/a,b/qmp.sock");

        let argv = strings(cfg.argv());

        assert!(
            argv.contains(&"socket,id=qmp,server=on,wait=off,path=/tmp/a,,b/qmp.sock".to_string())
        );
    }

    #[test]
    fn non_utf8_paths_pass_through_unchanged() {
        let mut cfg = sample(Accel::Tcg);
        cfg.kernel = PathBuf::from(OsString::from_vec(b"/k\xffernel".to_vec()));

        let argv = cfg.argv();

        assert!(argv.contains(&OsString::from_vec(b"/k\xffernel".to_vec())));
    }

    #[test]
    fn zero_root_ports_still_gives_one() {
        let mut cfg = sample(Accel::Tcg);
        cfg.root_ports = 0;

        let ports = strings(cfg.argv())
            .iter()
            .filter(|a| a.starts_with("pcie-root-port"))
            .count();

        assert_eq!(ports, 1);
    }

    #[test]
    fn saving_maps_ram_from_a_shared_file() {
        let mut cfg = sample(Accel::Tcg);
        cfg.ram = GuestRam::SaveTo(PathBuf::from("/cache/w/ram,1"));

        let argv = strings(cfg.argv());

        assert!(argv.contains(&format!("{MICROVM},memory-backend=ram")));
        assert!(argv.contains(
            &"memory-backend-file,id=ram,size=192M,mem-path=/cache/w/ram,,1,share=on".to_string()
        ));
        assert!(!argv.contains(&"-incoming".to_string()));
    }

    #[test]
    fn restoring_maps_the_saved_ram_private_and_read_only_and_waits_for_migration() {
        let mut cfg = sample(Accel::Tcg);
        cfg.ram = GuestRam::RestoreFrom(PathBuf::from("/cache/w/ram"));
        cfg.incoming = true;

        let argv = strings(cfg.argv());

        assert!(argv.contains(
            &"memory-backend-file,id=ram,size=192M,mem-path=/cache/w/ram,share=off,readonly=on,rom=off"
                .to_string()
        ));
        let i = argv.iter().position(|a| a == "-incoming").unwrap();
        assert_eq!(argv[i + 1], "defer");
    }

    #[test]
    fn command_line_disks_are_blockdevs_in_root_ports() {
        let mut cfg = sample(Accel::Tcg);
        cfg.disks = vec![DiskSpec {
            nbd_socket: PathBuf::from("/run/x/nbd.sock"),
            export: String::new(),
            read_only: true,
            overlay: Some(PathBuf::from("/run/x/overlay.qcow2")),
        }];

        let argv = strings(cfg.argv());

        let blockdevs: Vec<serde_json::Value> = argv
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(blockdevs[0]["driver"], "nbd");
        assert_eq!(blockdevs[0]["read-only"], true);
        assert_eq!(blockdevs[0]["server"]["path"], "/run/x/nbd.sock");
        assert_eq!(blockdevs[1]["driver"], "qcow2");
        assert_eq!(blockdevs[1]["backing"], "disk0");
        let device = argv.iter().find(|a| a.contains("virtio-blk-pci")).unwrap();
        let device: serde_json::Value = serde_json::from_str(device).unwrap();
        assert_eq!(device["drive"], "disk0-overlay");
        assert_eq!(device["bus"], "rp0");
        assert_eq!(device["serial"], "imgsafe0");
    }

    #[test]
    fn new_puts_sockets_in_run_dir() {
        let cfg = VmConfig::new(
            Accel::Kvm,
            Path::new("/k"),
            Path::new("/i"),
            Path::new("/run/d"),
        );

        assert_eq!(
            (
                cfg.qmp_socket,
                cfg.agent_socket,
                cfg.console_log,
                cfg.tsc_khz,
                cfg.memory_mib
            ),
            (
                PathBuf::from("/run/d/qmp.sock"),
                PathBuf::from("/run/d/agent.sock"),
                Some(PathBuf::from("/run/d/console.log")),
                None,
                DEFAULT_MEMORY_MIB
            )
        );
    }

    #[test]
    fn new_gives_tcg_two_vcpus_and_kvm_one() {
        let (k, i, d) = (Path::new("/k"), Path::new("/i"), Path::new("/run/d"));

        let tcg = VmConfig::new(Accel::Tcg, k, i, d);
        let kvm = VmConfig::new(Accel::Kvm, k, i, d);

        assert_eq!((tcg.cpus, kvm.cpus), (TCG_CPUS, DEFAULT_CPUS));
        assert!(strings(tcg.argv())
            .windows(2)
            .any(|w| w[0] == "-smp" && w[1] == "2"));
    }
}
