//! Unit tests of the whole copy over a guest filesystem held in memory.

use super::args::{parse_args, split_source_arg};
use super::plan::{check_plan, make_plan, source_name, Budget, Item, Plan};
use super::progress::Progress;
use super::write::apply;
use super::*;
use crate::Error;
use imgsafe_proto::Entry;
use imgsafe_proto::WalkEntry;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use tempfile::TempDir;

type Key = Vec<Vec<u8>>;

/// A guest filesystem in memory. Its walk is a correct pre-order walk unless
/// `walk_script` replaces it with a hostile one, sent verbatim.
struct MemFs {
    nodes: BTreeMap<Key, (Entry, Vec<u8>)>,
    walk_script: Option<Vec<WalkEntry>>,
    /// Bytes added to every file stream (a guest sending more than announced).
    extra: Vec<u8>,
    /// A file whose stream fails halfway (the destination filling up, say).
    fail: Option<Key>,
    /// A directory listed in the middle of every file stream, and what it held.
    peek: Option<(PathBuf, Vec<Vec<String>>)>,
}

fn key(path: &[u8]) -> Key {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn entry(
    key: &Key,
    kind: FileType,
    mode: u32,
    size: u64,
    mtime: i64,
    target: Option<&[u8]>,
) -> Entry {
    Entry {
        name: key.last().cloned().unwrap_or_default(),
        kind,
        mode,
        size,
        mtime,
        mtime_nsec: 250,
        uid: 0,
        gid: 0,
        nlink: 1,
        target: target.map(<[u8]>::to_vec),
    }
}

impl MemFs {
    fn new() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            Vec::new(),
            (
                entry(&Vec::new(), FileType::Directory, 0o755, 0, 1, None),
                Vec::new(),
            ),
        );
        MemFs {
            nodes,
            walk_script: None,
            extra: Vec::new(),
            fail: None,
            peek: None,
        }
    }

    fn dir(mut self, path: &[u8], mode: u32, mtime: i64) -> Self {
        let k = key(path);
        self.nodes.insert(
            k.clone(),
            (
                entry(&k, FileType::Directory, mode, 4096, mtime, None),
                Vec::new(),
            ),
        );
        self
    }

    fn file(mut self, path: &[u8], data: &[u8], mode: u32, mtime: i64) -> Self {
        let k = key(path);
        let e = entry(&k, FileType::Regular, mode, data.len() as u64, mtime, None);
        self.nodes.insert(k, (e, data.to_vec()));
        self
    }

    fn link(mut self, path: &[u8], target: &[u8]) -> Self {
        let k = key(path);
        let e = entry(
            &k,
            FileType::Symlink,
            0o777,
            target.len() as u64,
            7,
            Some(target),
        );
        self.nodes.insert(k, (e, Vec::new()));
        self
    }

    fn special(mut self, path: &[u8], kind: FileType) -> Self {
        let k = key(path);
        self.nodes
            .insert(k.clone(), (entry(&k, kind, 0o600, 0, 1, None), Vec::new()));
        self
    }

    fn script(mut self, walk: Vec<WalkEntry>) -> Self {
        self.walk_script = Some(walk);
        self
    }
}

fn not_found(path: &[u8]) -> Error {
    Error::NotFound {
        image: PathBuf::new(),
        path: show(path),
        what: "no such file".into(),
    }
}

impl GuestFs for MemFs {
    fn stat(&mut self, path: &[u8]) -> Result<Entry> {
        self.nodes
            .get(&key(path))
            .map(|(e, _)| e.clone())
            .ok_or_else(|| not_found(path))
    }

    fn read_dir(&mut self, path: &[u8]) -> Result<Vec<Entry>> {
        let k = key(path);
        Ok(self
            .nodes
            .iter()
            .filter(|(p, _)| p.len() == k.len() + 1 && p.starts_with(&k))
            .map(|(_, (e, _))| e.clone())
            .collect())
    }

    fn read_file(&mut self, path: &[u8], out: &mut dyn Write) -> Result<u64> {
        let (e, data) = self.nodes.get(&key(path)).ok_or_else(|| not_found(path))?;
        if e.kind != FileType::Regular {
            return Err(not_found(path));
        }
        let mut all = data.clone();
        all.extend_from_slice(&self.extra);
        // Odd-sized chunks, so hole detection sees runs crossing chunk boundaries.
        for (i, chunk) in all.chunks(3000).enumerate() {
            out.write_all(chunk).map_err(Error::Output)?;
            if i == 0 {
                if let Some((dir, seen)) = &mut self.peek {
                    seen.push(listing(dir));
                }
                if self.fail.as_ref() == Some(&key(path)) {
                    return Err(Error::Output(std::io::Error::from_raw_os_error(
                        libc::ENOSPC,
                    )));
                }
            }
        }
        Ok(all.len() as u64)
    }

    fn walk(&mut self, path: &[u8], each: &mut dyn FnMut(WalkEntry) -> Result<()>) -> Result<()> {
        if let Some(script) = self.walk_script.clone() {
            return script.into_iter().try_for_each(each);
        }
        let k = key(path);
        let below: Vec<WalkEntry> = self
            .nodes
            .iter()
            .filter(|(p, _)| p.len() > k.len() && p.starts_with(&k))
            .map(|(p, (e, _))| WalkEntry {
                path: p[k.len()..].to_vec(),
                entry: e.clone(),
            })
            .collect();
        below.into_iter().try_for_each(each)
    }
}

/// A hostile walk entry: `path` components sent as they are.
fn w(path: &[&[u8]], kind: FileType, target: Option<&[u8]>) -> WalkEntry {
    let k: Key = path.iter().map(|c| c.to_vec()).collect();
    let size = if kind == FileType::Regular { 3 } else { 0 };
    WalkEntry {
        entry: entry(&k, kind, 0o644, size, 1, target),
        path: k,
    }
}

/// A scratch area: `dest` (the user's DEST) and `outside` (must stay empty).
struct Area {
    _tmp: TempDir,
    dest: PathBuf,
    outside: PathBuf,
}

fn area() -> Area {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&dest).unwrap();
    std::fs::create_dir(&outside).unwrap();
    Area {
        _tmp: tmp,
        dest,
        outside,
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn opts() -> CopyOptions {
    CopyOptions::default()
}

fn force() -> CopyOptions {
    CopyOptions {
        force: true,
        ..CopyOptions::default()
    }
}

fn src(p: &str) -> Vec<Vec<u8>> {
    vec![p.as_bytes().to_vec()]
}

#[test]
fn file_into_existing_dir_keeps_its_name() {
    let a = area();
    let mut fs = MemFs::new()
        .dir(b"/etc", 0o755, 1)
        .file(b"/etc/hostname", b"box\n", 0o644, 1);

    let stats = copy_out(&mut fs, &src("/etc/hostname"), &a.dest, &opts()).unwrap();

    assert_eq!(std::fs::read(a.dest.join("hostname")).unwrap(), b"box\n");
    assert_eq!((stats.files, stats.bytes), (1, 4));
}

#[test]
fn file_to_new_name_becomes_that_file() {
    let a = area();
    let mut fs = MemFs::new().file(b"/f", b"data", 0o600, 1);

    copy_out(&mut fs, &src("/f"), &a.dest.join("renamed"), &opts()).unwrap();

    assert_eq!(listing(&a.dest), vec!["renamed"]);
    assert_eq!(std::fs::read(a.dest.join("renamed")).unwrap(), b"data");
}

#[test]
fn directory_is_copied_recursively_with_odd_names() {
    let a = area();
    let deep = b"/d/1/2/3/4/5/6/7/8/9/leaf";
    let mut fs = MemFs::new()
        .dir(b"/d", 0o755, 1)
        .file(b"/d/with space", b"s", 0o644, 1)
        .file(b"/d/new\nline", b"n", 0o644, 1)
        .file(b"/d/back\\slash", b"b", 0o644, 1)
        .file(b"/d/\xff\xfebytes", b"x", 0o644, 1);
    for i in 1..=9 {
        fs = fs.dir(&deep[..2 + 2 * i], 0o755, 1);
    }
    fs = fs.file(deep, b"deep", 0o644, 1);

    let stats = copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap();

    let d = a.dest.join("d");
    assert_eq!(std::fs::read(d.join("with space")).unwrap(), b"s");
    assert_eq!(std::fs::read(d.join("new\nline")).unwrap(), b"n");
    assert_eq!(std::fs::read(d.join("back\\slash")).unwrap(), b"b");
    assert_eq!(
        std::fs::read(d.join(std::ffi::OsStr::from_bytes(b"\xff\xfebytes"))).unwrap(),
        b"x"
    );
    assert_eq!(
        std::fs::read(d.join("1/2/3/4/5/6/7/8/9/leaf")).unwrap(),
        b"deep"
    );
    assert_eq!((stats.files, stats.dirs), (5, 10));
}

#[test]
fn directory_to_new_name_becomes_that_directory() {
    let a = area();
    let mut fs = MemFs::new()
        .dir(b"/home", 0o755, 1)
        .file(b"/home/letter", b"hi", 0o644, 1);

    copy_out(&mut fs, &src("/home/"), &a.dest.join("copy"), &opts()).unwrap();

    assert_eq!(std::fs::read(a.dest.join("copy/letter")).unwrap(), b"hi");
}

#[test]
fn symlinks_stay_symlinks_and_are_never_followed() {
    let a = area();
    let target = a.outside.join("victim");
    let mut fs = MemFs::new()
        .dir(b"/d", 0o755, 1)
        .link(b"/d/abs", target.as_os_str().as_bytes())
        .link(b"/d/rel", b"../../../outside/victim");

    let stats = copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap();

    assert_eq!(std::fs::read_link(a.dest.join("d/abs")).unwrap(), target);
    assert_eq!(
        std::fs::read_link(a.dest.join("d/rel")).unwrap(),
        Path::new("../../../outside/victim")
    );
    assert_eq!(stats.symlinks, 2);
    assert!(listing(&a.outside).is_empty());
}

#[test]
fn modes_and_mtimes_are_preserved_and_setid_bits_dropped() {
    let a = area();
    let mut fs = MemFs::new()
        .dir(b"/d", 0o1750, 1_500_000_000)
        .dir(b"/d/ro", 0o555, 1_400_000_000)
        .file(b"/d/ro/f", b"x", 0o640, 1_300_000_000)
        .file(b"/d/suid", b"y", 0o4755, 1_200_000_000)
        .link(b"/d/l", b"f");

    copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap();

    let md = |p: &str| std::fs::symlink_metadata(a.dest.join(p)).unwrap();
    assert_eq!(
        (md("d").mode() & 0o7777, md("d").mtime()),
        (0o750, 1_500_000_000)
    );
    assert_eq!(
        (md("d/ro").mode() & 0o7777, md("d/ro").mtime()),
        (0o555, 1_400_000_000)
    );
    assert_eq!(
        (
            md("d/ro/f").mode() & 0o7777,
            md("d/ro/f").mtime(),
            md("d/ro/f").mtime_nsec()
        ),
        (0o640, 1_300_000_000, 250)
    );
    assert_eq!(md("d/suid").mode() & 0o7777, 0o755);
    assert_eq!(md("d/l").mtime(), 7);
    std::fs::set_permissions(a.dest.join("d/ro"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn existing_file_is_refused_without_force_and_left_unchanged() {
    let a = area();
    std::fs::write(a.dest.join("f"), b"mine").unwrap();
    let mut fs = MemFs::new()
        .dir(b"/d", 0o755, 1)
        .file(b"/d/new", b"n", 0o644, 1)
        .file(b"/f", b"theirs", 0o644, 1);
    let sources = vec![b"/d".to_vec(), b"/f".to_vec()];

    let err = copy_out(&mut fs, &sources, &a.dest, &opts()).unwrap_err();

    assert!(
        err.to_string().contains("/f: already exists (use --force"),
        "{err}"
    );
    assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), b"mine");
    assert_eq!(listing(&a.dest), vec!["f"]);
}

#[test]
fn force_replaces_a_file_and_a_symlink_without_writing_through_it() {
    let a = area();
    let victim = a.outside.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::write(a.dest.join("f"), b"mine").unwrap();
    symlink(&victim, a.dest.join("x")).unwrap();
    let mut fs = MemFs::new()
        .file(b"/f", b"theirs", 0o644, 1)
        .file(b"/x", b"new", 0o644, 1);
    let sources = vec![b"/f".to_vec(), b"/x".to_vec()];

    copy_out(&mut fs, &sources, &a.dest, &force()).unwrap();

    assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), b"theirs");
    assert!(std::fs::symlink_metadata(a.dest.join("x"))
        .unwrap()
        .is_file());
    assert_eq!(std::fs::read(a.dest.join("x")).unwrap(), b"new");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn force_never_replaces_the_image_being_read() {
    let a = area();
    let image = a.dest.join("disk.img");
    std::fs::write(&image, b"the image").unwrap();
    let m = std::fs::metadata(&image).unwrap();
    let opts = CopyOptions {
        force: true,
        protected: vec![(
            std::os::unix::fs::MetadataExt::dev(&m),
            std::os::unix::fs::MetadataExt::ino(&m),
        )],
        ..CopyOptions::default()
    };
    let mut fs = MemFs::new().file(b"/disk.img", b"guest bytes", 0o644, 1);

    let err = copy_out(&mut fs, &src("/disk.img"), &a.dest, &opts).unwrap_err();

    assert!(
        err.to_string()
            .contains("is a file of the image being read"),
        "{err}"
    );
    assert_eq!(std::fs::read(&image).unwrap(), b"the image");
}

#[test]
fn force_never_replaces_a_directory_with_a_file() {
    let a = area();
    std::fs::create_dir(a.dest.join("f")).unwrap();
    let mut fs = MemFs::new().file(b"/f", b"theirs", 0o644, 1);

    let err = copy_out(&mut fs, &src("/f"), &a.dest, &force()).unwrap_err();

    assert!(err.to_string().contains("is a directory"), "{err}");
}

#[test]
fn existing_directory_is_merged_into() {
    let a = area();
    std::fs::create_dir(a.dest.join("d")).unwrap();
    std::fs::write(a.dest.join("d/old"), b"o").unwrap();
    let mut fs = MemFs::new()
        .dir(b"/d", 0o700, 1)
        .file(b"/d/new", b"n", 0o644, 1);

    copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap();

    assert_eq!(listing(&a.dest.join("d")), vec!["new", "old"]);
}

#[test]
fn several_sources_need_an_existing_directory() {
    let a = area();
    let mut fs = MemFs::new()
        .file(b"/a", b"a", 0o644, 1)
        .file(b"/b", b"b", 0o644, 1);
    let sources = vec![b"/a".to_vec(), b"/b".to_vec()];

    let err = copy_out(&mut fs, &sources, &a.dest.join("nope"), &opts()).unwrap_err();

    assert!(err.to_string().contains("not a directory"), "{err}");
    assert!(listing(&a.dest).is_empty());
}

#[test]
fn two_sources_with_the_same_name_are_refused() {
    let a = area();
    let mut fs = MemFs::new()
        .dir(b"/a", 0o755, 1)
        .dir(b"/b", 0o755, 1)
        .file(b"/a/x", b"1", 0o644, 1)
        .file(b"/b/x", b"2", 0o644, 1);
    let sources = vec![b"/a/x".to_vec(), b"/b/x".to_vec()];

    let err = copy_out(&mut fs, &sources, &a.dest, &opts()).unwrap_err();

    assert!(err.to_string().contains("listed twice"), "{err}");
    assert!(listing(&a.dest).is_empty());
}

#[test]
fn image_root_is_merged_into_an_existing_dest() {
    let a = area();
    let mut fs = MemFs::new()
        .dir(b"/etc", 0o755, 1)
        .file(b"/etc/os-release", b"ID=x", 0o644, 1);

    copy_out(&mut fs, &src("/"), &a.dest, &opts()).unwrap();

    assert_eq!(
        std::fs::read(a.dest.join("etc/os-release")).unwrap(),
        b"ID=x"
    );
}

#[test]
fn devices_fifos_and_sockets_are_skipped() {
    let a = area();
    let mut fs = MemFs::new()
        .dir(b"/dev", 0o755, 1)
        .special(b"/dev/null", FileType::CharDevice)
        .special(b"/dev/sda", FileType::BlockDevice)
        .special(b"/dev/fifo", FileType::Fifo)
        .special(b"/dev/sock", FileType::Socket)
        .file(b"/dev/plain", b"p", 0o644, 1);

    let stats = copy_out(&mut fs, &src("/dev"), &a.dest, &opts()).unwrap();

    assert_eq!(listing(&a.dest.join("dev")), vec!["plain"]);
    assert_eq!(stats.skipped, 4);
}

#[test]
fn zeros_become_holes_with_the_right_content() {
    let a = area();
    let mut data = vec![0u8; 1 << 20];
    data[5000] = 1;
    let mut fs = MemFs::new().file(b"/sparse", &data, 0o644, 1);

    copy_out(&mut fs, &src("/sparse"), &a.dest, &opts()).unwrap();

    let md = std::fs::metadata(a.dest.join("sparse")).unwrap();
    assert_eq!(std::fs::read(a.dest.join("sparse")).unwrap(), data);
    assert!(md.blocks() * 512 < md.len(), "{} blocks", md.blocks());
}

#[test]
fn missing_source_is_not_found() {
    let a = area();
    let mut fs = MemFs::new();

    let err = copy_out(&mut fs, &src("/nope"), &a.dest, &opts()).unwrap_err();

    assert_eq!(err.exit_code(), crate::error::exit::NOT_FOUND);
}

/// Run a copy of `/d` whose walk is `script`; the error, after checking that nothing
/// at all was written, inside or outside DEST.
fn hostile(script: Vec<WalkEntry>) -> String {
    let a = area();
    let mut fs = MemFs::new().dir(b"/d", 0o755, 1).script(script);

    let err = copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap_err();

    assert!(
        listing(&a.dest).is_empty(),
        "DEST changed: {:?}",
        listing(&a.dest)
    );
    assert!(listing(&a.outside).is_empty());
    assert!(matches!(err, Error::Guest { .. }), "{err}");
    err.to_string()
}

#[test]
fn hostile_dot_dot_component_is_refused() {
    let err = hostile(vec![w(&[b"..", b"outside", b"x"], FileType::Regular, None)]);

    assert!(err.contains("unsafe name .."), "{err}");
}

#[test]
fn hostile_slash_inside_a_component_is_refused() {
    let err = hostile(vec![w(&[b"../outside/x"], FileType::Regular, None)]);

    assert!(err.contains("contains '/'"), "{err}");
}

#[test]
fn hostile_empty_name_is_refused() {
    let err = hostile(vec![w(&[b""], FileType::Regular, None)]);

    assert!(err.contains("empty name"), "{err}");
}

#[test]
fn hostile_nul_in_name_is_refused() {
    let err = hostile(vec![w(&[b"a\0b"], FileType::Regular, None)]);

    assert!(err.contains("NUL"), "{err}");
}

#[test]
fn hostile_empty_path_is_refused() {
    let err = hostile(vec![w(&[], FileType::Regular, None)]);

    assert!(err.contains("empty path"), "{err}");
}

#[test]
fn hostile_file_below_a_symlink_is_refused() {
    let err = hostile(vec![
        w(&[b"a"], FileType::Symlink, Some(b"/tmp")),
        w(&[b"a", b"passwd"], FileType::Regular, None),
    ]);

    assert!(err.contains("d/a/passwd"), "{err}");
}

#[test]
fn hostile_file_before_its_parent_is_refused() {
    let err = hostile(vec![
        w(&[b"sub", b"f"], FileType::Regular, None),
        w(&[b"sub"], FileType::Directory, None),
    ]);

    assert!(
        err.contains("not a directory listed just before it"),
        "{err}"
    );
}

#[test]
fn hostile_duplicate_entry_is_refused() {
    let err = hostile(vec![
        w(&[b"f"], FileType::Regular, None),
        w(&[b"f"], FileType::Regular, None),
    ]);

    assert!(err.contains("listed twice"), "{err}");
}

#[test]
fn hostile_directory_then_symlink_of_the_same_name_is_refused() {
    let err = hostile(vec![
        w(&[b"a"], FileType::Directory, None),
        w(&[b"a"], FileType::Symlink, Some(b"/tmp")),
        w(&[b"a", b"f"], FileType::Regular, None),
    ]);

    assert!(err.contains("listed twice"), "{err}");
}

#[test]
fn hostile_entry_below_a_regular_file_is_refused() {
    let err = hostile(vec![
        w(&[b"f"], FileType::Regular, None),
        w(&[b"f", b"g"], FileType::Regular, None),
    ]);

    assert!(err.contains("d/f/g"), "{err}");
}

#[test]
fn hostile_timestamp_is_refused() {
    let mut bad = w(&[b"f"], FileType::Regular, None);
    bad.entry.mtime_nsec = 2_000_000_000;

    let err = hostile(vec![bad]);

    assert!(err.contains("invalid timestamp"), "{err}");
}

#[test]
fn hostile_symlink_without_target_is_refused() {
    let err = hostile(vec![w(&[b"l"], FileType::Symlink, None)]);

    assert!(err.contains("symlink target"), "{err}");
}

#[test]
fn hostile_stream_longer_than_announced_is_refused_and_removed() {
    let a = area();
    let mut fs = MemFs::new().file(b"/f", b"abc", 0o644, 1);
    fs.extra = b"and more".to_vec();

    let err = copy_out(&mut fs, &src("/f"), &a.dest, &opts()).unwrap_err();

    assert!(
        err.to_string().contains("more than its size of 3 bytes"),
        "{err}"
    );
    assert!(listing(&a.dest).is_empty());
}

/// `len` bytes without runs of zeros (so none of it becomes a hole).
fn pseudo(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 | 1).collect()
}

/// Regression: a copy killed mid-file left a partial file under its final name.
#[test]
fn a_file_being_written_never_has_its_final_name() {
    let a = area();
    let data = pseudo(20_000);
    let mut fs = MemFs::new().file(b"/f", &data, 0o644, 1);
    fs.peek = Some((a.dest.clone(), Vec::new()));

    copy_out(&mut fs, &src("/f"), &a.dest, &opts()).unwrap();

    let seen = fs.peek.map(|(_, s)| s).unwrap_or_default();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].len(), 1, "{seen:?}");
    assert!(seen[0][0].starts_with(PART_PREFIX), "{seen:?}");
    assert_eq!(listing(&a.dest), vec!["f"]);
    assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), data);
}

/// Regression: a tree copy that failed left its directories at mode 0700.
#[test]
fn a_failed_tree_copy_leaves_complete_files_and_final_modes_only() {
    let a = area();
    let mut fs = MemFs::new()
        .dir(b"/t", 0o755, 5)
        .dir(b"/t/sub", 0o750, 6)
        .file(b"/t/sub/a", b"first", 0o640, 7)
        .file(b"/t/sub/b", &pseudo(10_000), 0o644, 8)
        .file(b"/t/z", b"never", 0o644, 9);
    fs.fail = Some(key(b"/t/sub/b"));

    let err = copy_out(&mut fs, &src("/t"), &a.dest, &opts()).unwrap_err();

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let t = a.dest.join("t");
    assert!(err.to_string().contains("No space left"), "{err}");
    assert_eq!(listing(&t), vec!["sub"]);
    assert_eq!(listing(&t.join("sub")), vec!["a"]);
    assert_eq!(std::fs::read(t.join("sub/a")).unwrap(), b"first");
    assert_eq!((mode(&t), mode(&t.join("sub"))), (0o755, 0o750));
    assert_eq!(std::fs::metadata(t.join("sub")).unwrap().mtime(), 6);
}

#[test]
fn force_replaces_a_file_by_renaming_over_it() {
    let a = area();
    std::fs::write(a.dest.join("f"), b"old").unwrap();
    let mut fs = MemFs::new().file(b"/f", b"new", 0o600, 1);

    copy_out(&mut fs, &src("/f"), &a.dest, &force()).unwrap();

    assert_eq!(listing(&a.dest), vec!["f"]);
    assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), b"new");
}

#[test]
fn hostile_stream_shorter_than_announced_is_refused() {
    let a = area();
    let mut fs = MemFs::new().file(b"/f", b"abc", 0o644, 1);
    fs.nodes.get_mut(&key(b"/f")).unwrap().0.size = 10;

    let err = copy_out(&mut fs, &src("/f"), &a.dest, &opts()).unwrap_err();

    assert!(
        err.to_string()
            .contains("sent 3 bytes for a file of 10 bytes"),
        "{err}"
    );
    assert!(listing(&a.dest).is_empty());
}

#[test]
fn existing_symlink_in_dest_is_not_followed_into() {
    let a = area();
    symlink(&a.outside, a.dest.join("x")).unwrap();
    let mut fs = MemFs::new()
        .dir(b"/x", 0o755, 1)
        .file(b"/x/f", b"evil", 0o644, 1);

    let err = copy_out(&mut fs, &src("/x"), &a.dest, &force()).unwrap_err();

    assert!(
        err.to_string().contains("exists and is not a directory"),
        "{err}"
    );
    assert!(listing(&a.outside).is_empty());
}

#[test]
fn symlink_swapped_in_during_the_copy_is_not_followed() {
    let a = area();
    let mut fs = MemFs::new().dir(b"/x", 0o755, 1);
    let plan = make_plan(&mut fs, &src("/x"), &a.dest).unwrap();
    check_plan(&plan, false).unwrap();
    symlink(&a.outside, a.dest.join("x")).unwrap();
    let mut items = plan.items;
    items.push(Item {
        src: 0,
        path: key(b"x/f"),
        entry: entry(&key(b"x/f"), FileType::Regular, 0o644, 4, 1, None),
    });
    let plan = Plan { items, ..plan };

    let err = apply(&mut fs, &plan, &opts(), &mut Progress::new(false, 0)).unwrap_err();

    assert!(
        err.to_string().contains("exists and is not a directory"),
        "{err}"
    );
    assert!(listing(&a.outside).is_empty());
}

#[test]
fn second_pass_alone_refuses_a_file_below_a_symlink_it_created() {
    let a = area();
    let mut fs = MemFs::new().dir(b"/d", 0o755, 1);
    let mut plan = make_plan(&mut fs, &src("/d"), &a.dest).unwrap();
    let link = entry(
        &key(b"d/a"),
        FileType::Symlink,
        0o777,
        0,
        1,
        Some(a.outside.as_os_str().as_bytes()),
    );
    plan.items.push(Item {
        src: 0,
        path: key(b"d/a"),
        entry: link,
    });
    plan.items.push(Item {
        src: 0,
        path: key(b"d/a/f"),
        entry: entry(&key(b"d/a/f"), FileType::Regular, 0o644, 0, 1, None),
    });

    let err = apply(&mut fs, &plan, &opts(), &mut Progress::new(false, 0)).unwrap_err();

    assert!(
        err.to_string()
            .contains("not a directory listed just before it"),
        "{err}"
    );
    assert!(listing(&a.outside).is_empty());
}

#[test]
fn dest_given_as_a_symlink_to_a_directory_is_followed() {
    let a = area();
    let link = a.outside.parent().unwrap().join("dest-link");
    symlink(&a.dest, &link).unwrap();
    let mut fs = MemFs::new().file(b"/f", b"data", 0o644, 1);

    copy_out(&mut fs, &src("/f"), &link, &opts()).unwrap();

    assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), b"data");
}

#[test]
fn walk_budget_stops_at_its_entry_limit() {
    let mut b = Budget::new(2, 1000);
    let e = entry(&key(b"x"), FileType::Regular, 0o644, 0, 1, None);
    b.take(&key(b"x"), &e).unwrap();
    b.take(&key(b"y"), &e).unwrap();

    let err = b.take(&key(b"z"), &e).unwrap_err();

    assert!(err.to_string().contains("more than 2 entries"), "{err}");
}

#[test]
fn walk_budget_counts_names_and_link_targets() {
    let mut b = Budget::new(10, 8);
    let link = entry(
        &key(b"ab"),
        FileType::Symlink,
        0o777,
        0,
        1,
        Some(b"/target"),
    );

    let err = b.take(&key(b"ab"), &link).unwrap_err();

    assert!(
        err.to_string().contains("more than 8 bytes of names"),
        "{err}"
    );
}

#[test]
fn source_name_is_the_last_component() {
    let got = source_name(b"/home/me/letter//").unwrap();

    assert_eq!(got, (b"/home/me/letter".to_vec(), Some(b"letter".to_vec())));
}

#[test]
fn source_ending_in_dot_dot_is_refused() {
    let err = source_name(b"/home/..").unwrap_err();

    assert!(err.to_string().contains("cannot name the copy"), "{err}");
}

#[test]
fn source_arg_splits_at_an_existing_image_path_containing_colon_slash() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("im:")).unwrap();
    let image = tmp.path().join("im:/g.raw");
    std::fs::write(&image, b"").unwrap();
    let arg = format!("{}:/etc/hosts", image.display());

    let (img, path) = split_source_arg(&arg).unwrap();

    assert_eq!((img, path), (image, b"/etc/hosts".to_vec()));
}

#[test]
fn source_arg_splits_at_the_first_colon_slash_when_nothing_exists() {
    let (img, path) = split_source_arg("101:/etc/a:/b").unwrap();

    assert_eq!((img, path), (PathBuf::from("101"), b"/etc/a:/b".to_vec()));
}

#[test]
fn source_without_image_is_a_usage_error() {
    let err = parse_args(&["disk.img".into(), "out".into()]).unwrap_err();

    assert_eq!(err.exit_code(), crate::error::exit::USAGE);
    assert!(err.to_string().contains("IMAGE:/PATH"), "{err}");
}

#[test]
fn sources_from_two_images_are_a_usage_error() {
    let err = parse_args(&["a.img:/x".into(), "b.img:/y".into(), "out".into()]).unwrap_err();

    assert_eq!(err.exit_code(), crate::error::exit::USAGE);
}

#[test]
fn show_escapes_control_and_invalid_bytes() {
    assert_eq!(show(b"a\nb\xffc d"), "a?b?c d");
}
