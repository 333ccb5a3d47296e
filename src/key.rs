//! The LUKS key given with `--key-file`: read on the host, held in one buffer that is
//! wiped when dropped, sent to the guest agent in a frame of its own, never shown,
//! logged, written to a file, put on a command line or in an environment.

use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// The most bytes read as a key (the agent takes no more).
pub const MAX_KEY: usize = imgsafe_proto::MAX_KEY;

/// A key's bytes; zeroed on drop.
pub struct Key(Vec<u8>);

impl Key {
    /// The bytes, to send.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrite `buf` with zeros in a way the compiler keeps (it is dead right after).
pub fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, exclusive reference into `buf`.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// A buffer that never reallocates while a key is read into it (a reallocation would
/// leave a copy behind in freed memory): room for one byte more than the limit.
fn buffer() -> Vec<u8> {
    Vec::with_capacity(MAX_KEY + 1)
}

/// Read `--key-file ARG`: a file's exact bytes (as `cryptsetup --key-file` takes them);
/// `-` reads a passphrase from the terminal on stdin without echo (to the end of the
/// line, which is not part of it), or, when stdin is not a terminal, stdin's exact bytes.
pub fn read(arg: &Path) -> Result<Key> {
    let mut buf = buffer();
    let what = if arg == Path::new("-") {
        // SAFETY: isatty takes no pointers.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
            return read_terminal();
        }
        std::io::stdin()
            .lock()
            .take(MAX_KEY as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::Usage(format!("--key-file -: reading stdin: {e}")))?;
        "stdin".to_string()
    } else {
        let f = std::fs::File::open(arg)
            .map_err(|e| Error::Usage(format!("--key-file {}: {e}", arg.display())))?;
        f.take(MAX_KEY as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::Usage(format!("--key-file {}: {e}", arg.display())))?;
        arg.display().to_string()
    };
    let key = Key(buf);
    check(&key, &what)?;
    Ok(key)
}

fn check(key: &Key, what: &str) -> Result<()> {
    if key.0.is_empty() {
        return Err(Error::Usage(format!("--key-file {what}: the key is empty")));
    }
    if key.0.len() > MAX_KEY {
        return Err(Error::Usage(format!(
            "--key-file {what}: more than {MAX_KEY} bytes, larger than imgsafe takes as a key"
        )));
    }
    Ok(())
}

/// Echo off on stdin (restored on drop).
struct NoEcho {
    saved: libc::termios,
}

impl NoEcho {
    fn enable() -> std::io::Result<NoEcho> {
        // SAFETY: termios is plain data that tcgetattr fills.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut quiet = saved;
        quiet.c_lflag &= !(libc::ECHO | libc::ECHONL);
        // SAFETY: setting attributes from a struct we own.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSAFLUSH, &quiet) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(NoEcho { saved })
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        // SAFETY: restoring the settings read in `enable`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSAFLUSH, &self.saved) };
    }
}

/// A passphrase typed on the terminal, without echo, up to the end of the line.
fn read_terminal() -> Result<Key> {
    eprint!("imgsafe: key: ");
    let guard =
        NoEcho::enable().map_err(|e| Error::Usage(format!("--key-file -: the terminal: {e}")))?;
    let mut key = Key(buffer());
    let mut byte = [0u8; 1];
    loop {
        // One byte at a time from the descriptor: nothing is left in a buffer.
        // SAFETY: reading one byte into a buffer we own.
        let n = unsafe { libc::read(libc::STDIN_FILENO, byte.as_mut_ptr().cast(), 1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if crate::vm::reaper::interrupted() {
                return Err(Error::Interrupted);
            }
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Usage(format!("--key-file -: the terminal: {e}")));
        }
        if n == 0 || byte[0] == b'\n' {
            break;
        }
        if key.0.len() > MAX_KEY {
            break;
        }
        key.0.push(byte[0]);
    }
    wipe(&mut byte);
    drop(guard);
    eprintln!();
    check(&key, "-")?;
    Ok(key)
}
