//! The VM layer against the real qemu-system-x86_64: the argv is accepted, QMP works,
//! an NBD export (served by qemu-nbd here) plugs in read-only, and QEMU never survives
//! its `Vm` — on shutdown, on drop, on SIGTERM to imgsafe, on SIGKILL of imgsafe.
//!
//! The VM is launched paused (`-S`), so the kernel is loaded but not run, except in the
//! boot test, which runs a real kernel into a panic to check that QEMU then exits.

use imgsafe::vm::{reaper, Accel, Machine, Vm, VmConfig, VmError};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Env var that turns [`helper_hold_vm`] on in a child test process.
const HELPER_ENV: &str = "IMGSAFE_VM_TEST_HELPER_DIR";

/// Fail (never skip) when a tool is missing, naming its Debian package.
fn require_tool(tool: &str, package: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        found.is_ok(),
        "{tool} is missing: install the Debian package {package}"
    );
}

/// A kernel QEMU can load: the host's Debian kernel.
fn kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .expect("no /boot/vmlinuz-*: install the Debian package linux-image-cloud-amd64")
}

/// A config for a VM whose files live in `dir`, with a junk initrd (never unpacked
/// unless the guest runs).
fn config(dir: &Path) -> VmConfig {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, [0x5a_u8; 4096]).unwrap();
    VmConfig::new(Accel::Tcg, &kernel(), &initrd, dir)
}

/// True while `pid` exists and is not a zombie.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// True once `pid` has disappeared completely (reaped).
fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

/// qemu-nbd serving `image` read-only on `socket`; killed when dropped.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(image: &Path, socket: &Path) -> QemuNbd {
        require_tool("qemu-nbd", "qemu-utils");
        let child = Command::new("qemu-nbd")
            .args(["-r", "-f", "raw", "-x", "img", "-k"])
            .arg(socket)
            .arg(image)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || socket.exists()),
            "qemu-nbd did not create its socket"
        );
        QemuNbd(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `inserted` member of query-block's entry for the device `vd0`.
fn inserted_disk(vm: &mut Vm) -> Value {
    let blocks = vm.qmp().execute("query-block", None).unwrap();
    let entry = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains("vd0")))
        .cloned()
        .unwrap_or_else(|| panic!("vd0 not in query-block: {blocks}"));
    entry["inserted"].clone()
}

#[test]
fn nbd_disk_plugs_in_read_only_and_shutdown_reaps_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let nbd_socket = dir.path().join("nbd.sock");
    let _nbd = QemuNbd::start(&image, &nbd_socket);
    let mut vm = Vm::launch(&config(dir.path())).unwrap();
    let pid = vm.pid();

    let slot = vm.attach_nbd_disk(&nbd_socket, "img", true).unwrap();
    let disk = inserted_disk(&mut vm);
    let status = vm.shutdown(Duration::from_secs(5)).unwrap();

    assert_eq!((slot.node.as_str(), slot.device.as_str()), ("disk0", "vd0"));
    assert_eq!(
        (&disk["node-name"], &disk["ro"], &disk["drv"]),
        (&"disk0".into(), &true.into(), &"nbd".into())
    );
    assert_eq!(
        status.code(),
        Some(0),
        "QEMU should quit cleanly on QMP quit"
    );
    assert!(gone(pid) && !reaper::is_registered(pid));
}

#[test]
fn second_disk_without_a_free_root_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let nbd_socket = dir.path().join("nbd.sock");
    let _nbd = QemuNbd::start(&image, &nbd_socket);
    let mut vm = Vm::launch(&config(dir.path())).unwrap();
    vm.attach_nbd_disk(&nbd_socket, "img", true).unwrap();

    let err = vm.attach_nbd_disk(&nbd_socket, "img", true).unwrap_err();

    assert!(matches!(err, VmError::NoFreeRootPort { ports: 1 }), "{err}");
}

#[test]
fn missing_nbd_server_fails_with_qemu_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::launch(&config(dir.path())).unwrap();

    let err = vm
        .attach_nbd_disk(&dir.path().join("nobody.sock"), "img", true)
        .unwrap_err();

    let text = err.to_string();
    assert!(
        text.starts_with("attaching the disk: QMP blockdev-add failed: "),
        "{text}"
    );
    assert!(text.contains("nobody.sock"), "{text}");
}

#[test]
fn drop_kills_and_reaps_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::launch(&config(dir.path())).unwrap();
    let pid = vm.pid();
    assert!(running(pid) && reaper::is_registered(pid));

    drop(vm);

    assert!(gone(pid), "QEMU {pid} still exists after drop");
    assert!(!reaper::is_registered(pid));
}

#[test]
fn early_qemu_failure_reports_qemu_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.kernel = dir.path().join("no-such-kernel");

    let err = Vm::launch(&cfg)
        .err()
        .expect("QEMU cannot start without its kernel");

    let text = err.to_string();
    assert!(matches!(err, VmError::EarlyExit { .. }), "{text}");
    assert!(
        text.contains("could not open kernel file") && text.contains("no-such-kernel"),
        "{text}"
    );
}

#[test]
fn qemu_cannot_write_a_file_past_the_limit() {
    // A stand-in for QEMU that floods a file, as a guest flooding its console log would.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let flood = dir.path().join("flood");
    let fake = dir.path().join("fake-qemu");
    let over = (imgsafe::vm::MAX_QEMU_FILE_BYTES >> 20) + 8;
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nexec head -c {over}M /dev/zero > '{}'\n",
            flood.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    cfg.qemu = fake;

    let err = Vm::launch(&cfg)
        .err()
        .expect("the stand-in never opens QMP");

    let text = err.to_string();
    assert!(matches!(err, VmError::EarlyExit { .. }), "{text}");
    assert!(text.contains("past its file size limit"), "{text}");
    assert_eq!(
        std::fs::metadata(&flood).unwrap().len(),
        imgsafe::vm::MAX_QEMU_FILE_BYTES
    );
}

#[test]
fn argv_is_accepted_by_real_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.root_ports = 2;
    let mut vm = Vm::launch(&cfg).unwrap();

    let status = vm.qmp().execute("query-status", None).unwrap();
    let machine = vm
        .qmp()
        .execute(
            "qom-get",
            Some(serde_json::json!({"path": "/machine", "property": "type"})),
        )
        .unwrap();
    let chardevs = vm.qmp().execute("query-chardev", None).unwrap().to_string();
    let pci = vm.qmp().execute("query-pci", None).unwrap().to_string();

    assert_eq!(
        status["status"], "prelaunch",
        "-S must leave the guest paused"
    );
    assert_eq!(machine, "microvm-machine");
    assert!(
        chardevs.contains("\"agent\"") && chardevs.contains("\"console\""),
        "{chardevs}"
    );
    for id in ["\"vser0\"", "\"rp0\"", "\"rp1\""] {
        assert!(pci.contains(id), "{id} missing from query-pci: {pci}");
    }
    assert!(
        vm.agent_socket().exists(),
        "QEMU should listen on the agent socket"
    );
}

#[test]
fn q35_fallback_is_accepted_by_real_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.machine = Machine::Q35;
    let mut vm = Vm::launch(&cfg).unwrap();

    let pci = vm.qmp().execute("query-pci", None).unwrap().to_string();
    let agent = vm.connect_agent();

    assert!(
        pci.contains("\"rp0\"") && pci.contains("\"vser0\""),
        "{pci}"
    );
    assert!(agent.is_ok(), "{:?}", agent.err());
}

#[test]
fn guest_panic_makes_qemu_exit_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::launch(&config(dir.path())).unwrap();

    // The junk initrd leaves the kernel without a root filesystem: it panics, and
    // `panic=-1` with `-no-reboot` turns that into QEMU exiting.
    vm.start().unwrap();
    let exited = vm.wait_exit(Duration::from_secs(30));
    let err = vm.check_alive().unwrap_err();

    assert!(
        exited.is_some(),
        "QEMU still running 30 s after a guest panic"
    );
    assert!(
        err.to_string().contains("guest Kernel panic - not syncing"),
        "{err}"
    );
}

/// Run [`helper_hold_vm`] in a child process, return it and the QEMU pid it printed.
fn spawn_helper(dir: &Path) -> (Child, i32) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_hold_vm",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let pid = stdout
        .lines()
        .map_while(Result::ok)
        // The harness prints "test helper_hold_vm ... " on the same line.
        .find_map(|l| {
            l.split("QEMU_PID=")
                .nth(1)
                .and_then(|p| p.trim().parse().ok())
        })
        .expect("helper did not print QEMU's pid");
    (child, pid)
}

#[test]
fn sigterm_kills_qemu_and_imgsafe_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let (mut helper, qemu) = spawn_helper(dir.path());
    assert!(running(qemu));

    // SAFETY: signalling our own child.
    unsafe { libc::kill(helper.id() as i32, libc::SIGTERM) };
    let status = helper.wait().unwrap();

    assert_eq!(status.code(), Some(130));
    assert!(gone(qemu), "QEMU {qemu} survived SIGTERM to its parent");
}

#[test]
fn sigkill_of_imgsafe_kills_qemu_through_pdeathsig() {
    let dir = tempfile::tempdir().unwrap();
    let (mut helper, qemu) = spawn_helper(dir.path());
    assert!(running(qemu));

    helper.kill().unwrap();
    helper.wait().unwrap();

    // QEMU is re-parented and killed; init reaps it (a zombie counts as dead).
    assert!(
        wait_until(Duration::from_secs(5), || !running(qemu)),
        "QEMU {qemu} survived its parent"
    );
}

/// Not a test on its own: the child process of the two signal tests. Launches a VM,
/// prints QEMU's pid, waits for a signal, checks that the handler killed QEMU, then
/// exits 130 as imgsafe does.
#[test]
#[ignore = "helper process for the signal tests, which run it"]
fn helper_hold_vm() {
    let dir = PathBuf::from(std::env::var_os(HELPER_ENV).expect("run by the signal tests"));
    reaper::install_signal_handlers();
    let mut vm = Vm::launch(&config(&dir)).unwrap();
    println!("QEMU_PID={}", vm.pid());

    assert!(
        wait_until(Duration::from_secs(30), reaper::interrupted),
        "no signal came"
    );
    let killed = vm.wait_exit(Duration::from_secs(5));

    assert!(killed.is_some(), "the signal handler did not kill QEMU");
    drop(vm);
    std::process::exit(130);
}
