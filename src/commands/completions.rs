//! `imgsafe completions SHELL` and `imgsafe man`: both generated from the clap
//! definition in `cli.rs`, so they never drift from `--help`.

use crate::cli::{Cli, CompletionsArgs};
use crate::{Error, Result};
use clap::CommandFactory;
use std::io::Write;

/// Print the completion script for one shell on stdout.
pub fn completions(args: CompletionsArgs) -> Result<()> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "imgsafe", &mut out);
    crate::error::print_output(&out)
}

/// Print the manual page (roff) on stdout: imgsafe(1), with every subcommand's options.
pub fn man() -> Result<()> {
    // Rendering writes into memory; only the final write to stdout can really fail.
    let page = man_page().map_err(Error::Output)?;
    crate::error::print_output(&page)
}

/// The roff text of imgsafe(1): the top-level page, then one section per subcommand.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    let cmd = Cli::command();
    let mut out = Vec::new();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_subcommand(&mut out, sub)?;
    }
    render_exit_status(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// One subcommand as an `.SH` section: its synopsis, what it does and its options.
fn render_subcommand(out: &mut Vec<u8>, sub: &clap::Command) -> std::io::Result<()> {
    let name = format!("imgsafe {}", sub.get_name());
    let sub = sub.clone().bin_name(name.clone());
    writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
    let man = clap_mangen::Man::new(sub.clone());
    // The page's own sections render with .SH headers; demote them under this one.
    let mut part = Vec::new();
    man.render_synopsis_section(&mut part)?;
    man.render_description_section(&mut part)?;
    if sub.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut part)?;
    }
    if let Some(after) = sub.get_after_help() {
        writeln!(part, ".PP")?;
        writeln!(part, "{}", escape_roff(&after.to_string()))?;
    }
    let text = String::from_utf8_lossy(&part).replace(".SH ", ".SS ");
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

/// The documented exit codes (README's table), from the constants `main` returns.
fn render_exit_status(out: &mut Vec<u8>) -> std::io::Result<()> {
    use crate::error::exit;
    let codes = [
        (exit::OK, "success"),
        (exit::OTHER, "other failure (for example writing the destination)"),
        (exit::USAGE, "bad command line"),
        (exit::IMAGE, "image error: missing, unreadable, unknown or corrupt format, too large"),
        (exit::NOT_FOUND, "path not found in the image, or of the wrong type"),
        (exit::FILESYSTEM, "no usable filesystem: none found, several and none chosen, or mount failed"),
        (exit::APPLIANCE, "appliance or VM failure: kernel or QEMU missing, guest did not answer, guest broke the protocol"),
        (exit::INTERRUPTED, "interrupted (SIGINT/SIGTERM)"),
    ];
    writeln!(out, ".SH \"EXIT STATUS\"")?;
    for (code, what) in codes {
        writeln!(out, ".TP\n{code}\n{}", escape_roff(what))?;
    }
    Ok(())
}

/// Plain text as roff body text: backslashes escaped, no line starting a request.
fn escape_roff(s: &str) -> String {
    s.replace('\\', "\\e")
        .lines()
        .map(|l| {
            if l.starts_with(['.', '\'']) {
                format!("\\&{l}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_text_cannot_start_a_request() {
        let shown = escape_roff(".SH x\nplain \\ back");

        assert_eq!(shown, "\\&.SH x\nplain \\e back");
    }
}
