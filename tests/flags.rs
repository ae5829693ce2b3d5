//! Every long flag of every command (`--help`) is used by a test, or is
//! listed in [`UNTESTED`] with the reason: a new flag comes with a test or
//! an honest entry here. An entry whose flag is now tested, or gone, fails
//! too, so the list only shrinks truthfully.
//!
//! "Used by a test": the flag as a string (`"--flag"`, `"--flag=...`, or
//! inside a longer literal such as `"run --flag x"`) in a file under tests/
//! that also names the command (`"run"`, or for `rootfs pull` both
//! `"rootfs"` and `"pull"`), or in the `#[cfg(test)]` part of a file under
//! src/. tests/docs.rs is left out: its lists of doc commands it does not
//! run name flags no test passes (and the docs checks build `--{long}` from
//! the tree, naming no flag literally).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// (command path, flag): flags no test uses today, each with why.
const UNTESTED: &[(&str, &str, &str)] = &[(
    "modules-reload",
    "all",
    "the host command only forwards it over ssh to the guest tool, whose --all \
     run.rs::modules_reload_all_a_module_in_use_and_one_that_fails_to_load tests in the guest",
)];

/// Flags every command has, from clap or mkt's globals; tested once, in
/// tests/cli.rs (--help, --version, --config) and everywhere (-v, -q).
const GLOBAL: &[&str] = &["help", "version", "verbose", "quiet", "config"];

/// Every visible (command path, long flag) of the CLI, e.g. ("rootfs pull", "owners").
fn flags() -> Vec<(String, String)> {
    flags_and_shorts()
        .into_iter()
        .map(|(p, l, _)| (p, l))
        .collect()
}

/// [`flags`] with each flag's short form (`-C` for `--directory`).
fn flags_and_shorts() -> Vec<(String, String, Option<char>)> {
    use clap::CommandFactory;
    fn walk(c: &clap::Command, path: &str, out: &mut Vec<(String, String, Option<char>)>) {
        for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = a.get_long()
                && !GLOBAL.contains(&long)
            {
                out.push((path.to_string(), long.to_string(), a.get_short()));
            }
        }
        for s in c.get_subcommands().filter(|s| !s.is_hide_set()) {
            let p = if path.is_empty() {
                s.get_name().to_string()
            } else {
                format!("{path} {}", s.get_name())
            };
            walk(s, &p, out);
        }
    }
    let mut out = Vec::new();
    walk(&mkt::cli::Cli::command(), "", &mut out);
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The test sources a flag may be found in: tests/*.rs (whole) and the
/// `#[cfg(test)]` part of each src/ file.
fn test_sources() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("tests"), &mut files);
    rust_files(&root.join("src"), &mut files);
    let mut out = Vec::new();
    for f in files {
        let name = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        // This file, and docs.rs, whose lists of doc commands it does not
        // run name flags that no test passes.
        if name == "tests/flags.rs" || name == "tests/docs.rs" {
            continue;
        }
        let t = std::fs::read_to_string(&f).unwrap();
        let t = if name.starts_with("src/") {
            match t.find("#[cfg(test)]") {
                Some(i) => t[i..].to_string(),
                None => continue,
            }
        } else {
            t
        };
        out.push((f, t));
    }
    out
}

/// Whether `src` passes `needle` (`--flag`, `-C`) as an argument: a
/// literal of its own (`"--flag"`, `"--flag=x"`), or a word of a command
/// line in a literal that starts with `mkt ` (`"mkt ssh --all"`); then
/// followed by a quote, `=` or a space (so `--force` is not found in
/// `--force-x`). A flag named in a message (`"failed without --clean"`)
/// does not count.
fn uses_flag(src: &str, needle: &str) -> bool {
    src.match_indices(needle).any(|(i, _)| {
        let before = &src[..i];
        let after = src[i + needle.len()..].chars().next();
        if !matches!(after, Some('"' | '=' | ' ' | '\'')) {
            return false;
        }
        if before.ends_with('"') {
            return true;
        }
        // In a command line: the literal (from its opening quote on this
        // line) starts with `mkt ` and holds only words up to the flag.
        let line = before.rsplit('\n').next().unwrap_or("");
        before.ends_with(' ')
            && line.rsplit_once('"').is_some_and(|(_, lit)| {
                lit.starts_with("mkt ")
                    && lit
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || " -_./=".contains(c))
            })
    })
}

/// Whether `src` (the file `file`) passes `--flag` to the command `path`
/// (`rootfs pull`): the flag in a literal with the command's last word
/// near it, on the 30 lines before it or the 10 after: as a literal
/// (`"pull"`, or starting one: `"pull --x"`) or in a call of a function of
/// the file that names it so (tests/hardware.rs's `pci_run`); or anywhere in
/// tests/WORD.rs, whose helpers add the word (tests/run.rs's `run_as`).
/// `flag` is the whole word: `--directory` or `-C`.
fn passes_flag(file: &Path, src: &str, path: &str, flag: &str) -> bool {
    let word = path.rsplit(' ').next().unwrap();
    let own = file.file_name().unwrap().to_string_lossy() == format!("{word}.rs")
        && file.parent().is_some_and(|d| d.ends_with("tests"));
    let literal = |l: &str| l.contains(&format!("\"{word}\"")) || l.contains(&format!("\"{word} "));
    // Functions whose body names the word: `fn NAME(` up to the next
    // line that closes an item.
    let helpers: Vec<String> = src
        .split("\nfn ")
        .skip(1)
        .filter_map(|f| {
            let body = f.split("\n}\n").next()?;
            let name = f.split('(').next()?.split('<').next()?;
            literal(body).then(|| format!("{name}("))
        })
        .collect();
    let names = |l: &str| literal(l) || helpers.iter().any(|h| l.contains(h.as_str()));
    let lines: Vec<&str> = src.lines().collect();
    lines.iter().enumerate().any(|(i, l)| {
        uses_flag(l, flag)
            && (own
                || lines[i.saturating_sub(30)..(i + 11).min(lines.len())]
                    .iter()
                    .any(|l| names(l)))
    })
}

/// Whether a test passes `--flag` (or its short form) to `path`.
fn tested(sources: &[(PathBuf, String)], path: &str, flag: &str) -> bool {
    static ALL: std::sync::OnceLock<Vec<(String, String, Option<char>)>> =
        std::sync::OnceLock::new();
    let short = ALL
        .get_or_init(flags_and_shorts)
        .iter()
        .find(|(p, l, _)| p == path && l == flag)
        .and_then(|(_, _, s)| *s);
    let words = std::iter::once(format!("--{flag}")).chain(short.map(|c| format!("-{c}")));
    let words: Vec<String> = words.collect();
    sources
        .iter()
        .any(|(f, src)| words.iter().any(|w| passes_flag(f, src, path, w)))
}

#[test]
fn every_flag_is_tested_or_listed_as_untested_with_a_reason() {
    let flags = flags();
    assert!(
        flags
            .iter()
            .any(|(p, f)| p == "rootfs pull" && f == "owners"),
        "{flags:?}"
    );
    let sources = test_sources();
    let listed: BTreeSet<(&str, &str)> = UNTESTED.iter().map(|(p, f, _)| (*p, *f)).collect();
    assert_eq!(
        listed.len(),
        UNTESTED.len(),
        "an UNTESTED entry is listed twice"
    );
    let mut untested = Vec::new();
    for (path, flag) in &flags {
        let is_tested = tested(&sources, path, flag);
        let is_listed = listed.contains(&(path.as_str(), flag.as_str()));
        if !is_tested && !is_listed {
            untested.push(format!("(\"{path}\", \"{flag}\", \"REASON\"),"));
        }
    }
    let mut stale = Vec::new();
    for (path, flag, why) in UNTESTED {
        assert!(!why.trim().is_empty(), "{path} --{flag}: no reason given");
        if !flags.iter().any(|(p, f)| p == path && f == flag) {
            stale.push(format!("{path} --{flag}: no such flag any more"));
        } else if tested(&sources, path, flag) {
            stale.push(format!(
                "{path} --{flag}: now tested, remove it from UNTESTED"
            ));
        }
    }
    assert!(
        untested.is_empty() && stale.is_empty(),
        "flags no test uses (test them, or list them in UNTESTED with the reason):\n{}\n\
         stale UNTESTED entries:\n{}",
        untested.join("\n"),
        stale.join("\n")
    );
}

#[test]
fn flag_matching_takes_whole_flags_in_literals() {
    assert!(uses_flag(r#"args(["--force"])"#, "--force"));
    assert!(uses_flag(r#""--cpus=2""#, "--cpus"));
    assert!(uses_flag(r#""mkt run --cpus 2""#, "--cpus"));
    assert!(!uses_flag(r#""cleaned without --clean""#, "--clean"));
    assert!(!uses_flag(r#""--force-x""#, "--force"));
    assert!(!uses_flag("// --force", "--force"));
    let f = Path::new("tests/rootfs.rs");
    let pull = r#"args(["rootfs", "pull", "--name", "x"])"#;
    assert!(passes_flag(f, pull, "rootfs pull", "--name"));
    assert!(!passes_flag(
        f,
        r#"args(["rootfs", "list", "--name"])"#,
        "rootfs pull",
        "--name"
    ));
    let far = format!("\"pull\"{}\"--name\"", "\n".repeat(40));
    assert!(!passes_flag(f, &far, "rootfs pull", "--name"));
    assert!(passes_flag(
        Path::new("tests/run.rs"),
        r#"&["--mem", "1G"]"#,
        "run",
        "--mem"
    ));
}
