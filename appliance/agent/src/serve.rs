//! The request loop: one request in, its answer out, until `Shutdown` or the channel ends.
//!
//! Generic over `Read`/`Write` so tests drive it over a socketpair against a temp dir.
//! Each request is handled by its own module; a handler only returns an error when the
//! channel itself failed. A later `Shell` request fits here as one more arm that takes
//! over the reader and writer for its duration.

use crate::devices::DeviceRoots;
use crate::entry;
use crate::error::OpError;
use crate::mount::mount;
use crate::{readdir, readfile, walk};
use imgsafe_proto::{
    read_frame, write_msg, ErrorKind, Frame, FrameError, Request, Response, PROTOCOL_VERSION,
};
use std::io::{self, BufReader, Read, Write};
use std::path::PathBuf;

/// Most file requests answered as one batch (the host sends at most 64 at once).
const READ_BATCH_MAX: usize = 64;

/// Longest request text written to the console log.
const LOG_REQUEST_MAX: usize = 200;

/// Everything the loop needs to know about where it runs.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Where image filesystems are mounted (`/sysroot` in the guest).
    pub sysroot: PathBuf,
    /// Where block devices are found.
    pub devices: DeviceRoots,
    /// Log each request to stderr (the console).
    pub debug: bool,
    /// The tools that assemble RAID arrays and activate volume groups found on the disks.
    pub tools: crate::lvm::Tools,
    /// How long `Hello` waits for the disks the host names.
    pub disk_wait: std::time::Duration,
    /// Running as the appliance's init: `Hello` may set the clock and feed the kernel's
    /// random pool (never in tests, which run on the host).
    pub is_init: bool,
}

/// Why [`Agent::serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The host asked to power off; `Bye` was sent.
    Shutdown,
    /// The channel ended or failed (or the host sent an unparseable frame header).
    Disconnected,
}

/// The running kernel's release string, from uname(2).
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it with NUL-terminated strings.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn answer<W: Write>(w: &mut W, r: Result<Response, OpError>) -> io::Result<()> {
    write_msg(w, &r.unwrap_or_else(OpError::response))
}

impl Agent {
    /// Serve requests from `r`, answering on `w`, until shutdown or disconnection.
    ///
    /// Answers are flushed only once no further request is already buffered: the host
    /// sends a batch of requests at once (`cp` of a tree), and one channel write per batch
    /// instead of per answer saves a guest exit and a host wake-up per file. The host
    /// only ever sends whole frames, so a request the buffer holds only part of is
    /// already on its way and reading it cannot wait on an unflushed answer.
    pub fn serve<R: Read + Send, W: Write>(&self, r: &mut BufReader<R>, w: &mut W) -> Outcome {
        // A frame read while gathering a batch that was not part of it, handled next.
        let mut pending = None;
        loop {
            let frame = match pending.take() {
                Some(f) => f,
                None => read_frame::<_, Request>(r),
            };
            let step = match frame {
                // Further file requests already buffered are answered together (see
                // `readfile::read_files`); the first other frame is kept for next.
                Ok(Frame::Msg(Request::ReadFile { path })) if !r.buffer().is_empty() => {
                    let mut paths = vec![path];
                    while paths.len() < READ_BATCH_MAX && !r.buffer().is_empty() {
                        match read_frame::<_, Request>(r) {
                            Ok(Frame::Msg(Request::ReadFile { path })) => paths.push(path),
                            other => {
                                pending = Some(other);
                                break;
                            }
                        }
                    }
                    if self.debug {
                        self.log(&format!("ReadFile x{}", paths.len()));
                    }
                    readfile::read_files(&self.sysroot, &paths, w).map(|()| None)
                }
                // A shell session takes over the channel (reader too) until it ends.
                Ok(Frame::Msg(Request::Shell(start))) => {
                    crate::shell::run(&self.sysroot, start, r, w).map(|()| None)
                }
                Ok(Frame::Msg(Request::Unlock { len })) => self.unlock(len, r, w).map(|()| None),
                Ok(Frame::Msg(req)) => self.handle(req, w),
                // In these cases the whole frame was consumed, so the stream is still in
                // step: refuse the frame and carry on.
                Ok(Frame::Data(_)) => answer(
                    w,
                    Err(OpError::new(ErrorKind::BadRequest, "unexpected data frame")),
                )
                .map(|()| None),
                Err(FrameError::Malformed(m)) => answer(
                    w,
                    Err(OpError::new(
                        ErrorKind::BadRequest,
                        format!("malformed request: {m}"),
                    )),
                )
                .map(|()| None),
                Err(FrameError::UnknownKind(k)) => answer(
                    w,
                    Err(OpError::new(
                        ErrorKind::BadRequest,
                        format!("unknown frame kind {k}"),
                    )),
                )
                .map(|()| None),
                Err(FrameError::TooLarge(_)) | Err(FrameError::Io(_)) => {
                    return Outcome::Disconnected
                }
            };
            let step = match step {
                Ok(o) if o.is_none() && (pending.is_some() || !r.buffer().is_empty()) => Ok(o),
                other => other.and_then(|o| w.flush().map(|()| o)),
            };
            match step {
                Ok(Some(outcome)) => return outcome,
                Ok(None) => {}
                Err(e) => {
                    self.log(&format!("channel write failed: {e}"));
                    return Outcome::Disconnected;
                }
            }
        }
    }

    /// `Unlock`: read the key (the next frame, DATA of exactly `len` bytes), open the
    /// LUKS containers with it, wipe it, answer.
    fn unlock<R: Read, W: Write>(&self, len: u32, r: &mut R, w: &mut W) -> io::Result<()> {
        let key = match read_frame::<_, Request>(r) {
            Ok(Frame::Data(key)) => key,
            Ok(Frame::Msg(_)) => {
                let e = OpError::new(ErrorKind::BadRequest, "Unlock without its key");
                return answer(w, Err(e));
            }
            Err(FrameError::Io(e)) => return Err(e),
            Err(e) => return answer(w, Err(OpError::new(ErrorKind::BadRequest, e.to_string()))),
        };
        let mut key = key;
        let r = if key.len() != len as usize || key.len() > imgsafe_proto::MAX_KEY {
            Err(OpError::new(ErrorKind::BadRequest, "bad key length"))
        } else {
            crate::luks::unlock(
                &self.devices,
                &self.tools,
                self.tools.cryptsetup.as_deref(),
                &key,
                &|m| crate::init::log(m),
            )
            .map(|u| Response::Unlocked {
                opened: u.opened,
                refused: u.refused,
            })
            .map_err(|m| OpError::new(ErrorKind::Other, m))
        };
        crate::luks::wipe(&mut key);
        answer(w, r)
    }

    fn log(&self, msg: &str) {
        if self.debug {
            eprintln!("imgsafe-agent: {msg}");
        }
    }

    /// Answer one request; Some(outcome) ends the loop.
    fn handle<W: Write>(&self, req: Request, w: &mut W) -> io::Result<Option<Outcome>> {
        if self.debug {
            let mut text = format!("{req:?}");
            text.truncate(LOG_REQUEST_MAX);
            self.log(&text);
        }
        let root = self.sysroot.as_path();
        match req {
            Request::Hello {
                version: _,
                nonce,
                entropy,
                time,
                disks,
            } => {
                if self.is_init {
                    crate::init::log("hello");
                    crate::hello::refresh(&entropy, time, &|m| crate::init::log(m));
                }
                // The host checks the version; answering with ours lets it say which side is stale.
                let r =
                    crate::hello::wait_for_disks(&self.devices, &disks, self.disk_wait).map(|()| {
                        Response::Hello {
                            version: PROTOCOL_VERSION,
                            kernel: kernel_release(),
                            nonce,
                        }
                    });
                answer(w, r)?
            }
            Request::ListFilesystems => {
                let list = crate::lvm::list_with_volumes(&self.devices, &self.tools, &|m| {
                    crate::init::log(m)
                });
                answer(w, Ok(Response::Filesystems { list }))?
            }
            Request::Mount {
                device,
                mountpoint,
                fstype,
                writable,
                subvolid,
            } => {
                let how = crate::mount::How {
                    fstype: fstype.as_deref(),
                    writable,
                    subvolid,
                };
                let r = mount(root, &device, &mountpoint, how);
                if let Err(e) = &r {
                    self.log(&e.message);
                }
                answer(w, r.map(|fstype| Response::Mounted { device, fstype }))?
            }
            Request::Subvolumes { device } => {
                let r = crate::btrfs::subvolumes(&device);
                if let Err(e) = &r {
                    self.log(&e.message);
                }
                answer(
                    w,
                    r.map(|(default, list)| Response::Subvolumes { default, list }),
                )?
            }
            Request::ReadDir { path } => readdir::read_dir(root, &path, w)?,
            Request::Stat { path } => answer(
                w,
                entry::stat(root, &path).map(|entry| Response::Stat { entry }),
            )?,
            Request::ReadFile { path } => readfile::read_file(root, &path, w)?,
            Request::ReadFileMapped { path } => crate::extents::read_file_mapped(
                root,
                &self.devices.sys,
                &self.devices.dev,
                &path,
                w,
            )?,
            Request::Walk { path } => walk::walk(root, &path, w)?,
            Request::ReadLink { path } => answer(
                w,
                entry::read_link(root, &path).map(|target| Response::Link { target }),
            )?,
            Request::Unmount { mountpoint } => answer(
                w,
                crate::mount::unmount(root, &mountpoint).map(|count| Response::Unmounted { count }),
            )?,
            // `Shell` is taken over by `serve` (it needs the reader); the others only
            // mean something inside a shell session.
            // Taken over by `serve` too (its key is the next frame).
            Request::Unlock { .. } => answer(
                w,
                Err(OpError::new(
                    ErrorKind::BadRequest,
                    "Unlock without its key",
                )),
            )?,
            Request::Shell(_)
            | Request::ShellResize { .. }
            | Request::ShellEof
            | Request::ShellOutputClosed
            | Request::ShellDone => answer(
                w,
                Err(OpError::new(
                    ErrorKind::BadRequest,
                    "no shell session is running",
                )),
            )?,
            Request::Shutdown => {
                write_msg(w, &Response::Bye)?;
                return Ok(Some(Outcome::Shutdown));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgsafe_proto::{read_frame, Entry, FileType, WalkEntry, CHUNK};
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::thread::JoinHandle;

    /// The host end of a socketpair whose other end an agent thread serves.
    struct Host {
        stream: UnixStream,
        agent: Option<JoinHandle<Outcome>>,
    }

    fn agent(root: &Path) -> Agent {
        Agent {
            sysroot: root.to_path_buf(),
            devices: DeviceRoots {
                sys: root.join("no-sys"),
                dev: root.join("no-dev"),
            },
            debug: false,
            tools: crate::lvm::Tools::default(),
            disk_wait: std::time::Duration::from_millis(50),
            is_init: false,
        }
    }

    fn start(root: &Path) -> Host {
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = agent(root);
        let handle = std::thread::spawn(move || {
            let mut r = io::BufReader::new(guest.try_clone().unwrap());
            let mut w = io::BufWriter::new(guest);
            agent.serve(&mut r, &mut w)
        });
        Host {
            stream: host,
            agent: Some(handle),
        }
    }

    impl Host {
        fn send(&mut self, req: &Request) {
            write_msg(&mut self.stream, req).unwrap();
        }
        fn recv(&mut self) -> Frame<Response> {
            read_frame(&mut self.stream).unwrap()
        }
        fn msg(&mut self) -> Response {
            match self.recv() {
                Frame::Msg(m) => m,
                Frame::Data(d) => panic!("unexpected data frame of {} bytes", d.len()),
            }
        }
        fn call(&mut self, req: Request) -> Response {
            self.send(&req);
            self.msg()
        }
        /// ReadDir, returning (frame count, entries sorted by name).
        fn read_dir(&mut self, path: &[u8]) -> (usize, Vec<Entry>) {
            self.send(&Request::ReadDir {
                path: path.to_vec(),
            });
            let (mut frames, mut all) = (0, Vec::new());
            loop {
                match self.msg() {
                    Response::DirEntries { entries, done } => {
                        frames += 1;
                        all.extend(entries);
                        if done {
                            all.sort_by(|a, b| a.name.cmp(&b.name));
                            return (frames, all);
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        /// ReadFile: the bytes and the largest data frame seen, or the error response.
        fn read_file(&mut self, path: &[u8]) -> Result<(Vec<u8>, usize), Response> {
            self.send(&Request::ReadFile {
                path: path.to_vec(),
            });
            let size = match self.msg() {
                Response::FileStart { size } => size,
                other => return Err(other),
            };
            let (mut data, mut biggest) = (Vec::new(), 0);
            loop {
                match self.recv() {
                    Frame::Data(d) => {
                        biggest = biggest.max(d.len());
                        data.extend(d);
                    }
                    Frame::Msg(Response::FileEnd) => break,
                    Frame::Msg(other) => return Err(other),
                }
            }
            assert_eq!(data.len() as u64, size);
            Ok((data, biggest))
        }
        fn walk(&mut self, path: &[u8]) -> Result<Vec<WalkEntry>, Response> {
            self.send(&Request::Walk {
                path: path.to_vec(),
            });
            let mut all = Vec::new();
            loop {
                match self.msg() {
                    Response::WalkEntries { entries, done } => {
                        all.extend(entries);
                        if done {
                            return Ok(all);
                        }
                    }
                    other => return Err(other),
                }
            }
        }
        fn shutdown(mut self) -> Outcome {
            assert_eq!(self.call(Request::Shutdown), Response::Bye);
            self.agent.take().unwrap().join().unwrap()
        }
    }

    fn kind_of(r: Response) -> ErrorKind {
        match r {
            Response::Error { kind, .. } => kind,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn odd_names() -> Vec<Vec<u8>> {
        vec![
            b"with space".to_vec(),
            b"new\nline".to_vec(),
            b"back\\slash".to_vec(),
            vec![b'n', 0xff, 0xfe],
        ]
    }

    /// A small tree acting as a mounted image.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("etc/sub")).unwrap();
        fs::write(r.join("etc/hostname"), b"guest\n").unwrap();
        fs::write(r.join("etc/sub/deep"), b"x").unwrap();
        symlink("/etc", r.join("etclink")).unwrap();
        symlink("../../outside", r.join("etc/escape")).unwrap();
        for n in odd_names() {
            fs::write(r.join(std::ffi::OsStr::from_bytes(&n)), &n).unwrap();
        }
        t
    }

    use std::os::unix::ffi::OsStrExt;

    /// Counts the writes that reach the channel.
    struct Counting(Vec<u8>, usize);

    impl Write for Counting {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(b);
            self.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Serve `requests`, all buffered at once, to the end; the outcome and what reached
    /// the channel.
    fn serve_buffered(root: &Path, requests: &[Request]) -> (Outcome, Counting) {
        let mut bytes = Vec::new();
        for req in requests {
            imgsafe_proto::write_msg(&mut bytes, req).unwrap();
        }
        let mut r = BufReader::new(&bytes[..]);
        let mut w = io::BufWriter::new(Counting(Vec::new(), 0));
        let outcome = agent(root).serve(&mut r, &mut w);
        (outcome, w.into_inner().map_err(|_| ()).unwrap())
    }

    fn read_file(path: &[u8]) -> Request {
        Request::ReadFile {
            path: path.to_vec(),
        }
    }

    #[test]
    fn a_batch_with_a_missing_file_and_another_request_is_answered_in_order() {
        let t = tree();
        let stat = Request::Stat {
            path: b"/etc/hostname".to_vec(),
        };
        let requests = [
            read_file(b"/etc/hostname"),
            read_file(b"/nope"),
            read_file(b"/etc/sub/deep"),
            stat,
        ];

        let (_, out) = serve_buffered(t.path(), &requests);

        let mut a = &out.0[..];
        let mut next = || read_frame::<_, Response>(&mut a).unwrap();
        assert!(matches!(
            next(),
            Frame::Msg(Response::FileStart { size: 6 })
        ));
        assert!(matches!(next(), Frame::Data(d) if d == b"guest\n"));
        assert!(matches!(next(), Frame::Msg(Response::FileEnd)));
        assert!(matches!(
            next(),
            Frame::Msg(Response::Error {
                kind: ErrorKind::NotFound,
                ..
            })
        ));
        assert!(matches!(
            next(),
            Frame::Msg(Response::FileStart { size: 1 })
        ));
        assert!(matches!(next(), Frame::Data(d) if d == b"x"));
        assert!(matches!(next(), Frame::Msg(Response::FileEnd)));
        assert!(matches!(next(), Frame::Msg(Response::Stat { .. })));
    }

    #[test]
    fn a_batch_of_requests_is_answered_in_one_channel_write() {
        let t = tree();
        let requests = [0; 3].map(|_| read_file(b"/etc/hostname"));

        let (outcome, out) = serve_buffered(t.path(), &requests);

        assert!(matches!(outcome, Outcome::Disconnected));
        assert_eq!(out.1, 1, "one write for the whole batch");
        let mut answers = &out.0[..];
        for _ in 0..3 {
            let start = read_frame::<_, Response>(&mut answers).unwrap();
            assert!(matches!(start, Frame::Msg(Response::FileStart { size: 6 })));
            assert!(
                matches!(read_frame::<_, Response>(&mut answers), Ok(Frame::Data(d)) if d == b"guest\n")
            );
            assert!(matches!(
                read_frame::<_, Response>(&mut answers),
                Ok(Frame::Msg(Response::FileEnd))
            ));
        }
    }

    #[test]
    fn hello_reports_version_and_kernel() {
        let t = tree();
        let mut h = start(t.path());

        let r = h.call(Request::Hello {
            version: PROTOCOL_VERSION,
            nonce: 0x1234_5678_9abc_def0,
            entropy: vec![7; 32],
            time: imgsafe_proto::WallClock::now(),
            disks: Vec::new(),
        });

        assert_eq!(
            r,
            Response::Hello {
                version: PROTOCOL_VERSION,
                kernel: kernel_release(),
                nonce: 0x1234_5678_9abc_def0,
            }
        );
        assert!(!kernel_release().is_empty());
        assert_eq!(h.shutdown(), Outcome::Shutdown);
    }

    #[test]
    fn read_dir_lists_raw_names_and_symlink_targets() {
        let t = tree();
        let mut h = start(t.path());

        let (_, root) = h.read_dir(b"/");
        let (_, via_link) = h.read_dir(b"/etclink");

        let names: Vec<Vec<u8>> = root.iter().map(|e| e.name.clone()).collect();
        let mut want = odd_names();
        want.extend([b"etc".to_vec(), b"etclink".to_vec()]);
        want.sort();
        assert_eq!(names, want);
        let link = root.iter().find(|e| e.name == b"etclink").unwrap();
        assert_eq!(
            (link.kind, link.target.as_deref()),
            (FileType::Symlink, Some(&b"/etc"[..]))
        );
        let via: Vec<&[u8]> = via_link.iter().map(|e| e.name.as_slice()).collect();
        assert_eq!(via, vec![&b"escape"[..], b"hostname", b"sub"]);
        h.shutdown();
    }

    #[test]
    fn big_directory_is_split_into_bounded_frames() {
        let t = tempfile::tempdir().unwrap();
        for i in 0..2100 {
            fs::write(t.path().join(format!("{i:0100}")), b"").unwrap();
        }
        let mut h = start(t.path());

        let (frames, entries) = h.read_dir(b"/");

        assert_eq!(entries.len(), 2100);
        assert!(frames >= 2, "{frames} frames");
        h.shutdown();
    }

    #[test]
    fn stat_does_not_follow_final_symlink_but_readfile_does() {
        let t = tree();
        let mut h = start(t.path());

        let st = h.call(Request::Stat {
            path: b"/etclink".to_vec(),
        });
        let (data, _) = h.read_file(b"/etclink/hostname").unwrap();
        let root = h.call(Request::Stat {
            path: b"/".to_vec(),
        });

        match st {
            Response::Stat { entry } => assert_eq!(
                (entry.name, entry.kind),
                (b"etclink".to_vec(), FileType::Symlink)
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(data, b"guest\n");
        match root {
            Response::Stat { entry } => {
                assert_eq!((entry.name, entry.kind), (Vec::new(), FileType::Directory))
            }
            other => panic!("{other:?}"),
        }
        h.shutdown();
    }

    #[test]
    fn read_file_streams_3_mib_in_chunks() {
        let t = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        fs::write(t.path().join("big"), &content).unwrap();
        let mut h = start(t.path());

        let (data, biggest) = h.read_file(b"/big").unwrap();

        assert!(data == content, "content differs");
        assert_eq!(biggest, CHUNK);
        h.shutdown();
    }

    #[test]
    fn read_file_of_sparse_file_reads_zeros() {
        let t = tempfile::tempdir().unwrap();
        let f = fs::File::create(t.path().join("sparse")).unwrap();
        f.set_len(5 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"end", (5 << 20) - 3).unwrap();
        let mut h = start(t.path());

        let (data, _) = h.read_file(b"/sparse").unwrap();

        assert_eq!(data.len(), 5 << 20);
        assert!(data[..(5 << 20) - 3].iter().all(|&b| b == 0));
        assert_eq!(&data[(5 << 20) - 3..], b"end");
        h.shutdown();
    }

    #[test]
    fn read_file_of_odd_names_returns_their_bytes() {
        let t = tree();
        let mut h = start(t.path());

        for n in odd_names() {
            let path = [&b"/"[..], &n].concat();

            let (data, _) = h.read_file(&path).unwrap();

            assert_eq!(data, n);
        }
        h.shutdown();
    }

    #[test]
    fn errors_have_the_right_kinds_and_the_loop_goes_on() {
        let t = tree();
        let mut h = start(t.path());

        let missing = h.read_file(b"/nope").unwrap_err();
        let dir = h.read_file(b"/etc").unwrap_err();
        let notdir = h.call(Request::ReadDir {
            path: b"/etc/hostname".to_vec(),
        });
        let escape = h.read_file(b"/etc/escape").unwrap_err();
        let relative = h.call(Request::Stat {
            path: b"etc".to_vec(),
        });
        let still_alive = h.call(Request::Stat {
            path: b"/etc/hostname".to_vec(),
        });

        assert_eq!(kind_of(missing), ErrorKind::NotFound);
        assert_eq!(kind_of(dir), ErrorKind::IsDirectory);
        assert_eq!(kind_of(notdir), ErrorKind::NotDirectory);
        assert_eq!(kind_of(escape), ErrorKind::NotFound);
        assert_eq!(kind_of(relative), ErrorKind::BadRequest);
        assert!(matches!(still_alive, Response::Stat { .. }));
        h.shutdown();
    }

    #[test]
    fn read_file_refuses_a_fifo_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let p = std::ffi::CString::new(t.path().join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(p.as_ptr(), 0o644) }, 0);
        let mut h = start(t.path());

        let err = h.read_file(b"/fifo").unwrap_err();

        assert_eq!(kind_of(err), ErrorKind::Other);
        h.shutdown();
    }

    #[test]
    fn walk_is_preorder_with_relative_paths_and_does_not_follow_links() {
        let t = tree();
        let mut h = start(t.path());

        let all = h.walk(b"/etclink").unwrap();

        let paths: Vec<Vec<Vec<u8>>> = all.iter().map(|w| w.path.clone()).collect();
        let pos = |p: &[&[u8]]| {
            paths
                .iter()
                .position(|x| x == &p.iter().map(|c| c.to_vec()).collect::<Vec<_>>())
        };
        assert_eq!(all.len(), 4);
        assert!(pos(&[b"sub"]).unwrap() < pos(&[b"sub", b"deep"]).unwrap());
        let esc = &all[pos(&[b"escape"]).unwrap()].entry;
        assert_eq!(
            (esc.kind, esc.target.as_deref()),
            (FileType::Symlink, Some(&b"../../outside"[..]))
        );
        assert!(all.iter().all(|w| w.entry.name == *w.path.last().unwrap()));
        h.shutdown();
    }

    #[test]
    fn walk_of_missing_dir_is_not_found() {
        let t = tree();
        let mut h = start(t.path());

        let err = h.walk(b"/missing").unwrap_err();

        assert_eq!(kind_of(err), ErrorKind::NotFound);
        h.shutdown();
    }

    #[test]
    fn read_link_returns_the_stored_target() {
        let t = tree();
        let mut h = start(t.path());

        let r = h.call(Request::ReadLink {
            path: b"/etc/escape".to_vec(),
        });

        assert_eq!(
            r,
            Response::Link {
                target: b"../../outside".to_vec()
            }
        );
        h.shutdown();
    }

    #[test]
    fn malformed_and_data_frames_are_refused_and_the_loop_goes_on() {
        let t = tree();
        let mut h = start(t.path());

        imgsafe_proto::write_data(&mut h.stream, b"junk").unwrap();
        let data = h.msg();
        h.stream
            .write_all(&[3, 0, 0, 0, imgsafe_proto::KIND_MSG, b'{', b'}'])
            .unwrap();
        let junk = h.msg();

        assert_eq!(kind_of(data), ErrorKind::BadRequest);
        assert_eq!(kind_of(junk), ErrorKind::BadRequest);
        assert_eq!(h.shutdown(), Outcome::Shutdown);
    }

    #[test]
    fn host_hanging_up_ends_the_loop() {
        let t = tree();
        let mut h = start(t.path());

        drop(std::mem::replace(
            &mut h.stream,
            UnixStream::pair().unwrap().0,
        ));

        assert_eq!(
            h.agent.take().unwrap().join().unwrap(),
            Outcome::Disconnected
        );
    }
}
