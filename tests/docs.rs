//! Every `mkt ...` command shown in README.md and docs/*.md works as shown.
//!
//! Each command in a code span, a fenced block (sh/console or no language)
//! or an indented block is one of:
//! - a name (`mkt rootfs`): the subcommand exists;
//! - a synopsis (placeholders, `[...]`, `a|b`): every flag it names exists
//!   on that subcommand;
//! - a concrete command: clap accepts it, and it is run here in a fresh HOME
//!   (`mkt run` with `--dry-run`), unless [`NOT_RUN`] says why it cannot be.
//!
//! Failures name the doc file, the line and the command. No boots: fast.

mod common;

use clap::{CommandFactory, Parser};
use std::path::{Path, PathBuf};

/// Concrete commands this test does not run, and why.
const NOT_RUN: &[(&str, &str)] = &[
    (
        "mkt run --fs 9p -- true",
        "a benchmark row: tests/bench/boot.sh runs it with the fixture kernel tree (the default rootfs's cloud kernel has no 9p)",
    ),
    (
        "mkt run uname",
        "shows the mistake the hint is for; tests/cli.rs run_help_and_a_command_without_double_dash",
    ),
    (
        "mkt ssh vm -- sh -c 'exit 3'",
        "needs a running VM called vm; tests/guest.rs shell_mode_serves_ssh_running_the_exact_argv_tests_and_the_guest_tool runs it",
    ),
    (
        "mkt ssh -- true",
        "needs a running VM; tests/guest.rs default_interactive_mode_is_a_shell_with_the_host_terminal_and_ssh runs it",
    ),
    (
        "mkt run vm",
        "needs a setup called vm in the config; tests/build.rs warm_loop_build_reload_and_test_in_the_running_vm starts a setup's VM and calls mkt ssh at once",
    ),
    (
        "mkt run --rootfs fc30",
        "needs the fc30 tree (a Fedora image pull); tests/recipe.rs builds image recipes",
    ),
    (
        "mkt rootfs build fc30",
        "pulls a Fedora image from a registry (minutes); tests/recipe.rs",
    ),
    (
        "mkt rootfs pull fedora:41",
        "needs a public registry; tests/rootfs.rs pulls from a local one",
    ),
    (
        "mkt rootfs pull debian:bookworm",
        "needs a public registry; tests/rootfs.rs pulls from a local one",
    ),
    (
        "mkt rootfs pull --platform linux/arm64 --name fedora-arm quay.io/fedora/fedora:41",
        "needs a public registry",
    ),
    (
        "mkt rootfs pull --insecure registry.lab:5000/kvm/fc30:latest",
        "needs that lab registry; tests/rootfs.rs pulls --insecure from a local one",
    ),
    (
        "mkt rootfs shell debian-bookworm -- dpkg -l linux-image-cloud-amd64",
        "enters a stored tree; this test's tree shares its files with the fixture (tests/rootfs.rs)",
    ),
    (
        "mkt rootfs shell --rw debian-bookworm -- apt-get install -y strace",
        "changes the stored tree and needs the network",
    ),
    (
        "mkt build --shell -- -c 'make menuconfig'",
        "interactive, in a kernel tree (tests/build.rs)",
    ),
    (
        "mkt build --shell -- -c true",
        "needs a kernel tree and a rootfs (tests/build.rs)",
    ),
    (
        "mkt build rdma-core --with-kernel-headers=~/src/linux",
        "builds rdma-core (minutes; tests/build.rs)",
    ),
    ("mkt ci", "checks a kernel commit (minutes; tests/ci.rs)"),
    (
        "mkt ci --wait",
        "checks a kernel commit (minutes; tests/ci.rs)",
    ),
    (
        "mkt ci --rev HEAD~2 --wait",
        "checks kernel commits (minutes; tests/ci.rs)",
    ),
    (
        "mkt ci --wait --no-smatch --no-clang --junit ci.xml",
        "checks a kernel commit (minutes; tests/ci.rs)",
    ),
    ("mkt ci --status 3", "needs a job 3 (tests/ci.rs)"),
];

/// One command as the docs show it.
#[derive(Debug, Clone)]
struct Shown {
    file: String,
    line: usize,
    text: String,
}

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: `{}`", self.file, self.line, self.text)
    }
}

fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn is_mkt(s: &str) -> bool {
    s.starts_with("mkt ")
}

/// The commands a doc shows: code spans, and lines of shell code blocks.
fn shown_in(file: &str, text: &str) -> Vec<Shown> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    let mut prev_blank = true;
    let mut in_indented = false;
    for (i, line) in text.lines().enumerate() {
        let mut add = |t: &str| {
            out.push(Shown {
                file: file.to_string(),
                line: i + 1,
                text: t.trim().to_string(),
            })
        };
        let trimmed = line.trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            fence = match fence {
                Some(_) => None,
                None => Some(lang.trim().to_string()),
            };
            continue;
        }
        if let Some(lang) = &fence {
            if ["", "sh", "bash", "console", "shell"].contains(&lang.as_str()) {
                let cmd = trimmed.strip_prefix("$ ").unwrap_or(trimmed);
                if is_mkt(cmd) {
                    add(strip_comment(cmd));
                }
            }
            continue;
        }
        // An indented block starts after a blank line.
        in_indented = line.starts_with("    ") && (prev_blank || in_indented);
        prev_blank = line.trim().is_empty();
        if in_indented {
            if is_mkt(trimmed) {
                add(strip_comment(trimmed));
            }
            continue;
        }
        // Code spans: `...` pairs on the line.
        let mut rest = line;
        while let Some(a) = rest.find('`') {
            let Some(b) = rest[a + 1..].find('`') else {
                break;
            };
            let span = &rest[a + 1..a + 1 + b];
            if is_mkt(span) {
                add(span);
            }
            rest = &rest[a + 1 + b + 1..];
        }
    }
    out
}

fn strip_comment(cmd: &str) -> &str {
    match cmd.find(" #") {
        Some(i) => cmd[..i].trim_end(),
        None => cmd,
    }
}

/// The command itself, without what the shell does with its output.
fn without_redirection(cmd: &str) -> &str {
    [" | ", " > ", " && ", " 2>"]
        .iter()
        .filter_map(|op| cmd.find(op))
        .min()
        .map(|i| cmd[..i].trim_end())
        .unwrap_or(cmd)
}

/// Shell words: whitespace-separated, with '...' and "..." quoting.
fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// A placeholder such as NAME, OS/ARCH, SECS.
fn is_placeholder(word: &str) -> bool {
    let w = word.trim_matches(|c| "[](),.=".contains(c));
    let w = w.rsplit('=').next().unwrap_or(w);
    w.chars().filter(|c| c.is_ascii_uppercase()).count() >= 2
        && w.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_/-".contains(c))
}

fn is_synopsis(cmd: &str) -> bool {
    cmd.contains('[')
        || cmd.contains("...")
        || cmd
            .split_whitespace()
            .any(|w| is_placeholder(w) || (w.contains('|') && w != "|"))
}

/// The subcommand the words name, and how many words that took.
fn walk<'a>(root: &'a clap::Command, words: &[String]) -> (&'a clap::Command, usize) {
    let mut cmd = root;
    let mut n = 0;
    for w in words {
        match cmd.find_subcommand(w) {
            Some(sub) => {
                cmd = sub;
                n += 1;
            }
            None => break,
        }
    }
    (cmd, n)
}

/// The flags (`--long`, `-s`) a synopsis names, before any bare `--`.
fn named_flags(cmd: &str) -> Vec<String> {
    let mut flags = Vec::new();
    for word in cmd.split_whitespace() {
        if word == "--" || word == "[--" {
            break;
        }
        let w = word.trim_start_matches(['[', '(']);
        if let Some(long) = w.strip_prefix("--") {
            let name: String = long
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                flags.push(format!("--{name}"));
            }
        } else if let Some(short) = w.strip_prefix('-')
            && let Some(c) = short.chars().next()
            && c.is_ascii_alphabetic()
        {
            flags.push(format!("-{c}"));
        }
    }
    flags
}

fn has_flag(cmd: &clap::Command, root: &clap::Command, flag: &str) -> bool {
    let globals = root.get_arguments().chain(cmd.get_arguments());
    let mut all = globals.collect::<Vec<_>>();
    all.retain(|a| !a.is_positional());
    if ["--help", "-h", "--version", "-V"].contains(&flag) {
        return true;
    }
    if let Some(long) = flag.strip_prefix("--") {
        all.iter().any(|a| {
            a.get_long() == Some(long) || a.get_all_aliases().is_some_and(|al| al.contains(&long))
        })
    } else {
        let c = flag.chars().nth(1).unwrap();
        all.iter().any(|a| a.get_short() == Some(c))
    }
}

/// A fresh HOME with the default rootfs in its store (the fixture tree with
/// Debian's cloud kernel, hard-linked, as the default recipe makes it) and
/// the fixture kernel tree at ~/src/linux. Root only (hard links to root's
/// files).
fn home_with_default_rootfs() -> Option<tempfile::TempDir> {
    let rootfs = common::rootfs()?;
    let ck = common::cloud_kernel()?;
    if !nix::unistd::getuid().is_root() {
        eprintln!("SKIP: the run commands' dry runs need root (a hard-linked store tree)");
        return None;
    }
    let home = common::temp_home(None);
    let store = home.path().join(".local/share/mkt/rootfs");
    std::fs::create_dir_all(&store).unwrap();
    let tree = store.join(mkt::rootfs::recipe::DEFAULT);
    let cp = |from: &Path, to: &Path| {
        let ok = std::process::Command::new("cp")
            .args(["-al", "--no-target-directory"])
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cp -al {} {}", from.display(), to.display());
    };
    cp(&rootfs, &tree);
    let (image, modules, release) = common::cloud_image(&ck);
    cp(&image, &tree.join("boot").join(image.file_name().unwrap()));
    std::fs::create_dir_all(tree.join("lib/modules")).unwrap();
    cp(&modules, &tree.join("lib/modules").join(&release));
    for f in ["config", "System.map"] {
        let name = format!("{f}-{release}");
        let p = ck.join("root/boot").join(&name);
        if p.exists() {
            cp(&p, &tree.join("boot").join(&name));
        }
    }
    if let Some(linux) = common::kernel_tree() {
        std::fs::create_dir_all(home.path().join("src")).unwrap();
        std::os::unix::fs::symlink(linux, home.path().join("src/linux")).unwrap();
    }
    Some(home)
}

/// Runs a concrete command the way a person would, in a fresh HOME: Ok(true)
/// when it worked, Ok(false) when it was skipped (a fixture is missing, said
/// above), Err with what went wrong.
fn run_it(words: &[String], run_home: Option<&Path>) -> Result<bool, String> {
    let home = common::temp_home(None);
    let sub: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    let expand = |h: &Path| -> Vec<String> {
        sub.iter()
            .map(|w| match w.strip_prefix("~/") {
                Some(rest) => h.join(rest).display().to_string(),
                None => w.replace("=~/", &format!("={}/", h.display())),
            })
            .collect()
    };
    let (home_path, args, ok_codes): (&Path, Vec<String>, &[i32]) = match sub.as_slice() {
        // Doctor's 1 is a report (a required capability is missing here).
        ["doctor", ..] => (home.path(), expand(home.path()), &[0, 1]),
        ["setup", ..] | ["ps", ..] | ["completions", ..] | ["man", ..] => {
            (home.path(), expand(home.path()), &[0])
        }
        ["rootfs", "list" | "gc", ..] => (home.path(), expand(home.path()), &[0]),
        ["ci", "--status"] => (home.path(), expand(home.path()), &[0]),
        ["run", ..] => {
            let Some(h) = run_home else {
                return Ok(false);
            };
            if words.iter().any(|w| w.contains("~/src/linux")) && !h.join("src/linux").exists() {
                return Ok(false);
            }
            let mut a = expand(h);
            if !a.iter().any(|w| w == "--dry-run") {
                let at = a.iter().position(|w| w == "--").unwrap_or(a.len());
                a.insert(at, "--dry-run".into());
            }
            (h, a, &[0])
        }
        _ => return Err("not run by this test and not in NOT_RUN: run it or say why not".into()),
    };
    let o = common::mkt(home_path)
        .args(&args)
        .current_dir(home_path)
        .output()
        .unwrap();
    let code = o.status.code().unwrap_or(-1);
    if !ok_codes.contains(&code) {
        return Err(format!(
            "`mkt {}` exited {code}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    // The same as a normal user, in their own fresh HOME (the dry runs'
    // store tree is root's).
    if sub.first() != Some(&"run")
        && let Some(Some(u)) = common::unprivileged_user()
    {
        let home = common::temp_home(Some(&u));
        let args = expand(home.path());
        let o = common::mkt_as(Some(&u), home.path())
            .args(&args)
            .current_dir(home.path())
            .output()
            .unwrap();
        let code = o.status.code().unwrap_or(-1);
        if !ok_codes.contains(&code) {
            return Err(format!(
                "as {}: `mkt {}` exited {code}:\n{}{}",
                u.name,
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    Ok(true)
}

#[test]
fn every_command_in_the_docs_works_as_shown() {
    let root = mkt::cli::Cli::command();
    let mut shown = Vec::new();
    for f in doc_files() {
        let rel = f
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap()
            .display()
            .to_string();
        let rel = rel.trim_start_matches('/').to_string();
        shown.extend(shown_in(&rel, &std::fs::read_to_string(&f).unwrap()));
    }
    assert!(shown.len() > 50, "too few commands found: {shown:#?}");
    let run_home = home_with_default_rootfs();
    let mut failures = Vec::new();
    let mut ran = 0;
    for s in &shown {
        let words = shell_words(s.text.trim_end_matches('.'));
        let (sub, depth) = walk(&root, &words[1..]);
        if depth == 0 {
            failures.push(format!("{s}: no such subcommand"));
            continue;
        }
        if depth == words.len() - 1 {
            // A name: it exists; the ones that run alone safely, run.
            let safe = [
                &["doctor"][..],
                &["setup"],
                &["ps"],
                &["man"],
                &["rootfs", "list"],
            ];
            let path: Vec<&str> = words[1..].iter().map(String::as_str).collect();
            if safe.contains(&path.as_slice()) {
                match run_it(&words, None) {
                    Ok(_) => {
                        eprintln!("ran {s}");
                        ran += 1
                    }
                    Err(e) => failures.push(format!("{s}: {e}")),
                }
            }
            continue;
        }
        if is_synopsis(&s.text) {
            for flag in named_flags(&s.text) {
                if !has_flag(sub, &root, &flag) {
                    failures.push(format!(
                        "{s}: `mkt {}` has no {flag}",
                        words[1..=depth].join(" ")
                    ));
                }
            }
            continue;
        }
        let cmd = without_redirection(&s.text);
        let words = shell_words(cmd);
        if let Err(e) = mkt::cli::Cli::try_parse_from(&words) {
            failures.push(format!("{s}: refused by the parser:\n{e}"));
            continue;
        }
        if NOT_RUN.iter().any(|(c, _)| *c == cmd) {
            continue;
        }
        match run_it(&words, run_home.as_ref().map(|h| h.path())) {
            Ok(false) => eprintln!("skipped {s}"),
            Ok(true) => {
                eprintln!("ran {s}");
                ran += 1
            }
            Err(e) => failures.push(format!("{s}: {e}")),
        }
    }
    // The list stays true: each entry is still shown somewhere.
    for (cmd, _) in NOT_RUN {
        if !shown.iter().any(|s| without_redirection(&s.text) == *cmd) {
            failures.push(format!(
                "NOT_RUN lists `{cmd}`, which no doc shows any more"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s) with commands shown in the docs:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    eprintln!("ran {ran} of {} commands shown", shown.len());
}

/// The starter config `mkt setup` writes works once uncommented: every key
/// parses and its rootfs names a recipe (the default one).
#[test]
fn the_starter_config_uncommented_is_valid_and_names_real_rootfs() {
    let home = tempfile::tempdir().unwrap();
    let text: String = mkt::config::starter_config()
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if !rest.starts_with(' ') && !rest.is_empty() => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let cfg = mkt::config::Config::parse(&text, Path::new("starter.toml"), home.path())
        .unwrap_or_else(|e| panic!("the uncommented starter config: {e}\n{text}"));
    let rootfs = cfg.defaults.rootfs.expect("the starter shows rootfs");
    assert_eq!(rootfs, mkt::rootfs::recipe::DEFAULT, "starter's rootfs");
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/example.toml"))
            .unwrap();
    let cfg = mkt::config::Config::parse(&example, Path::new("example.toml"), home.path()).unwrap();
    let none = home.path().join("no-recipes");
    for r in cfg
        .defaults
        .rootfs
        .iter()
        .chain(cfg.setups.values().filter_map(|s| s.rootfs.as_ref()))
    {
        assert!(
            mkt::rootfs::recipe::exists(r, &none),
            "configs/example.toml: rootfs {r:?} is not a recipe"
        );
    }
}

#[test]
fn extraction_finds_spans_blocks_and_synopses() {
    let doc = "Run `mkt run -- true` or `mkt ps`.\n\n    mkt completions bash > x\n\n```\nmkt ci --wait   # fg\n```\n```text\nmkt ci job 1: x\n```\n";
    let s: Vec<String> = shown_in("x.md", doc).into_iter().map(|s| s.text).collect();
    assert_eq!(
        s,
        [
            "mkt run -- true",
            "mkt ps",
            "mkt completions bash > x",
            "mkt ci --wait"
        ]
    );
    assert_eq!(
        without_redirection("mkt completions bash > x"),
        "mkt completions bash"
    );
    assert_eq!(
        shell_words("mkt run -- sh -c 'uname -r; true'"),
        ["mkt", "run", "--", "sh", "-c", "uname -r; true"]
    );
    assert!(is_synopsis("mkt ssh NAME"));
    assert!(is_synopsis("mkt completions bash|zsh"));
    assert!(is_synopsis(
        "mkt rootfs pull IMAGE [--platform OS/ARCH[/VARIANT]]"
    ));
    assert!(!is_synopsis(
        "mkt run --rootfs debian-bookworm -- sh -c 'uname -r'"
    ));
    assert_eq!(
        named_flags("mkt stop [NAME | --all] [--force] [--timeout SECS] [-C DIR] [-- CMD --x]"),
        ["--all", "--force", "--timeout", "-C"]
    );
}
