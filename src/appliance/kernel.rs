//! Finding the host kernel and turning its bzImage into an ELF `vmlinux` QEMU can boot
//! through the PVH entry point (about 0.3 s faster under TCG than the bzImage path,
//! which has to run the real-mode setup and the in-guest decompressor).

use super::ApplianceError;
use std::fs;
use std::path::{Path, PathBuf};

/// bzImage: "HdrS" boot protocol signature at this offset (Documentation/x86/boot.rst).
const HDRS_OFFSET: usize = 0x202;
/// bzImage: number of 512-byte setup sectors (0 means 4).
const SETUP_SECTS_OFFSET: usize = 0x1f1;
/// bzImage (protocol 2.08+): offset of the compressed payload from the protected-mode code.
const PAYLOAD_OFFSET: usize = 0x248;
/// bzImage (protocol 2.08+): length of the compressed payload.
const PAYLOAD_LENGTH: usize = 0x24c;
/// LZ4 "legacy" frame magic, as the kernel's lz4 compressor writes it.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Each legacy LZ4 block decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Largest vmlinux we are willing to produce.
const MAX_VMLINUX: usize = 512 << 20;
/// ELF note type of the PVH 32-bit entry point (xen/include/public/elfnote.h).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

mod package;
pub use package::FetchError;

/// The kernel found for the appliance.
#[derive(Debug, Clone)]
pub struct Found {
    /// The kernel file to boot (or to extract the PVH `vmlinux` from).
    pub kernel: PathBuf,
    /// Its release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// Its modules, when they are not the host's `/lib/modules/<release>` (a fetched
    /// package's own); `IMGSAFE_MODULES` still wins.
    pub modules_dir: Option<PathBuf>,
}

/// Test-only: search this directory instead of `/boot` (the tests point it at an
/// unreadable copy of the host kernel). Not a user setting: use `IMGSAFE_KERNEL`.
const TEST_BOOT_DIR_ENV: &str = "IMGSAFE_TEST_BOOT_DIR";

/// The kernel to boot and its release: `IMGSAFE_KERNEL` if set, else the newest
/// `/boot/vmlinuz-*` that has a matching `/lib/modules/<release>`, a Debian cloud
/// kernel first (it is smaller and boots faster in a VM). When that file is not
/// readable by this user (Ubuntu installs it 0600), the distribution's package of it
/// is fetched into the cache with apt-get instead (see [`package`]), said once.
pub fn find() -> Result<Found, ApplianceError> {
    if let Some(k) = std::env::var_os("IMGSAFE_KERNEL").filter(|v| !v.is_empty()) {
        let k = PathBuf::from(k);
        // Say first that the file is missing or unreadable: that is the likelier mistake.
        check_readable(&k)?;
        let release = release_of(&k)
            .or_else(|| std::env::var("IMGSAFE_KERNEL_RELEASE").ok())
            .ok_or_else(|| {
                ApplianceError::Invalid(format!(
                    "IMGSAFE_KERNEL={}: name it vmlinuz-<release> or set IMGSAFE_KERNEL_RELEASE",
                    k.display()
                ))
            })?;
        return Ok(Found {
            kernel: k,
            release,
            modules_dir: None,
        });
    }
    let boot = std::env::var_os(TEST_BOOT_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/boot"), PathBuf::from);
    let mut candidates: Vec<(bool, std::time::SystemTime, PathBuf, String)> = fs::read_dir(&boot)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let rel = release_of(&p)?;
            let mtime = e.metadata().ok()?.modified().ok()?;
            let cloud = rel.contains("-cloud-");
            Path::new("/lib/modules")
                .join(&rel)
                .is_dir()
                .then_some((cloud, mtime, p, rel))
        })
        .collect();
    candidates.sort();
    let (_, _, k, rel) = candidates.pop().ok_or(ApplianceError::Missing {
        what: "a Linux kernel",
        where_: format!("{}/vmlinuz-*", boot.display()),
        package: "linux-image-cloud-amd64",
    })?;
    match fs::File::open(&k) {
        Ok(_) => Ok(Found {
            kernel: k,
            release: rel,
            modules_dir: None,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => from_package(&k, &rel),
        Err(e) => Err(open_error(&k, e)),
    }
}

/// The unreadable `host` kernel's package, fetched (or found) in the cache.
fn from_package(host: &Path, release: &str) -> Result<Found, ApplianceError> {
    let cache = super::cache_root()?;
    let (f, downloaded) = package::fetch(&cache, host, release)?;
    if downloaded {
        eprintln!(
            "imgsafe: kernel {} is not readable by this user; using its distribution \
             package instead (apt-get download, unpacked to {})",
            host.display(),
            f.kernel.parent().unwrap_or(&cache).display()
        );
    } else {
        crate::trace::note(&format!(
            "kernel {} is not readable: using {}",
            host.display(),
            f.kernel.display()
        ));
    }
    Ok(Found {
        kernel: f.kernel,
        release: f.release,
        modules_dir: f.modules_dir,
    })
}

fn release_of(p: &Path) -> Option<String> {
    let name = p.file_name()?.to_str()?;
    name.strip_prefix("vmlinuz-")
        .or_else(|| name.strip_prefix("vmlinux-"))
        .map(String::from)
}

fn check_readable(k: &Path) -> Result<(), ApplianceError> {
    fs::File::open(k).map(drop).map_err(|e| open_error(k, e))
}

fn open_error(k: &Path, e: std::io::Error) -> ApplianceError {
    ApplianceError::Invalid(match e.kind() {
        std::io::ErrorKind::NotFound => format!("kernel {}: no such file", k.display()),
        _ => format!(
            "kernel {} is not readable by this user ({e}); make it readable or point IMGSAFE_KERNEL at a readable copy",
            k.display()
        ),
    })
}

/// The uncompressed ELF kernel inside a bzImage, if it is LZ4-compressed (Debian's
/// choice) and has a PVH entry note; `None` otherwise (the bzImage is booted as is).
/// A kernel that already is an ELF file is returned unchanged if it has the note.
pub fn extract_vmlinux(kernel: &Path) -> Result<Option<Vec<u8>>, ApplianceError> {
    let data = fs::read(kernel).map_err(|e| ApplianceError::io(kernel, e))?;
    let elf = if data.starts_with(b"\x7fELF") {
        Some(data)
    } else {
        decompress_payload(&data)
    };
    Ok(elf.filter(|e| has_pvh_note(e)))
}

fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        d.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn decompress_payload(bz: &[u8]) -> Option<Vec<u8>> {
    if bz.get(HDRS_OFFSET..HDRS_OFFSET + 4)? != b"HdrS" {
        return None;
    }
    let setup_sects = match *bz.get(SETUP_SECTS_OFFSET)? {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let start = pm_start.checked_add(u32_at(bz, PAYLOAD_OFFSET)? as usize)?;
    let end = start.checked_add(u32_at(bz, PAYLOAD_LENGTH)? as usize)?;
    lz4_legacy(bz.get(start..end)?)
}

/// Decode the LZ4 legacy format: magic, then blocks of (u32 LE compressed size, data).
/// The kernel appends the uncompressed size after the last block; a size that runs past
/// the end marks that trailer.
fn lz4_legacy(src: &[u8]) -> Option<Vec<u8>> {
    if u32_at(src, 0)? != LZ4_LEGACY_MAGIC {
        return None;
    }
    let mut out = Vec::new();
    let mut pos = 4;
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while let Some(size) = u32_at(src, pos) {
        if size == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let size = size as usize;
        let Some(chunk) = src.get(pos + 4..pos + 4 + size) else {
            break;
        };
        let n = lz4_flex::block::decompress_into(chunk, &mut block).ok()?;
        if out.len() + n > MAX_VMLINUX {
            return None;
        }
        out.extend_from_slice(&block[..n]);
        pos += 4 + size;
    }
    (!out.is_empty()).then_some(out)
}

/// True if a 64-bit ELF file has a PT_NOTE with the Xen PVH entry note.
fn has_pvh_note(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let base = phoff as usize + i * usize::from(phentsize);
        if u32_at(elf, base) != Some(4) {
            return false; // not PT_NOTE
        }
        let (Some(off), Some(size)) = (u64_at(base + 8), u64_at(base + 32)) else {
            return false;
        };
        let Some(notes) = elf.get(off as usize..(off as usize).saturating_add(size as usize))
        else {
            return false;
        };
        let mut p = 0;
        while let (Some(namesz), Some(descsz), Some(kind)) =
            (u32_at(notes, p), u32_at(notes, p + 4), u32_at(notes, p + 8))
        {
            let name = notes
                .get(p + 12..p + 12 + namesz as usize)
                .unwrap_or_default();
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
                return true;
            }
            let align = |n: u32| (n as usize).div_ceil(4) * 4;
            p += 12 + align(namesz) + align(descsz);
        }
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_is_taken_from_the_file_name() {
        assert_eq!(
            release_of(Path::new("/boot/vmlinuz-6.1.0-56-cloud-amd64")).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(release_of(Path::new("/boot/initrd.img-6.1")), None);
    }

    #[test]
    fn lz4_legacy_decodes_blocks_and_ignores_size_trailer() {
        let plain: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let block = lz4_flex::block::compress(&plain);
        let mut src = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        src.extend((block.len() as u32).to_le_bytes());
        src.extend(&block);
        src.extend((plain.len() as u32).to_le_bytes());

        let out = lz4_legacy(&src).unwrap();

        assert_eq!(out, plain);
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        assert_eq!(decompress_payload(&[0u8; 4096]), None);
        assert!(!has_pvh_note(b"\x7fELF"));
    }

    #[test]
    fn host_kernel_extracts_to_pvh_elf() {
        let k = find().expect("no kernel: install the Debian package linux-image-cloud-amd64");

        let elf = extract_vmlinux(&k.kernel)
            .unwrap()
            .expect("Debian's LZ4 bzImage should yield a PVH vmlinux");

        assert!(elf.starts_with(b"\x7fELF"));
    }
}
