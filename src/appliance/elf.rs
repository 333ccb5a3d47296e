//! Just enough ELF to copy a dynamically linked host program into the appliance with
//! the shared libraries it needs (the supermin approach): read PT_INTERP and the
//! DT_NEEDED / DT_RUNPATH entries of the dynamic section, then resolve them the way the
//! dynamic loader does on a Debian multiarch system.
//!
//! Inputs are host binaries from installed packages, not image content, but the parser
//! is still bounds-checked: a malformed file is an error, never a panic.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// e_ident[EI_CLASS] for 64-bit objects.
const ELFCLASS64: u8 = 2;
/// e_ident[EI_DATA] for little-endian objects.
const ELFDATA2LSB: u8 = 1;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
/// Most libraries one program may pull in before we call it a loop or a bad file.
const MAX_LIBS: usize = 512;
/// Largest ELF file we read whole (libraries are far smaller).
const MAX_ELF_SIZE: u64 = 1 << 30;

/// Library directories the Debian x86-64 loader searches by default, in order.
const DEFAULT_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed ELF: {what}"))
}

/// What the loader needs to know about one ELF file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    /// PT_INTERP: the program interpreter (absent for static binaries and libraries).
    pub interp: Option<String>,
    /// DT_NEEDED sonames, in order.
    pub needed: Vec<String>,
    /// DT_RUNPATH or DT_RPATH directories, `$ORIGIN` not expanded.
    pub runpath: Vec<String>,
    /// True if the file has a dynamic section at all.
    pub dynamic: bool,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&self, off: u64, len: u64) -> io::Result<&[u8]> {
        let start = usize::try_from(off).map_err(|_| bad("offset"))?;
        let len = usize::try_from(len).map_err(|_| bad("length"))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| bad("offset overflow"))?;
        self.0
            .get(start..end)
            .ok_or_else(|| bad("offset past end of file"))
    }
    fn u16(&self, off: u64) -> io::Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(off, 2)?.try_into().unwrap()))
    }
    fn u32(&self, off: u64) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(off, 4)?.try_into().unwrap()))
    }
    fn u64(&self, off: u64) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(off, 8)?.try_into().unwrap()))
    }
    fn cstr(&self, off: u64) -> io::Result<String> {
        let start = usize::try_from(off).map_err(|_| bad("string offset"))?;
        let rest = self.0.get(start..).ok_or_else(|| bad("string past end"))?;
        let len = rest
            .iter()
            .take(4096)
            .position(|&b| b == 0)
            .ok_or_else(|| bad("unterminated string"))?;
        Ok(String::from_utf8_lossy(&rest[..len]).into_owned())
    }
}

/// One program header: (type, file offset, virtual address, file size).
type Phdr = (u32, u64, u64, u64);

/// The program headers of a 64-bit little-endian ELF file, and where their table ends.
fn program_headers(r: &Reader) -> io::Result<(Vec<Phdr>, u64)> {
    if r.bytes(0, 4)? != ELF_MAGIC
        || r.bytes(4, 1)?[0] != ELFCLASS64
        || r.bytes(5, 1)?[0] != ELFDATA2LSB
    {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    let phoff = r.u64(0x20)?;
    let phentsize = u64::from(r.u16(0x36)?);
    let phnum = u64::from(r.u16(0x38)?);
    if phentsize < 56 {
        return Err(bad("program header size"));
    }
    let mut phdrs: Vec<Phdr> = Vec::new();
    for i in 0..phnum {
        let base = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("program header offset"))?;
        phdrs.push((
            r.u32(base)?,
            r.u64(base + 8)?,
            r.u64(base + 16)?,
            r.u64(base + 32)?,
        ));
    }
    Ok((phdrs, phoff + phnum * phentsize))
}

/// The file without what only debuggers and linkers read: everything after the last
/// byte a program header covers (debug info, symbol tables, section headers) is cut,
/// and the section header table is dropped from the ELF header. The loader and the
/// kernel use program headers only, so the result runs the same; in the appliance it
/// makes the initramfs smaller, and every MiB of it costs boot time under TCG.
pub fn strip_to_segments(data: &[u8]) -> io::Result<Vec<u8>> {
    let r = Reader(data);
    let (phdrs, table_end) = program_headers(&r)?;
    let mut end = table_end.max(64);
    for &(_, off, _, filesz) in &phdrs {
        end = end.max(
            off.checked_add(filesz)
                .ok_or_else(|| bad("segment size overflow"))?,
        );
    }
    let mut out = r.bytes(0, end)?.to_vec();
    // e_shoff, e_shnum, e_shstrndx: no section header table.
    out[0x28..0x30].fill(0);
    out[0x3c..0x40].fill(0);
    Ok(out)
}

/// Parse the parts of a 64-bit little-endian ELF file the loader needs.
pub fn parse(data: &[u8]) -> io::Result<Dynamic> {
    let r = Reader(data);
    let (phdrs, _) = program_headers(&r)?;
    let mut out = Dynamic::default();
    for &(kind, off, _, filesz) in &phdrs {
        if kind == PT_INTERP {
            let raw = r.bytes(off, filesz)?;
            let s = raw.split(|&b| b == 0).next().unwrap_or_default();
            out.interp = Some(String::from_utf8_lossy(s).into_owned());
        }
    }
    let Some(&(_, dyn_off, _, dyn_size)) = phdrs.iter().find(|p| p.0 == PT_DYNAMIC) else {
        return Ok(out);
    };
    out.dynamic = true;
    let mut entries = Vec::new();
    let mut strtab_addr = None;
    for i in 0..dyn_size / 16 {
        let tag = r.u64(dyn_off + i * 16)?;
        let val = r.u64(dyn_off + i * 16 + 8)?;
        match tag {
            DT_NULL => break,
            DT_STRTAB => strtab_addr = Some(val),
            _ => entries.push((tag, val)),
        }
    }
    let strtab_addr = strtab_addr.ok_or_else(|| bad("dynamic section without DT_STRTAB"))?;
    // DT_STRTAB is a virtual address: map it through the PT_LOAD segment containing it.
    let strtab = phdrs
        .iter()
        .filter(|p| p.0 == PT_LOAD && p.2 <= strtab_addr && strtab_addr < p.2.saturating_add(p.3))
        .map(|p| strtab_addr - p.2 + p.1)
        .next()
        .ok_or_else(|| bad("DT_STRTAB outside every loaded segment"))?;
    for (tag, val) in entries {
        let s = || {
            r.cstr(
                strtab
                    .checked_add(val)
                    .ok_or_else(|| bad("string offset overflow"))?,
            )
        };
        match tag {
            DT_NEEDED => out.needed.push(s()?),
            DT_RUNPATH | DT_RPATH => out
                .runpath
                .extend(s()?.split(':').filter(|p| !p.is_empty()).map(String::from)),
            _ => {}
        }
    }
    Ok(out)
}

fn read_elf(path: &Path) -> io::Result<Dynamic> {
    let len = fs::metadata(path)?.len();
    if len > MAX_ELF_SIZE {
        return Err(bad("file too large"));
    }
    parse(&fs::read(path)?)
}

/// True if `path` is an ELF executable with no program interpreter and no dynamic
/// section (a statically linked program).
pub fn is_static(path: &Path) -> io::Result<bool> {
    let d = read_elf(path)?;
    Ok(d.interp.is_none() && d.needed.is_empty())
}

/// Every shared object `program` needs (its interpreter included), as
/// (host file to copy, path the guest's loader will look for), in a stable order.
pub fn closure(program: &Path) -> io::Result<Vec<(PathBuf, PathBuf)>> {
    let mut found: BTreeMap<String, (PathBuf, PathBuf)> = BTreeMap::new();
    let top = read_elf(program)?;
    if let Some(interp) = &top.interp {
        let p = PathBuf::from(interp);
        found.insert(interp.clone(), (fs::canonicalize(&p)?, p));
    }
    let origin = program.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut queue: VecDeque<(String, Vec<String>, PathBuf)> = top
        .needed
        .iter()
        .map(|n| (n.clone(), top.runpath.clone(), origin.clone()))
        .collect();
    while let Some((soname, runpath, origin)) = queue.pop_front() {
        if found.contains_key(&soname) {
            continue;
        }
        if found.len() >= MAX_LIBS {
            return Err(bad("too many shared libraries"));
        }
        let path = locate(&soname, &runpath, &origin).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "shared library {soname} needed by {} not found",
                    program.display()
                ),
            )
        })?;
        let d = read_elf(&path)?;
        let lib_origin = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        for n in &d.needed {
            queue.push_back((n.clone(), d.runpath.clone(), lib_origin.clone()));
        }
        found.insert(soname, (fs::canonicalize(&path)?, path));
    }
    Ok(found.into_values().collect())
}

/// Find a soname: a name with '/' is a path; otherwise RUNPATH (with $ORIGIN), then the
/// default directories.
fn locate(soname: &str, runpath: &[String], origin: &Path) -> Option<PathBuf> {
    if soname.contains('/') {
        let p = PathBuf::from(soname);
        return p.is_file().then_some(p);
    }
    let origin = origin.to_string_lossy();
    let rp = runpath
        .iter()
        .map(|d| d.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin));
    rp.chain(DEFAULT_DIRS.iter().map(|s| s.to_string()))
        .map(|d| Path::new(&d).join(soname))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_static_is_static() {
        let bb = Path::new("/bin/busybox");
        assert!(
            bb.exists(),
            "/bin/busybox missing: install the Debian package busybox-static"
        );

        let r = is_static(bb).unwrap();

        assert!(r);
    }

    #[test]
    fn this_test_binary_needs_libc_and_its_loader() {
        let exe = std::env::current_exe().unwrap();

        let libs = closure(&exe).unwrap();

        let guest: Vec<String> = libs
            .iter()
            .map(|(_, g)| g.to_string_lossy().into_owned())
            .collect();
        assert!(guest.iter().any(|g| g.ends_with("/libc.so.6")), "{guest:?}");
        assert!(
            guest.iter().any(|g| g.contains("ld-linux-x86-64.so.2")),
            "{guest:?}"
        );
        assert!(libs.iter().all(|(h, _)| h.is_file()));
    }

    #[test]
    fn stripped_program_is_smaller_and_runs_the_same() {
        use std::os::unix::fs::PermissionsExt;
        let exe = std::env::current_exe().unwrap();
        let data = fs::read(&exe).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("stripped");

        let stripped = strip_to_segments(&data).unwrap();

        fs::write(&copy, &stripped).unwrap();
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            stripped.len() < data.len(),
            "{} !< {}",
            stripped.len(),
            data.len()
        );
        assert_eq!(parse(&stripped).unwrap(), parse(&data).unwrap());
        // This test binary lists its tests identically either way.
        let list = |p: &Path| {
            std::process::Command::new(p)
                .args(["--list", "stripped_program"])
                .output()
                .unwrap()
        };
        let (a, b) = (list(&exe), list(&copy));
        assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
        assert_eq!(a.stdout, b.stdout);
    }

    #[test]
    fn truncated_file_is_an_error_not_a_panic() {
        let data = b"\x7fELF\x02\x01\x01\0\0\0\0\0";

        let err = parse(data).unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn non_elf_is_refused() {
        let err = parse(b"#!/bin/sh\necho hi\n").unwrap_err();

        assert!(err.to_string().contains("not a 64-bit"));
    }
}
