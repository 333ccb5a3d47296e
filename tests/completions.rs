//! `imgsafe completions` and `imgsafe man`: generated from the command-line definition,
//! so every subcommand is there and the page is roff that groff reads without a warning.

mod support;

use std::io::Write;
use std::process::Stdio;
use support::*;

const SUBCOMMANDS: &[&str] = &[
    "ls",
    "cat",
    "cp",
    "filesystems",
    "info",
    "serve",
    "appliance",
    "shell",
    "inspect",
    "completions",
    "man",
];

#[test]
fn bash_completion_is_valid_bash_and_offers_every_subcommand() {
    let out = run(["completions", "bash"]);
    let script = ok_stdout(&out);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &script).unwrap();

    let syntax = tool("bash", "bash")
        .arg("-n")
        .arg(file.path())
        .output()
        .unwrap();
    // Source it and ask for the words after `imgsafe `, as bash does on TAB.
    let offered = tool("bash", "bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(imgsafe ''); COMP_CWORD=1; COMP_LINE='imgsafe '; \
             COMP_POINT=8; _imgsafe imgsafe '' imgsafe; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.path().display()
        ))
        .output()
        .unwrap();

    assert!(syntax.status.success(), "{}", stderr(&syntax));
    let words: Vec<String> = ok_stdout(&offered).lines().map(String::from).collect();
    for sub in SUBCOMMANDS {
        assert!(
            words.iter().any(|w| w == sub),
            "{sub} not offered: {words:?}"
        );
    }
}

#[test]
fn zsh_and_fish_completions_name_every_subcommand() {
    for shell in ["zsh", "fish"] {
        let out = run(["completions", shell]);
        let script = ok_stdout(&out);

        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell}: {sub} missing");
        }
    }
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = run(["completions", "tcsh"]);

    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[test]
fn man_page_is_roff_that_groff_reads_cleanly_and_covers_every_subcommand() {
    let out = run(["man"]);
    let page = ok_stdout(&out);

    // -ww: every warning; -z: parse and format, write nothing.
    let mut groff = tool("groff", "groff-base")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    groff
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let checked = groff.wait_with_output().unwrap();
    // And as man shows it to a reader.
    let mut man = tool("man", "man-db")
        .args(["-l", "-"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    man.stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let shown = man.wait_with_output().unwrap();

    assert!(
        page.starts_with(".ie") || page.contains(".TH imgsafe 1"),
        "{page}"
    );
    assert!(
        checked.status.success() && checked.stderr.is_empty(),
        "groff: {}",
        stderr(&checked)
    );
    let text = ok_stdout(&shown);
    assert!(text.contains("NAME") && text.contains("imgsafe"), "{text}");
    for sub in SUBCOMMANDS {
        assert!(
            text.contains(&format!("IMGSAFE {}", sub.to_uppercase())),
            "no section for {sub}: {text}"
        );
    }
    assert!(text.contains("EXIT STATUS"), "{text}");
    // An option of a subcommand is documented, not only the top-level ones.
    assert!(text.contains("--socket-mode"), "{text}");
}
