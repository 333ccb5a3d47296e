//! `imgsafe ls`: list a directory of the image.
//!
//! Every entry is shown, dot-files included (like `ls -A`), sorted by name bytes. Names
//! are written as the raw bytes the filesystem holds; `--json` gives exact names too.

use crate::agent_client::GuestFs;
use crate::cli::LsArgs;
use crate::session::Session;
use crate::Result;
use imgsafe_proto::{Entry, FileType, WalkEntry};
use std::io::{self, Write};

/// Run `imgsafe ls`.
pub fn run(args: LsArgs) -> Result<()> {
    Session::run_mounted(
        &args.image,
        &args.image_args.spec(),
        &args.guest.guest(),
        &args.mount.choice(),
        |s| {
            let stage = crate::trace::stage("ls");
            let r = list(s.fs(), &args);
            stage.done("");
            r
        },
    )
}

/// One listed entry: its path below the listed directory (just its name unless -R).
struct Row {
    path: Vec<Vec<u8>>,
    entry: Entry,
}

fn list(fs: &mut dyn GuestFs, args: &LsArgs) -> Result<()> {
    let path = args.path.as_bytes();
    let rows = collect(fs, path, args.recursive)?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    // SAFETY: isatty has no preconditions.
    let tty = unsafe { libc::isatty(libc::STDOUT_FILENO) } == 1;
    let r = if args.json {
        write_json(&mut out, &args.path, &rows)
    } else {
        write_text(&mut out, &rows, args.long, tty)
    };
    crate::error::write_output(r.and_then(|_| out.flush()))
}

fn collect(fs: &mut dyn GuestFs, path: &[u8], recursive: bool) -> Result<Vec<Row>> {
    let st = fs.stat(path)?;
    let is_dir = st.kind == FileType::Directory
        || (st.kind == FileType::Symlink && fs.read_dir(path).is_ok());
    if !is_dir {
        let name = path
            .rsplit(|&b| b == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(path)
            .to_vec();
        return Ok(vec![Row {
            path: vec![name],
            entry: st,
        }]);
    }
    let mut rows: Vec<Row> = if recursive {
        let mut v = Vec::new();
        fs.walk(path, &mut |w: WalkEntry| {
            v.push(Row {
                path: w.path,
                entry: w.entry,
            });
            Ok(())
        })?;
        v
    } else {
        fs.read_dir(path)?
            .into_iter()
            .map(|e| Row {
                path: vec![e.name.clone()],
                entry: e,
            })
            .collect()
    };
    rows.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(rows)
}

fn joined(path: &[Vec<u8>]) -> Vec<u8> {
    path.join(&b'/')
}

fn type_char(k: FileType) -> char {
    match k {
        FileType::Regular => '-',
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::CharDevice => 'c',
        FileType::BlockDevice => 'b',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
    }
}

/// `drwxr-xr-x`-style mode string, with set-id and sticky bits as `ls` shows them.
pub fn mode_string(kind: FileType, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(type_char(kind));
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = mode & bit != 0;
        let special = match i {
            2 => mode & 0o4000 != 0,
            5 => mode & 0o2000 != 0,
            8 => mode & 0o1000 != 0,
            _ => false,
        };
        s.push(match (special, set, i) {
            (true, true, 8) => 't',
            (true, false, 8) => 'T',
            (true, true, _) => 's',
            (true, false, _) => 'S',
            (false, true, _) => *c,
            (false, false, _) => '-',
        });
    }
    s
}

/// UTC `YYYY-MM-DD HH:MM:SS` for seconds since the epoch (proleptic Gregorian).
pub fn format_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Names as shown on a terminal: made printable (as `ls -q` does), so a file name from
/// the image cannot send escape sequences to the user's terminal. Piped output keeps
/// the exact bytes.
fn shown(b: &[u8], tty: bool) -> std::borrow::Cow<'_, [u8]> {
    if tty {
        crate::terminal::printable(b).into_bytes().into()
    } else {
        b.into()
    }
}

fn write_text(out: &mut impl Write, rows: &[Row], long: bool, tty: bool) -> io::Result<()> {
    let width = rows
        .iter()
        .map(|r| r.entry.size.to_string().len())
        .max()
        .unwrap_or(1);
    for r in rows {
        if long {
            write!(
                out,
                "{} {:>width$} {} ",
                mode_string(r.entry.kind, r.entry.mode),
                r.entry.size,
                format_time(r.entry.mtime)
            )?;
        }
        out.write_all(&shown(&joined(&r.path), tty))?;
        if long {
            if let Some(t) = &r.entry.target {
                out.write_all(b" -> ")?;
                out.write_all(&shown(t, tty))?;
            }
        }
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn type_name(k: FileType) -> &'static str {
    match k {
        FileType::Regular => "file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::CharDevice => "char-device",
        FileType::BlockDevice => "block-device",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
    }
}

/// A name as JSON: the string when it is UTF-8; otherwise the lossy string plus the
/// exact bytes under `<key>_bytes`.
fn put_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, key: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => {
            obj.insert(key.into(), s.into());
        }
        Err(_) => {
            obj.insert(key.into(), String::from_utf8_lossy(b).into_owned().into());
            obj.insert(
                format!("{key}_bytes"),
                b.iter().map(|&x| serde_json::Value::from(x)).collect(),
            );
        }
    }
}

fn write_json(out: &mut impl Write, dir: &str, rows: &[Row]) -> io::Result<()> {
    let entries: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut o = serde_json::Map::new();
            put_bytes(
                &mut o,
                "name",
                r.path.last().map(Vec::as_slice).unwrap_or_default(),
            );
            put_bytes(&mut o, "path", &joined(&r.path));
            o.insert("type".into(), type_name(r.entry.kind).into());
            o.insert("mode".into(), r.entry.mode.into());
            o.insert("size".into(), r.entry.size.into());
            o.insert("mtime".into(), r.entry.mtime.into());
            o.insert("uid".into(), r.entry.uid.into());
            o.insert("gid".into(), r.entry.gid.into());
            o.insert("nlink".into(), r.entry.nlink.into());
            if let Some(t) = &r.entry.target {
                put_bytes(&mut o, "target", t);
            }
            serde_json::Value::Object(o)
        })
        .collect();
    let doc = serde_json::json!({ "path": dir, "entries": entries });
    serde_json::to_writer_pretty(&mut *out, &doc)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_render_like_ls() {
        assert_eq!(mode_string(FileType::Directory, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(FileType::Regular, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(FileType::Directory, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(FileType::Regular, 0o2644), "-rw-r-Sr--");
        assert_eq!(mode_string(FileType::Symlink, 0o777), "lrwxrwxrwx");
    }

    #[test]
    fn control_bytes_are_hidden_on_a_terminal_only() {
        let name = b"evil\x1b]0;title\x07\nname";

        assert_eq!(&*shown(name, true), b"evil?]0;title??name");
        assert_eq!(&*shown(name, false), name);
    }

    #[test]
    fn times_render_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_time(-1), "1969-12-31 23:59:59");
    }
}
