//! What a kernel patch touches: the Kbuild directories to analyse, and the
//! config options that make Kbuild compile the touched files. Pure: the
//! tree is read through closures.
//!
//! The rule for headers (documented in docs/ci.md): a header inside a
//! driver or subsystem directory (not under `include/`) widens nothing, its
//! directory is checked as for a `.c`. A header under `include/` or
//! `arch/*/include/` is checked through the directories of the `.c` files
//! that include it directly (by its include path), at most
//! [`MAX_HEADER_DIRS`] of them, those with the most includers first; the
//! report says how many were left out.

use std::collections::{BTreeMap, BTreeSet};

/// How many includer directories one global header may add.
pub(crate) const MAX_HEADER_DIRS: usize = 8;

/// Top-level directories that Kbuild's single-directory targets do not
/// build (or that `make prepare` already builds).
const NOT_KBUILD: [&str; 5] = ["Documentation", "tools", "scripts", "LICENSES", "usr"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Kbuild directories to build, e.g. `drivers/net` (no trailing slash).
    pub dirs: Vec<String>,
    /// Touched C sources (existing at the new revision) in those dirs.
    pub c_files: Vec<String>,
    /// Why some files widen or narrow the set, for the report.
    pub notes: Vec<String>,
}

/// The include path of a global header: `include/linux/x.h` → `linux/x.h`,
/// `arch/x86/include/asm/y.h` → `asm/y.h`; `None` for local headers.
pub(crate) fn include_path(file: &str) -> Option<&str> {
    if let Some(rest) = file.strip_prefix("include/") {
        return Some(rest);
    }
    let rest = file.strip_prefix("arch/")?;
    let (_, after) = rest.split_once('/')?;
    after.strip_prefix("include/")
}

/// The nearest directory at or above `file`'s that has a Makefile or
/// Kbuild, if it is one Kbuild builds.
pub(crate) fn kbuild_dir(file: &str, has_makefile: &dyn Fn(&str) -> bool) -> Option<String> {
    let top = file.split('/').next().unwrap_or("");
    if !file.contains('/') || NOT_KBUILD.contains(&top) {
        return None;
    }
    let mut dir = file.rsplit_once('/').map(|(d, _)| d)?;
    loop {
        if has_makefile(dir) {
            return Some(dir.to_string());
        }
        dir = dir.rsplit_once('/')?.0;
    }
}

/// The scope of a patch changing `files` (paths at the new revision; a
/// deleted file still names its directory). `includers(p)` lists the `.c`
/// files that include the global header with include path `p`.
pub fn scope(
    files: &[String],
    has_makefile: &dyn Fn(&str) -> bool,
    exists: &dyn Fn(&str) -> bool,
    includers: &dyn Fn(&str) -> Vec<String>,
) -> Scope {
    let mut dirs = BTreeSet::new();
    let mut s = Scope::default();
    let mut unbuilt = Vec::new();
    for f in files {
        let name = f.rsplit('/').next().unwrap_or(f);
        let is_header = name.ends_with(".h");
        if is_header && let Some(inc) = include_path(f) {
            let mut per_dir: BTreeMap<String, usize> = BTreeMap::new();
            for c in includers(inc) {
                if let Some(d) = kbuild_dir(&c, has_makefile) {
                    *per_dir.entry(d).or_default() += 1;
                }
            }
            let total = per_dir.len();
            let mut v: Vec<(String, usize)> = per_dir.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let picked: Vec<String> = v.into_iter().take(MAX_HEADER_DIRS).map(|x| x.0).collect();
            s.notes.push(if total == 0 {
                format!("{f}: no .c file includes <{inc}> directly; nothing compiled for it")
            } else if total > picked.len() {
                format!(
                    "{f}: included from {total} directories; checked the {} with the most includers: {}",
                    picked.len(),
                    picked.join(" ")
                )
            } else {
                format!("{f}: checked through its includers in {}", picked.join(" "))
            });
            dirs.extend(picked);
            continue;
        }
        let buildable = name.ends_with(".c")
            || name.ends_with(".S")
            || is_header
            || matches!(name, "Makefile" | "Kbuild" | "Kconfig")
            || name.starts_with("Kconfig.")
            || name.starts_with("Makefile.");
        match kbuild_dir(f, has_makefile) {
            Some(d) if buildable => {
                if name.ends_with(".c") && exists(f) {
                    s.c_files.push(f.clone());
                }
                dirs.insert(d);
            }
            _ => unbuilt.push(f.as_str()),
        }
    }
    if !unbuilt.is_empty() {
        s.notes.push(format!(
            "not compiled (checkpatch only): {}",
            unbuilt.join(" ")
        ));
    }
    // A directory inside another one is built by it.
    let all: Vec<String> = dirs.into_iter().collect();
    s.dirs = all
        .iter()
        .filter(|d| {
            !all.iter()
                .any(|o| o != *d && d.starts_with(&format!("{o}/")))
        })
        .cloned()
        .collect();
    s
}

/// Makefile text with continuation lines joined and comments dropped.
fn logical_lines(mk: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for l in mk.lines() {
        let l = l.split('#').next().unwrap_or("");
        if let Some(x) = l.strip_suffix('\\') {
            cur.push_str(x);
            cur.push(' ');
        } else {
            cur.push_str(l);
            out.push(std::mem::take(&mut cur));
        }
    }
    out.push(cur);
    out
}

/// `$(CONFIG_FOO)` in a Makefile variable name → `CONFIG_FOO`.
fn config_in(lhs: &str) -> Option<String> {
    let start = lhs.find("$(CONFIG_")?;
    let rest = &lhs[start + 2..];
    let end = rest.find(')')?;
    Some(rest[..end].to_string())
}

/// The `VAR op VALUE` assignments (`+=`, `:=`, `=`) of a Makefile.
fn assignments(mk: &str) -> Vec<(String, Vec<String>)> {
    logical_lines(mk)
        .into_iter()
        .filter_map(|l| {
            let (lhs, rhs) = ["+=", ":=", "="].iter().find_map(|op| l.split_once(op))?;
            let lhs = lhs.trim().trim_end_matches([':', '+']).trim();
            Some((
                lhs.to_string(),
                rhs.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// The config options that make Kbuild compile `file` (a `.c` path
/// relative to the top), or build directory `dir` when `file` is its
/// Makefile: `obj-$(CONFIG_X) += file.o` (through composite objects) in its
/// directory, then `obj-$(CONFIG_Y) += sub/` up the parents. `read(dir)`
/// returns a directory's Makefile (or Kbuild) text.
pub(crate) fn options_for(file: &str, read: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut want = BTreeSet::new();
    let Some((dir, name)) = file.rsplit_once('/') else {
        return vec![];
    };
    if let Some(stem) = name.strip_suffix(".c").or_else(|| name.strip_suffix(".S"))
        && let Some(mk) = read(dir)
    {
        let asg = assignments(&mk);
        let mut objs = vec![format!("{stem}.o")];
        let mut seen = BTreeSet::new();
        while let Some(obj) = objs.pop() {
            if !seen.insert(obj.clone()) {
                continue;
            }
            for (lhs, rhs) in &asg {
                if !rhs.contains(&obj) {
                    continue;
                }
                if let Some(c) = config_in(lhs) {
                    want.insert(c);
                }
                // `foo-y`, `foo-objs`, `foo-$(CONFIG_X)`: foo.o is composite.
                let base = lhs
                    .split_once("-$(")
                    .map(|x| x.0)
                    .or_else(|| lhs.strip_suffix("-y"))
                    .or_else(|| lhs.strip_suffix("-objs"))
                    .or_else(|| lhs.strip_suffix("-m"));
                if let Some(b) = base
                    && !matches!(b, "obj" | "lib" | "ccflags" | "subdir" | "always" | "extra")
                {
                    objs.push(format!("{b}.o"));
                }
            }
        }
    }
    // The directory's own option, from each parent up to the top.
    let mut child = dir;
    while let Some((parent, sub)) = child.rsplit_once('/') {
        if let Some(mk) = read(parent) {
            let entry = format!("{sub}/");
            for (lhs, rhs) in assignments(&mk) {
                if rhs.contains(&entry)
                    && let Some(c) = config_in(&lhs)
                {
                    want.insert(c);
                }
            }
        }
        child = parent;
    }
    want.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(dirs: &[&'static str]) -> impl Fn(&str) -> bool {
        move |d: &str| dirs.contains(&d)
    }

    #[test]
    fn include_paths() {
        assert_eq!(
            include_path("include/linux/skbuff.h"),
            Some("linux/skbuff.h")
        );
        assert_eq!(include_path("arch/x86/include/asm/io.h"), Some("asm/io.h"));
        assert_eq!(include_path("drivers/net/x.h"), None);
    }

    #[test]
    fn scope_table() {
        let has = mk(&[
            "drivers",
            "drivers/net",
            "drivers/net/ethernet",
            "drivers/net/ethernet/intel",
            "drivers/block",
            "fs/ext4",
        ]);
        let exists = |f: &str| f != "drivers/net/gone.c";
        let includers = |inc: &str| -> Vec<String> {
            match inc {
                "linux/mkt.h" => vec![
                    "drivers/block/a.c".into(),
                    "fs/ext4/a.c".into(),
                    "fs/ext4/b.c".into(),
                    "tools/x.c".into(),
                ],
                _ => vec![],
            }
        };
        type Case<'a> = (&'a str, Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, usize);
        let cases: Vec<Case> = vec![
            (
                "a driver file: its directory",
                vec!["drivers/net/dummy.c"],
                vec!["drivers/net"],
                vec!["drivers/net/dummy.c"],
                0,
            ),
            (
                "a subdirectory is built by its parent; deleted files are no c_files",
                vec![
                    "drivers/net/gone.c",
                    "drivers/net/ethernet/intel/e1000.c",
                    "drivers/net/Kconfig",
                ],
                vec!["drivers/net"],
                vec!["drivers/net/ethernet/intel/e1000.c"],
                0,
            ),
            (
                "a local header: its directory",
                vec!["drivers/net/ethernet/intel/e1000.h"],
                vec!["drivers/net/ethernet/intel"],
                vec![],
                0,
            ),
            (
                "a global header: its includers' directories",
                vec!["include/linux/mkt.h"],
                vec!["drivers/block", "fs/ext4"],
                vec![],
                1,
            ),
            (
                "documentation and tools: checkpatch only",
                vec!["Documentation/x.rst", "tools/a.c", "MAINTAINERS"],
                vec![],
                vec![],
                1,
            ),
            (
                "an unused global header",
                vec!["include/linux/none.h"],
                vec![],
                vec![],
                1,
            ),
            (
                "a file Kbuild does not compile, in a Kbuild directory: checkpatch only",
                vec!["drivers/net/README"],
                vec![],
                vec![],
                1,
            ),
            (
                "Makefile.* and Kconfig.* fragments: their directory",
                vec!["drivers/net/Makefile.extra", "fs/ext4/Kconfig.debug"],
                vec!["drivers/net", "fs/ext4"],
                vec![],
                0,
            ),
        ];
        for (name, files, dirs, c, notes) in cases {
            let files: Vec<String> = files.into_iter().map(String::from).collect();
            let s = scope(&files, &has, &exists, &includers);
            assert_eq!(s.dirs, dirs, "{name}");
            assert_eq!(s.c_files, c, "{name}");
            assert_eq!(s.notes.len(), notes, "{name}: {:?}", s.notes);
        }
        // All of a header's includer directories checked (most includers
        // first): said so, no cap.
        let s = scope(&["include/linux/mkt.h".into()], &has, &exists, &includers);
        assert_eq!(
            s.notes,
            ["include/linux/mkt.h: checked through its includers in fs/ext4 drivers/block"]
        );
    }

    #[test]
    fn header_with_many_includer_dirs_is_capped() {
        let has = |_: &str| true;
        let includers =
            |_: &str| -> Vec<String> { (0..20).map(|i| format!("drivers/d{i:02}/x.c")).collect() };
        let s = scope(&["include/linux/big.h".into()], &has, &|_| true, &includers);
        assert_eq!(s.dirs.len(), MAX_HEADER_DIRS);
        assert!(
            s.notes[0].contains("included from 20 directories"),
            "{:?}",
            s.notes
        );
        // The directories with the most includers are the ones checked,
        // not the first by name.
        let includers = |_: &str| -> Vec<String> {
            (0..20)
                .flat_map(|i| {
                    let n = if i >= 12 { 3 } else { 1 };
                    (0..n).map(move |j| format!("drivers/d{i:02}/x{j}.c"))
                })
                .collect()
        };
        let s = scope(&["include/linux/big.h".into()], &has, &|_| true, &includers);
        let want: Vec<String> = (12..20).map(|i| format!("drivers/d{i:02}")).collect();
        assert_eq!(s.dirs.to_vec(), want);
    }

    /// Files of trees Kbuild does not build have no Kbuild directory, even
    /// where a Makefile exists.
    #[test]
    fn directories_kbuild_does_not_build_are_not_kbuild_dirs() {
        let has = |_: &str| true;
        assert_eq!(kbuild_dir("tools/perf/x.c", &has), None);
        assert_eq!(kbuild_dir("Makefile", &has), None);
        assert_eq!(
            kbuild_dir("drivers/net/x.c", &has).as_deref(),
            Some("drivers/net")
        );
    }

    #[test]
    fn options_from_makefiles() {
        let read = |d: &str| -> Option<String> {
            Some(
                match d {
                    "drivers/net" => {
                        "# comment\nobj-$(CONFIG_DUMMY) += dummy.o\nobj-$(CONFIG_NET_TEAM) += team/\n\
                         obj-$(CONFIG_MKT) += mkt.o\nmkt-y := core.o \\\n    extra.o\nmkt-$(CONFIG_MKT_DEBUG) += dbg.o\n"
                    }
                    "drivers/net/team" => "obj-$(CONFIG_NET_TEAM_MODE_X) += team_mode_x.o\n",
                    "drivers" => "obj-y += base/\nobj-$(CONFIG_NETDEVICES) += net/\n",
                    _ => return None,
                }
                .to_string(),
            )
        };
        assert_eq!(
            options_for("drivers/net/dummy.c", &read),
            ["CONFIG_DUMMY", "CONFIG_NETDEVICES"]
        );
        assert_eq!(
            options_for("drivers/net/extra.c", &read),
            ["CONFIG_MKT", "CONFIG_NETDEVICES"]
        );
        assert_eq!(
            options_for("drivers/net/dbg.c", &read),
            ["CONFIG_MKT", "CONFIG_MKT_DEBUG", "CONFIG_NETDEVICES"]
        );
        assert_eq!(
            options_for("drivers/net/team/team_mode_x.c", &read),
            [
                "CONFIG_NETDEVICES",
                "CONFIG_NET_TEAM",
                "CONFIG_NET_TEAM_MODE_X"
            ]
        );
        assert_eq!(
            options_for("drivers/net/Makefile", &read),
            ["CONFIG_NETDEVICES"]
        );
    }
}
