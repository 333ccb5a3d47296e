//! Installed-package databases kept as text: dpkg's `status`, apk's `installed`, and
//! pacman's `local/*/desc`. Pure functions over bytes read from the guest (hostile:
//! bounded by the caller; names and versions are checked here). rpm's database is a
//! binary format (Berkeley DB, SQLite or NDB) and is not read.

use super::ParseError;
use serde::Serialize;

/// Most packages one database may list before imgsafe gives up on it.
pub const MAX_PACKAGES: usize = 200_000;
/// Longest package name, version or architecture kept.
const MAX_FIELD: usize = 256;

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Installed version, as the database spells it.
    pub version: String,
    /// Architecture, when the database records it.
    pub arch: Option<String>,
}

/// A field value imgsafe keeps: short, printable ASCII without spaces (package names,
/// versions and architectures of all three formats are).
fn field(v: &[u8], line: usize, what: &'static str) -> Result<String, ParseError> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > MAX_FIELD || !v.iter().all(|b| b.is_ascii_graphic()) {
        return Err(ParseError::new(line, what));
    }
    Ok(String::from_utf8_lossy(v).into_owned())
}

/// Split `text` into paragraphs of (line number, line) separated by blank lines.
fn paragraphs(text: &[u8]) -> Vec<Vec<(usize, &[u8])>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for (i, line) in text.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.trim_ascii().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push((i + 1, line));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// dpkg's `/var/lib/dpkg/status` (deb822 paragraphs): the packages whose `Status` says
/// `installed` (not removed-with-config, half-installed, ...).
pub fn parse_dpkg_status(text: &[u8]) -> Result<Vec<Package>, ParseError> {
    let mut out = Vec::new();
    for para in paragraphs(text) {
        let (mut name, mut version, mut arch, mut installed) = (None, None, None, false);
        let start = para[0].0;
        for &(n, line) in &para {
            if line.starts_with(b" ") || line.starts_with(b"\t") {
                continue; // continuation of a multi-line field
            }
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                return Err(ParseError::new(n, "not Field: value"));
            };
            let (key, value) = (&line[..colon], &line[colon + 1..]);
            match key {
                b"Package" => name = Some(field(value, n, "bad Package")?),
                b"Version" => version = Some(field(value, n, "bad Version")?),
                b"Architecture" => arch = Some(field(value, n, "bad Architecture")?),
                b"Status" => {
                    installed =
                        value.trim_ascii().split(|b| *b == b' ').nth(2) == Some(b"installed")
                }
                _ => {}
            }
        }
        if !installed {
            continue;
        }
        let name = name.ok_or(ParseError::new(start, "installed package without Package"))?;
        let version = version.ok_or(ParseError::new(start, "installed package without Version"))?;
        push(
            &mut out,
            Package {
                name,
                version,
                arch,
            },
            start,
        )?;
    }
    Ok(out)
}

fn push(out: &mut Vec<Package>, p: Package, line: usize) -> Result<(), ParseError> {
    if out.len() >= MAX_PACKAGES {
        return Err(ParseError::new(line, "too many packages"));
    }
    out.push(p);
    Ok(())
}

/// apk's `/lib/apk/db/installed`: records of `X:value` lines, `P:` name, `V:` version,
/// `A:` architecture.
pub fn parse_apk_installed(text: &[u8]) -> Result<Vec<Package>, ParseError> {
    let mut out = Vec::new();
    for para in paragraphs(text) {
        let (mut name, mut version, mut arch) = (None, None, None);
        let start = para[0].0;
        for &(n, line) in &para {
            match line {
                [b'P', b':', v @ ..] => name = Some(field(v, n, "bad P: (name)")?),
                [b'V', b':', v @ ..] => version = Some(field(v, n, "bad V: (version)")?),
                [b'A', b':', v @ ..] => arch = Some(field(v, n, "bad A: (architecture)")?),
                [_, b':', ..] => {}
                _ => return Err(ParseError::new(n, "not X:value")),
            }
        }
        let name = name.ok_or(ParseError::new(start, "record without P: (name)"))?;
        let version = version.ok_or(ParseError::new(start, "record without V: (version)"))?;
        push(
            &mut out,
            Package {
                name,
                version,
                arch,
            },
            start,
        )?;
    }
    Ok(out)
}

/// One pacman `local/<name>-<version>/desc`: `%NAME%`, `%VERSION%` and `%ARCH%`
/// sections, each a header line followed by its value lines.
pub fn parse_pacman_desc(text: &[u8]) -> Result<Package, ParseError> {
    let (mut name, mut version, mut arch) = (None, None, None);
    let mut section: Option<&[u8]> = None;
    for (i, line) in text.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            section = None;
            continue;
        }
        if line.len() > 2 && line.starts_with(b"%") && line.ends_with(b"%") {
            section = Some(line);
            continue;
        }
        let slot = match section {
            Some(b"%NAME%") => &mut name,
            Some(b"%VERSION%") => &mut version,
            Some(b"%ARCH%") => &mut arch,
            Some(_) => continue,
            None => return Err(ParseError::new(n, "value outside a %SECTION%")),
        };
        if slot.is_none() {
            *slot = Some(field(line, n, "bad value")?);
        }
    }
    Ok(Package {
        name: name.ok_or(ParseError::new(0, "no %NAME%"))?,
        version: version.ok_or(ParseError::new(0, "no %VERSION%"))?,
        arch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str, arch: Option<&str>) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            arch: arch.map(String::from),
        }
    }

    #[test]
    fn dpkg_status_lists_only_installed_packages() {
        let text = b"Package: bash\nStatus: install ok installed\nArchitecture: amd64\n\
Version: 5.2.15-2+b2\nDescription: GNU shell\n multi-line\n .\n\n\
Package: old\nStatus: deinstall ok config-files\nVersion: 1\n\n\
Package: zlib1g\nStatus: install ok installed\nVersion: 1:1.2.13\n";

        let pkgs = parse_dpkg_status(text).unwrap();

        assert_eq!(
            pkgs,
            vec![
                pkg("bash", "5.2.15-2+b2", Some("amd64")),
                pkg("zlib1g", "1:1.2.13", None)
            ]
        );
    }

    #[test]
    fn dpkg_installed_without_version_is_an_error() {
        let e = parse_dpkg_status(b"\nPackage: x\nStatus: install ok installed\n").unwrap_err();

        assert_eq!(e, ParseError::new(2, "installed package without Version"));
    }

    #[test]
    fn dpkg_names_with_control_characters_are_refused() {
        let text = b"Package: a\x1b[2J\nStatus: install ok installed\nVersion: 1\n";

        assert!(parse_dpkg_status(text).is_err());
    }

    #[test]
    fn apk_installed_records() {
        let text = b"C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nS:383152\n\nP:busybox\nV:1.36.1-r5\n";

        let pkgs = parse_apk_installed(text).unwrap();

        assert_eq!(
            pkgs,
            vec![
                pkg("musl", "1.2.4-r2", Some("x86_64")),
                pkg("busybox", "1.36.1-r5", None)
            ]
        );
    }

    #[test]
    fn apk_record_without_version_is_an_error() {
        assert!(parse_apk_installed(b"P:musl\n").is_err());
        assert!(parse_apk_installed(b"garbage line\n").is_err());
    }

    #[test]
    fn pacman_desc_sections() {
        let text =
            b"%NAME%\nlinux\n\n%VERSION%\n6.6.1.arch1-1\n\n%DESC%\nThe kernel\n\n%ARCH%\nx86_64\n";

        assert_eq!(
            parse_pacman_desc(text).unwrap(),
            pkg("linux", "6.6.1.arch1-1", Some("x86_64"))
        );
    }

    #[test]
    fn pacman_desc_without_name_is_an_error() {
        assert!(parse_pacman_desc(b"%VERSION%\n1\n").is_err());
    }
}
