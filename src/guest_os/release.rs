//! What distribution a root is: os-release (`ID`, `VERSION_ID`, `PRETTY_NAME`, `NAME`)
//! and the older per-distribution release files. Pure functions over bytes read from
//! the guest (hostile: bounded by the caller, every value length-checked here).

use super::ParseError;

/// Longest value imgsafe keeps from a release file.
pub const MAX_VALUE: usize = 1024;

/// The fields of os-release(5) imgsafe reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsRelease {
    /// `ID`: lower-case distribution id (`debian`, `alpine`, `fedora`).
    pub id: Option<String>,
    /// `VERSION_ID`.
    pub version_id: Option<String>,
    /// `PRETTY_NAME`.
    pub pretty_name: Option<String>,
    /// `NAME`.
    pub name: Option<String>,
}

/// Parse os-release(5): `KEY=VALUE` lines, values optionally in single or double quotes
/// (double-quoted ones with `\` escapes), `#` comments and blank lines ignored.
pub fn parse_os_release(text: &[u8]) -> Result<OsRelease, ParseError> {
    let text = std::str::from_utf8(text).map_err(|_| ParseError::new(0, "not UTF-8"))?;
    let mut out = OsRelease::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, raw) = line
            .split_once('=')
            .ok_or(ParseError::new(n, "not KEY=VALUE"))?;
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ParseError::new(n, "bad key"));
        }
        let value = unquote(raw).ok_or(ParseError::new(n, "bad quoting"))?;
        if value.len() > MAX_VALUE {
            return Err(ParseError::new(n, "value too long"));
        }
        let slot = match key {
            "ID" => &mut out.id,
            "VERSION_ID" => &mut out.version_id,
            "PRETTY_NAME" => &mut out.pretty_name,
            "NAME" => &mut out.name,
            _ => continue,
        };
        *slot = Some(value).filter(|v| !v.is_empty());
    }
    Ok(out)
}

/// A shell-style value: bare, `'single'` (literal) or `"double"` (`\"`, `\\`, `\$`,
/// `` \` `` escapes). None when a quote is not closed or text follows it.
fn unquote(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let Some(first) = raw.chars().next() else {
        return Some(String::new());
    };
    if first != '"' && first != '\'' {
        return Some(raw.to_string());
    }
    let mut out = String::new();
    let mut chars = raw[1..].chars();
    loop {
        match chars.next()? {
            c if c == first => break,
            '\\' if first == '"' => match chars.next()? {
                c @ ('"' | '\\' | '$' | '`') => out.push(c),
                c => {
                    out.push('\\');
                    out.push(c);
                }
            },
            c => out.push(c),
        }
    }
    chars.as_str().trim().is_empty().then_some(out)
}

/// What an old-style release file says: distribution id, version, and the line itself
/// as the product name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseFile {
    /// Distribution id in os-release's spelling.
    pub id: String,
    /// Version, when the file has one.
    pub version: Option<String>,
    /// The file's first line, when it is a sentence (not just a number).
    pub product_name: Option<String>,
}

/// Release files of distributions that predate os-release (or keep both), in the order
/// they are looked for: (path, what it means).
pub const RELEASE_FILES: &[(&str, ReleaseKind)] = &[
    ("/etc/redhat-release", ReleaseKind::RedHat),
    ("/etc/alpine-release", ReleaseKind::Version("alpine")),
    ("/etc/debian_version", ReleaseKind::Version("debian")),
    ("/etc/arch-release", ReleaseKind::Version("arch")),
    ("/etc/gentoo-release", ReleaseKind::Gentoo),
    ("/etc/SuSE-release", ReleaseKind::Suse),
];

/// How one release file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseKind {
    /// `<Name> [Linux] release <version> (<codename>)`.
    RedHat,
    /// The file is the version (may be empty): the distribution is fixed.
    Version(&'static str),
    /// `Gentoo Base System release <version>`.
    Gentoo,
    /// `openSUSE 13.2 (x86_64)` / `SUSE Linux Enterprise Server 11 (x86_64)`, then
    /// `VERSION = 13.2` lines.
    Suse,
}

/// Parse one release file of `kind`.
pub fn parse_release_file(kind: ReleaseKind, text: &[u8]) -> Result<ReleaseFile, ParseError> {
    let text = std::str::from_utf8(text).map_err(|_| ParseError::new(0, "not UTF-8"))?;
    let first = text.lines().next().unwrap_or("").trim();
    if first.len() > MAX_VALUE {
        return Err(ParseError::new(1, "line too long"));
    }
    let sentence = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
    match kind {
        ReleaseKind::Version(id) => Ok(ReleaseFile {
            id: id.to_string(),
            version: sentence(first),
            product_name: None,
        }),
        ReleaseKind::RedHat | ReleaseKind::Gentoo => {
            let version = first
                .split_once(" release ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .map(String::from);
            let id = if kind == ReleaseKind::Gentoo {
                "gentoo"
            } else {
                redhat_id(first).ok_or(ParseError::new(1, "unknown Red Hat-like distribution"))?
            };
            Ok(ReleaseFile {
                id: id.to_string(),
                version,
                product_name: sentence(first),
            })
        }
        ReleaseKind::Suse => {
            let version = text.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "VERSION").then(|| v.trim().to_string())
            });
            let id = if first.to_ascii_lowercase().starts_with("opensuse") {
                "opensuse"
            } else {
                "sles"
            };
            Ok(ReleaseFile {
                id: id.to_string(),
                version: version.filter(|v| !v.is_empty() && v.len() <= MAX_VALUE),
                product_name: sentence(first),
            })
        }
    }
}

/// os-release `ID` of the distribution a redhat-release line names.
fn redhat_id(line: &str) -> Option<&'static str> {
    const NAMES: &[(&str, &str)] = &[
        ("red hat enterprise linux", "rhel"),
        ("centos", "centos"),
        ("fedora", "fedora"),
        ("rocky", "rocky"),
        ("almalinux", "almalinux"),
        ("scientific linux", "scientific"),
        ("oracle linux", "ol"),
        ("cloudlinux", "cloudlinux"),
        ("virtuozzo", "virtuozzo"),
        ("openvz", "openvz"),
    ];
    let l = line.to_ascii_lowercase();
    NAMES
        .iter()
        .find(|(prefix, _)| l.starts_with(prefix))
        .map(|(_, id)| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quotes_and_escapes() {
        let text = b"# c\nNAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID='12'\n\
PRETTY_NAME=\"Debian \\\"bookworm\\\" \\$x\"\nHOME_URL=x\n";

        let r = parse_os_release(text).unwrap();

        assert_eq!(
            r,
            OsRelease {
                id: Some("debian".into()),
                version_id: Some("12".into()),
                pretty_name: Some("Debian \"bookworm\" $x".into()),
                name: Some("Debian GNU/Linux".into()),
            }
        );
    }

    #[test]
    fn os_release_unclosed_quote_is_an_error_naming_the_line() {
        let e = parse_os_release(b"ID=a\nNAME=\"open\n").unwrap_err();

        assert_eq!(e, ParseError::new(2, "bad quoting"));
    }

    #[test]
    fn os_release_that_is_not_text_is_an_error() {
        assert!(parse_os_release(b"ID=\xff\xfe").is_err());
        assert!(parse_os_release(b"just words").is_err());
    }

    #[test]
    fn redhat_release_gives_id_version_and_name() {
        let r = parse_release_file(
            ReleaseKind::RedHat,
            b"CentOS Linux release 7.9.2009 (Core)\n",
        )
        .unwrap();

        assert_eq!(r.id, "centos");
        assert_eq!(r.version.as_deref(), Some("7.9.2009"));
        assert_eq!(
            r.product_name.as_deref(),
            Some("CentOS Linux release 7.9.2009 (Core)")
        );
    }

    #[test]
    fn unknown_redhat_like_is_an_error() {
        assert!(parse_release_file(ReleaseKind::RedHat, b"Mystery OS 1\n").is_err());
    }

    #[test]
    fn version_files_are_the_version() {
        let r = parse_release_file(ReleaseKind::Version("alpine"), b"3.18.4\n").unwrap();

        assert_eq!(
            (r.id.as_str(), r.version.as_deref()),
            ("alpine", Some("3.18.4"))
        );
    }

    #[test]
    fn suse_release_reads_the_version_line() {
        let r = parse_release_file(
            ReleaseKind::Suse,
            b"openSUSE 13.2 (x86_64)\nVERSION = 13.2\nCODENAME = Harlequin\n",
        )
        .unwrap();

        assert_eq!(
            (r.id.as_str(), r.version.as_deref()),
            ("opensuse", Some("13.2"))
        );
    }
}
