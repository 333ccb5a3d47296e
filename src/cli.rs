//! Command-line syntax (clap derive). Parsing only: commands live in `commands/`.

use crate::format::Format;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Look inside untrusted disk images without root.
#[derive(Debug, Parser)]
#[command(name = "imgsafe", version, about, long_about = None)]
pub struct Cli {
    /// Print each stage with its timing on stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `--format`'s values, with their help, from the decoder layer's own list (which does
/// not depend on clap).
fn format_parser() -> impl clap::builder::TypedValueParser<Value = Format> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(Format::ALL.map(|f| PossibleValue::new(f.name()).help(f.about())))
        .map(|name| name.parse::<Format>().expect("a listed format name"))
}

/// How to open the image; shared by every subcommand that takes one.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Decode as this format instead of probing magic bytes.
    #[arg(long, value_parser = format_parser(), global = true)]
    pub format: Option<Format>,
    /// Differencing disks and deltas: accept a parent whose unique id (VHD),
    /// DataWriteGuid (VHDX) or CID (VMDK) does not match.
    #[arg(long, global = true)]
    pub ignore_parent_id: bool,
    /// OVA holding several disks: read disk N (1-based, in archive order).
    #[arg(long, value_name = "N", global = true)]
    pub disk: Option<usize>,
    /// qcow2: read this internal snapshot (its id or name) instead of the current disk.
    #[arg(long, value_name = "NAME|ID", global = true)]
    pub snapshot: Option<String>,
    /// Where bare OpenVZ container ids are looked up.
    #[arg(
        long,
        env = "IMGSAFE_VZ_ROOT",
        default_value = "/vz/private",
        global = true
    )]
    pub vz_root: PathBuf,
}

/// The guest's other disks and its key; shared by the commands that boot it.
#[derive(Debug, Clone, Default, Args)]
pub struct GuestArgs {
    /// Attach another disk image of the same guest (repeatable, in order: the image is
    /// /dev/vda, the first --add /dev/vdb, ...), read-only; its format is probed.
    #[arg(long = "add", value_name = "IMAGE")]
    pub add: Vec<PathBuf>,
    /// Open the LUKS containers on the disks with this key: the file's exact bytes, or
    /// with `-` a passphrase typed on the terminal (not echoed; stdin's bytes when stdin
    /// is not a terminal).
    #[arg(long = "key-file", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// Which filesystem(s) of the image to mount.
#[derive(Debug, Clone, Default, Args)]
pub struct MountArgs {
    /// Mount DEVICE (/dev/sda2, a partition number, /dev/VG/LV) at MOUNTPOINT, or at /
    /// without one; repeat to assemble the tree by hand.
    #[arg(short = 'm', long = "mount", value_name = "DEVICE[:MOUNTPOINT]")]
    pub mount: Vec<String>,
    /// Find the root filesystem and mount what its /etc/fstab lists (the default when
    /// the disk has several filesystems and no -m is given).
    #[arg(short = 'i', long = "inspect", conflicts_with = "mount")]
    pub inspect: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List a directory of the image.
    Ls(LsArgs),
    /// Write a file of the image to stdout.
    Cat(CatArgs),
    /// Copy files or directories out of the image (DEST `-`: a tar stream on stdout).
    Cp(CpArgs),
    /// List the partitions and filesystems of the image.
    Filesystems(FilesystemsArgs),
    /// Show the image's container format, size and chain.
    Info(InfoArgs),
    /// Serve the decoded image read-only over NBD on a Unix socket.
    Serve(ServeArgs),
    /// Build (if needed) the appliance and show where it is cached.
    Appliance(ApplianceArgs),
    /// Open a shell (busybox sh) inside the appliance with the image mounted read-only
    /// at /sysroot; or run one command (-c) or a script from stdin.
    Shell(ShellArgs),
    /// Say what operating system the image holds: distribution, version, host name,
    /// architecture, mounts, installed packages and kernels.
    Inspect(InspectArgs),
    /// Print a shell completion script (generated from this command line's definition).
    #[command(after_help = "Install: bash: imgsafe completions bash > \
~/.local/share/bash-completion/completions/imgsafe; zsh: imgsafe completions zsh > \
~/.zfunc/_imgsafe (with ~/.zfunc in fpath); fish: imgsafe completions fish > \
~/.config/fish/completions/imgsafe.fish")]
    Completions(CompletionsArgs),
    /// Print the manual page (roff, generated from this command line's definition).
    #[command(
        after_help = "Read it: imgsafe man | man -l -; install: imgsafe man > \
~/.local/share/man/man1/imgsafe.1"
    )]
    Man,
}

/// `imgsafe inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The disk image.
    pub image: PathBuf,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub image_args: ImageArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub mount: MountArgs,
}

/// `imgsafe completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `imgsafe shell`.
#[derive(Debug, Args)]
#[command(
    after_help = "The shell runs inside the throwaway VM, never on the host. The image is \
mounted read-only at /sysroot; /tmp is a RAM disk for scratch files. With --overlay, the \
filesystems are mounted read-write over a throwaway copy-on-write layer in a private temp \
file on the host: writes are discarded when the shell ends and never reach the image file. \
Exit status: the shell's (128+N if killed by signal N)."
)]
pub struct ShellArgs {
    /// The disk image.
    pub image: PathBuf,
    /// Run this command (sh -c) instead of an interactive shell; stdout and stderr stay apart.
    #[arg(short = 'c', value_name = "COMMAND")]
    pub command: Option<std::ffi::OsString>,
    /// Mount the filesystems read-write over a throwaway copy-on-write layer (a private
    /// temp file on the host, deleted when the shell ends; the image is never written).
    #[arg(long)]
    pub overlay: bool,
    #[command(flatten)]
    pub image_args: ImageArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub mount: MountArgs,
}

/// `imgsafe appliance`.
#[derive(Debug, Args)]
pub struct ApplianceArgs {
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

/// A path inside the image: absolute, so that it cannot be read as relative to
/// anything on the host or in the appliance.
fn path_in_image(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        Ok(s.to_string())
    } else {
        Err("paths in the image are absolute: start it with /".into())
    }
}

/// `imgsafe ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// The disk image (file, ploop directory or DiskDescriptor.xml, or container id).
    pub image: PathBuf,
    /// Directory (or file) in the image.
    #[arg(default_value = "/", value_parser = path_in_image)]
    pub path: String,
    /// Long listing: type and mode, size, mtime, name (-> target).
    #[arg(short = 'l', long)]
    pub long: bool,
    /// Recurse into subdirectories.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub image_args: ImageArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub mount: MountArgs,
}

/// `imgsafe cat`.
#[derive(Debug, Args)]
pub struct CatArgs {
    /// The disk image.
    pub image: PathBuf,
    /// Files in the image, written in order.
    #[arg(required = true, value_parser = path_in_image)]
    pub paths: Vec<String>,
    #[command(flatten)]
    pub image_args: ImageArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub mount: MountArgs,
}

/// `imgsafe cp IMAGE:PATH... DEST`.
#[derive(Debug, Args)]
#[command(
    after_help = "DEST `-` writes the sources and the trees below them to stdout as a \
POSIX pax tar stream instead, e.g. `imgsafe cp disk.img:/etc - | tar -xf - -C out` \
(names relative, checked as for a directory destination; symlinks as symlinks; \
mode, mtime, uid and gid kept; set-id and sticky bits dropped)."
)]
pub struct CpArgs {
    /// Sources as IMAGE:/path (all from the same image), then the destination (`-`:
    /// a tar stream on stdout). Options may come between them
    /// (`cp a.img:/home --add b.img DEST`); fewer than two are refused when the command
    /// runs.
    #[arg(required = true, num_args = 1.., action = clap::ArgAction::Append)]
    pub args: Vec<String>,
    /// Overwrite existing files in the destination.
    #[arg(short, long)]
    pub force: bool,
    #[command(flatten)]
    pub image_args: ImageArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub mount: MountArgs,
}

/// `imgsafe filesystems`.
#[derive(Debug, Args)]
pub struct FilesystemsArgs {
    /// The disk image.
    pub image: PathBuf,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub image_args: ImageArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// `imgsafe info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The disk image.
    pub image: PathBuf,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub image_args: ImageArgs,
}

/// `imgsafe serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The disk image.
    pub image: PathBuf,
    /// Unix socket to listen on (created; must not exist).
    #[arg(long)]
    pub socket: PathBuf,
    /// Export name announced to clients.
    #[arg(long, default_value = "")]
    pub export_name: String,
    /// Permission bits of the socket, in octal (default 600: only you may connect;
    /// 660 lets your group in too). Set outright, whatever the umask.
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_socket_mode)]
    pub socket_mode: u32,
    #[command(flatten)]
    pub image_args: ImageArgs,
}

/// Parse `--socket-mode`: octal permission bits, at most 777.
fn parse_socket_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode from 0 to 777 (e.g. 600)"))
}

impl ImageArgs {
    /// The plain options the image layer takes.
    pub fn spec(&self) -> crate::image::ImageSpec {
        crate::image::ImageSpec {
            options: crate::format::OpenOptions {
                format: self.format,
                ignore_parent_id: self.ignore_parent_id,
                disk: self.disk,
                snapshot: self.snapshot.clone(),
            },
            vz_root: self.vz_root.clone(),
        }
    }
}

impl GuestArgs {
    /// The plain guest description the session takes.
    pub fn guest(&self) -> crate::session::Guest {
        crate::session::Guest {
            add: self.add.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

impl MountArgs {
    /// The plain mount choice the session takes.
    pub fn choice(&self) -> crate::session::MountChoice {
        crate::session::MountChoice {
            mount: self.mount.clone(),
            inspect: self.inspect,
        }
    }
}
