//! Findings: parsing analyser output (gcc, sparse, smatch, checkpatch) and
//! keeping only what a patch introduced. Pure.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// One warning or error an analyser reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The file, relative to the top of the tree (empty: the commit itself,
    /// e.g. a checkpatch remark on the commit message).
    pub file: String,
    /// 0 when the analyser named no line.
    pub line: u32,
    /// `warning`, `error`, `WARNING`, `CHECK`, ... as the analyser says it.
    pub severity: String,
    /// checkpatch's type (`LONG_LINE`), empty for the others.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    pub message: String,
    /// Continuation lines (sparse's expected/got, gcc's notes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detail: Vec<String>,
}

impl Finding {
    /// What identifies a finding across revisions: everything but the line
    /// (which moves when lines are added above it) and the details (which
    /// can quote line numbers).
    fn key(&self) -> (&str, &str, &str, &str) {
        (&self.file, &self.severity, &self.kind, &self.message)
    }

    /// `file:line: severity: message` (checkpatch: `severity TYPE: ...`).
    pub fn one_line(&self) -> String {
        let at = match (self.file.is_empty(), self.line) {
            (true, _) => "commit".to_string(),
            (false, 0) => self.file.clone(),
            (false, l) => format!("{}:{l}", self.file),
        };
        if self.kind.is_empty() {
            format!("{at}: {}: {}", self.severity, self.message)
        } else {
            format!("{at}: {} {}: {}", self.severity, self.kind, self.message)
        }
    }
}

/// `./a/b.c` and `/scratch/tree/a/b.c` → `a/b.c`.
pub(crate) fn normalise_path(path: &str, tree: &str) -> String {
    let mut p = path;
    if !tree.is_empty()
        && let Some(rest) = p.strip_prefix(tree)
    {
        p = rest.trim_start_matches('/');
    }
    while let Some(rest) = p.strip_prefix("./") {
        p = rest;
    }
    while let Some(rest) = p.strip_prefix("../") {
        p = rest;
    }
    p.to_string()
}

/// Parses `file:line[:col]: [func() ]severity: message` lines, the shape
/// gcc, clang, sparse, smatch and objtool share. Notes and indented
/// continuation lines for the same file become the previous finding's
/// details; everything else (make's chatter, gcc's source excerpts) is
/// skipped. `tree` is stripped from absolute paths.
///
/// A build that descends into subdirectories (`make -C ip`) reports paths
/// relative to the subdirectory: make's `Entering directory` lines put
/// them back under the top (see also [`resolve_paths`]).
pub(crate) fn parse_compiler(text: &str, tree: &str) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    for raw in text.lines() {
        if let Some(d) = make_directory(raw, "Entering directory") {
            dirs.push(normalise_path(d, tree));
            continue;
        }
        if make_directory(raw, "Leaving directory").is_some() {
            dirs.pop();
            continue;
        }
        let Some((file, line, rest)) = split_location(raw) else {
            continue;
        };
        let file = match dirs.last() {
            // Under the tree, below its top: relative to that directory.
            Some(d) if !d.is_empty() && !d.starts_with('/') && !file.starts_with('/') => {
                normalise_path(&format!("{d}/{file}"), tree)
            }
            _ => normalise_path(file, tree),
        };
        // smatch: `file:123 func() warn: message`.
        let rest = match rest.split_once("() ") {
            Some((func, r)) if !func.contains(' ') && !func.is_empty() => r,
            _ => rest,
        };
        let (sev, msg) = match rest.split_once(": ") {
            Some((s, m)) if is_severity(s) => (s, m),
            _ => {
                // sparse's "    expected int *" lines: a detail.
                if let Some(last) = out.last_mut()
                    && last.file == file
                    && rest.starts_with(' ')
                {
                    last.detail.push(rest.trim().to_string());
                }
                continue;
            }
        };
        if sev == "note" {
            if let Some(last) = out.last_mut() {
                last.detail.push(format!("{file}:{line}: note: {msg}"));
            }
            continue;
        }
        let severity = match sev {
            "warn" => "warning",
            "fatal error" => "error",
            s => s,
        };
        out.push(Finding {
            file,
            line,
            severity: severity.to_string(),
            kind: String::new(),
            message: msg.trim_end().to_string(),
            detail: vec![],
        });
    }
    out
}

/// `make[2]: Entering directory '/t/ip'` → `/t/ip` (for `what`).
fn make_directory<'a>(l: &'a str, what: &str) -> Option<&'a str> {
    let rest = l.strip_prefix("make")?;
    let (_, rest) = rest.split_once(": ")?;
    let rest = rest.strip_prefix(what)?.trim();
    let q = |c| matches!(c, '\'' | '`' | '"');
    Some(rest.trim_start_matches(q).trim_end_matches(q))
}

/// Puts findings whose file is not a path of the tree (`known`, as `git
/// ls-files` lists them) at the one path of the tree that ends with it:
/// builds that run `make --no-print-directory -C ip` report `ipaddress.c`
/// for `ip/ipaddress.c`. A name that fits several paths stays as it is.
pub(crate) fn resolve_paths(found: Vec<Finding>, known: &[String]) -> Vec<Finding> {
    let set: std::collections::HashSet<&str> = known.iter().map(String::as_str).collect();
    found
        .into_iter()
        .map(|mut f| {
            if !f.file.is_empty() && !set.contains(f.file.as_str()) {
                let tail = format!("/{}", f.file);
                let mut fits = known.iter().filter(|k| k.ends_with(&tail));
                if let (Some(one), None) = (fits.next(), fits.next()) {
                    f.file = one.clone();
                }
            }
            f
        })
        .collect()
}

fn is_severity(s: &str) -> bool {
    matches!(
        s,
        "warning" | "error" | "fatal error" | "note" | "warn" | "info"
    )
}

/// `file:line[:col]: rest` or `file:line rest` (smatch), or `file.o: rest`
/// (objtool, line 0). The file must look like a path in the tree.
fn split_location(l: &str) -> Option<(&str, u32, &str)> {
    let (file, after) = l.split_once(':')?;
    if file.is_empty() || file.contains(' ') || !file.contains('.') {
        return None;
    }
    let digits = after.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        // objtool: `drivers/x.o: warning: objtool: ...`
        let rest = after.strip_prefix(' ')?;
        return file.ends_with(".o").then_some((file, 0, rest));
    }
    let line: u32 = after[..digits].parse().ok()?;
    let mut rest = &after[digits..];
    if let Some(r) = rest.strip_prefix(':') {
        let cdigits = r.bytes().take_while(u8::is_ascii_digit).count();
        rest = if cdigits > 0 {
            r[cdigits..].strip_prefix(':').unwrap_or(&r[cdigits..])
        } else {
            r
        };
    }
    let rest = rest.strip_prefix(' ')?;
    Some((file, line, rest))
}

/// Parses checkpatch.pl output run with `--show-types --no-summary`:
/// `SEVERITY:TYPE: message` followed by `#N: FILE: path:line:`.
pub(crate) fn parse_checkpatch(text: &str) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    let mut open = false;
    for l in text.lines() {
        if let Some((sev, rest)) = l.split_once(':')
            && matches!(sev, "ERROR" | "WARNING" | "CHECK")
            && let Some((kind, msg)) = rest.split_once(": ")
            && !kind.is_empty()
            && kind
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            out.push(Finding {
                file: String::new(),
                line: 0,
                severity: sev.to_string(),
                kind: kind.to_string(),
                message: msg.trim_end().to_string(),
                detail: vec![],
            });
            open = true;
            continue;
        }
        if open
            && l.starts_with('#')
            && let Some((_, loc)) = l.split_once(": FILE: ")
            && let Some(f) = out.last_mut()
        {
            let loc = loc.trim_end().trim_end_matches(':');
            if let Some((file, line)) = loc.rsplit_once(':') {
                f.file = file.to_string();
                f.line = line.parse().unwrap_or(0);
            } else {
                f.file = loc.to_string();
            }
            continue;
        }
        if l.trim().is_empty() {
            open = false;
        }
    }
    out
}

/// Lines a patch added, per file: from `git diff -U0` output.
pub(crate) fn added_lines(diff: &str) -> HashMap<String, Vec<(u32, u32)>> {
    let mut map: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
    let mut file: Option<String> = None;
    for l in diff.lines() {
        if let Some(p) = l.strip_prefix("+++ ") {
            file = p.strip_prefix("b/").map(str::to_string);
            continue;
        }
        let (Some(f), Some(h)) = (&file, l.strip_prefix("@@ ")) else {
            continue;
        };
        // @@ -a,b +c,d @@
        let Some(plus) = h.split_whitespace().find(|w| w.starts_with('+')) else {
            continue;
        };
        let mut it = plus[1..].split(',');
        let start: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let len: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(1);
        if len > 0 {
            map.entry(f.clone()).or_default().push((start, len));
        }
    }
    map
}

/// The findings on the new revision that the parent did not have: per
/// (file, severity, type, message), as many as the new revision has more
/// than the parent, preferring those on lines the patch added. Order kept.
pub(crate) fn introduced(
    new: &[Finding],
    old: &[Finding],
    added: &HashMap<String, Vec<(u32, u32)>>,
) -> Vec<Finding> {
    let mut old_count: HashMap<(&str, &str, &str, &str), usize> = HashMap::new();
    for f in old {
        *old_count.entry(f.key()).or_default() += 1;
    }
    let on_added = |f: &Finding| {
        added.get(&f.file).is_some_and(|r| {
            r.iter()
                .any(|&(s, n)| f.line >= s && f.line < s.saturating_add(n))
        })
    };
    let mut groups: BTreeMap<(&str, &str, &str, &str), Vec<usize>> = BTreeMap::new();
    for (i, f) in new.iter().enumerate() {
        groups.entry(f.key()).or_default().push(i);
    }
    let mut keep = vec![false; new.len()];
    for (key, mut idx) in groups {
        let extra = idx.len().saturating_sub(*old_count.get(&key).unwrap_or(&0));
        // Added lines first, then by position.
        idx.sort_by_key(|&i| (!on_added(&new[i]), i));
        for &i in idx.iter().take(extra) {
            keep[i] = true;
        }
    }
    new.iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(f, _)| f.clone())
        .collect()
}

/// Removes exact duplicates (the same header warning printed once per
/// object including it), keeping the first.
pub(crate) fn dedup(v: Vec<Finding>) -> Vec<Finding> {
    let mut seen = std::collections::HashSet::new();
    v.into_iter()
        .filter(|f| seen.insert((f.file.clone(), f.line, f.message.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GCC: &str = "\
drivers/net/dummy.c: In function 'mkt_ci_peek':
drivers/net/dummy.c:140:13: warning: variable 'seen' set but not used [-Wunused-but-set-variable]
  140 |         int seen;
      |             ^~~~
drivers/net/dummy.c:150:1: error: expected ';' before '}' token
./include/linux/foo.h:3:5: note: declared here
make[4]: *** [scripts/Makefile.build:250: drivers/net/dummy.o] Error 1
drivers/net/dummy.o: warning: objtool: mkt()+0x12: unreachable instruction
";

    #[test]
    fn gcc_lines_notes_and_objtool() {
        let f = parse_compiler(GCC, "");
        assert_eq!(f.len(), 3, "{f:#?}");
        assert_eq!(
            f[0].one_line(),
            "drivers/net/dummy.c:140: warning: variable 'seen' set but not used [-Wunused-but-set-variable]"
        );
        assert_eq!(f[1].severity, "error");
        assert_eq!(f[1].detail, ["include/linux/foo.h:3: note: declared here"]);
        assert_eq!(f[2].file, "drivers/net/dummy.o");
        assert_eq!(f[2].line, 0);
        assert!(f[2].message.starts_with("objtool: mkt()"));
    }

    #[test]
    fn sparse_details_and_smatch() {
        let text = "\
/s/tree/drivers/net/dummy.c:142:27: warning: incorrect type in initializer (different address spaces)
/s/tree/drivers/net/dummy.c:142:27:    expected int *kptr
/s/tree/drivers/net/dummy.c:142:27:    got int [noderef] __user *uptr
drivers/net/dummy.c:77 dummy_dev_init() warn: possible memory leak of 'x'
drivers/net/dummy.c:90 dummy_setup() error: we previously assumed 'dev' could be null
";
        let f = parse_compiler(text, "/s/tree");
        assert_eq!(f.len(), 3, "{f:#?}");
        assert_eq!(f[0].file, "drivers/net/dummy.c");
        assert_eq!(
            f[0].detail,
            ["expected int *kptr", "got int [noderef] __user *uptr"]
        );
        assert_eq!(f[1].severity, "warning");
        assert_eq!(f[1].line, 77);
        assert_eq!(f[1].message, "possible memory leak of 'x'");
        assert_eq!(f[2].severity, "error");
    }

    #[test]
    fn checkpatch_blocks() {
        let text = "\
WARNING:FILE_PATH_CHANGES: added, moved or deleted file(s), does MAINTAINERS need updating?
#20: 
new file mode 100644

WARNING:SPDX_LICENSE_TAG: Missing or malformed SPDX-License-Identifier tag in line 1
#25: FILE: drivers/net/mkt_ci_new.c:1:
+/* no licence */

ERROR:MISSING_SIGN_OFF: Missing Signed-off-by: line(s)

";
        let f = parse_checkpatch(text);
        assert_eq!(f.len(), 3, "{f:#?}");
        assert_eq!(f[0].kind, "FILE_PATH_CHANGES");
        assert_eq!(f[0].file, "");
        assert_eq!(f[1].file, "drivers/net/mkt_ci_new.c");
        assert_eq!(f[1].line, 1);
        assert_eq!(
            f[1].one_line(),
            "drivers/net/mkt_ci_new.c:1: WARNING SPDX_LICENSE_TAG: Missing or malformed SPDX-License-Identifier tag in line 1"
        );
        assert_eq!(f[2].severity, "ERROR");
        assert_eq!(
            f[2].one_line(),
            "commit: ERROR MISSING_SIGN_OFF: Missing Signed-off-by: line(s)"
        );
    }

    fn w(file: &str, line: u32, msg: &str) -> Finding {
        Finding {
            file: file.into(),
            line,
            severity: "warning".into(),
            kind: String::new(),
            message: msg.into(),
            detail: vec![],
        }
    }

    #[test]
    fn introduced_ignores_moved_lines_and_counts_duplicates() {
        let diff = "\
diff --git a/a.c b/a.c
--- a/a.c
+++ b/a.c
@@ -10,0 +11,4 @@ int x;
+int y;
@@ -40 +44 @@
-old
+new
";
        let added = added_lines(diff);
        assert_eq!(added["a.c"], [(11, 4), (44, 1)]);
        let old = vec![
            w("a.c", 20, "unused x"),
            w("a.c", 26, "unused x"),
            w("b.c", 5, "pre-existing"),
        ];
        let new = vec![
            w("a.c", 24, "unused x"), // moved down by the patch
            w("a.c", 30, "unused x"), // moved down by the patch
            w("a.c", 12, "unused x"), // a third one, on an added line: the new one
            w("b.c", 5, "pre-existing"),
            w("a.c", 44, "new thing"),
        ];
        let got = introduced(&new, &old, &added);
        assert_eq!(got, [w("a.c", 12, "unused x"), w("a.c", 44, "new thing")]);
        assert!(introduced(&old, &old, &added).is_empty());
    }

    /// A hunk `+s,n` covers lines s..s+n-1 exactly: a finding on the line
    /// just after it (or just before) is not on an added line, one on its
    /// first or last line is. Each group has one finding more than the
    /// parent, listed outside-first so that position alone would pick it.
    #[test]
    fn added_ranges_end_at_the_hunks_last_line() {
        let diff = "\
diff --git a/a.c b/a.c
--- a/a.c
+++ b/a.c
@@ -10,0 +11,4 @@ int x;
+a
+b
+c
+d
@@ -40 +44 @@
-old
+new
@@ -60,2 +63,0 @@
-gone
-gone
";
        let added = added_lines(diff);
        assert_eq!(added["a.c"], [(11, 4), (44, 1)], "a deletion adds no range");
        let old = vec![w("a.c", 1, "end"), w("a.c", 1, "start"), w("a.c", 1, "one")];
        let new = vec![
            w("a.c", 15, "end"),   // just after 11..=14
            w("a.c", 14, "end"),   // its last line
            w("a.c", 10, "start"), // just before
            w("a.c", 11, "start"), // its first line
            w("a.c", 45, "one"),   // just after the one-line hunk 44
            w("a.c", 44, "one"),
        ];
        let kept: Vec<u32> = introduced(&new, &old, &added)
            .iter()
            .map(|f| f.line)
            .collect();
        assert_eq!(kept, [14, 11, 44]);
    }

    /// A finding is the parent's only if file, severity, type and message
    /// all match: each of these differs from the parent's in one of them.
    #[test]
    fn introduced_tells_findings_apart_by_file_severity_type_and_message() {
        let old = vec![w("a.c", 1, "m")];
        let mut error = w("a.c", 1, "m");
        error.severity = "error".into();
        let mut typed = w("a.c", 1, "m");
        typed.kind = "LONG_LINE".into();
        let new = vec![w("b.c", 1, "m"), error, typed, w("a.c", 1, "other")];
        assert_eq!(introduced(&new, &old, &HashMap::new()), new);
        assert!(introduced(&old, &old, &HashMap::new()).is_empty());
    }

    /// Only `file:line: severity: message` lines of files that look like
    /// the tree's are findings: not make's own warnings, not lines whose
    /// "file" has spaces, not an unknown severity. A gcc message quoting
    /// `f() ` is not smatch's `func() severity:` form.
    #[test]
    fn only_findings_of_the_trees_files_are_kept() {
        let text = "\
Makefile:12: warning: overriding recipe for target 'all'
note from x.c:5: warning: not a file
lib/a.c:7: from here: not a severity
lib/d.c:3:: warning: no column between the colons
lib/b.c:8:2: warning: call to f() ignored: its result
lib/c.c:9 f() warn: smatch says
";
        let f = parse_compiler(text, "/t");
        let got: Vec<(&str, u32, &str, &str)> = f
            .iter()
            .map(|f| {
                (
                    f.file.as_str(),
                    f.line,
                    f.severity.as_str(),
                    f.message.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("lib/b.c", 8, "warning", "call to f() ignored: its result"),
                ("lib/c.c", 9, "warning", "smatch says"),
            ]
        );
    }

    /// The directory make entered is prefixed only when it is a relative
    /// directory of the tree and the file's path is relative.
    #[test]
    fn make_directories_outside_the_tree_or_at_its_top_add_nothing() {
        let text = "\
make[1]: Entering directory '/elsewhere/x'
a.c:1:1: warning: outside
make[1]: Leaving directory '/elsewhere/x'
make[1]: Entering directory '/t'
b.c:2:1: warning: top
make[1]: Leaving directory '/t'
make[1]: Entering directory '/t/ip'
/t/lib/c.c:3:1: warning: absolute
";
        let files: Vec<String> = parse_compiler(text, "/t")
            .into_iter()
            .map(|f| f.file)
            .collect();
        assert_eq!(files, ["a.c", "b.c", "lib/c.c"]);
    }

    /// A name that is already a path of the tree stays, even when another
    /// path ends with it.
    #[test]
    fn known_paths_are_not_moved_into_subdirectories() {
        let known = vec![
            "x.c".to_string(),
            "sub/x.c".to_string(),
            "ip/y.c".to_string(),
        ];
        let got = resolve_paths(
            vec![w("x.c", 1, "m"), w("y.c", 1, "m"), w("", 0, "c")],
            &known,
        );
        let files: Vec<&str> = got.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(files, ["x.c", "ip/y.c", ""]);
    }

    /// The same finding printed twice (a header's warning, once per object
    /// including it) is kept once; a different line or message is not a
    /// duplicate.
    #[test]
    fn dedup_keeps_the_first_of_exact_duplicates() {
        let v = vec![
            w("a.h", 3, "m"),
            w("a.h", 3, "m"),
            w("a.h", 4, "m"),
            w("a.h", 3, "n"),
        ];
        assert_eq!(
            dedup(v),
            [w("a.h", 3, "m"), w("a.h", 4, "m"), w("a.h", 3, "n")]
        );
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normalise_path("./include/x.h", ""), "include/x.h");
        assert_eq!(normalise_path("/t/tree/a/b.c", "/t/tree"), "a/b.c");
        assert_eq!(normalise_path("../drivers/a.c", "/t"), "drivers/a.c");
    }

    /// iproute2 builds with `make -C ip` (and, unless V=1, with
    /// --no-print-directory): gcc and sparse name `ipaddress.c`, which is
    /// `ip/ipaddress.c` in the tree.
    #[test]
    fn files_of_subdirectory_builds_keep_their_directory() {
        let with_dirs = "\
make[1]: Entering directory '/s/tree/ip'
    CC       ipaddress.o
ipaddress.c:120:5: warning: unused variable 'x' [-Wunused-variable]
make[2]: Entering directory '/s/tree/lib/sub'
util.c:3: error: expected ';'
make[2]: Leaving directory '/s/tree/lib/sub'
iplink.c:9:1: warning: no previous prototype
make[1]: Leaving directory '/s/tree/ip'
include/x.h:1:1: warning: top
";
        let f = parse_compiler(with_dirs, "/s/tree");
        let files: Vec<&str> = f.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "ip/ipaddress.c",
                "lib/sub/util.c",
                "ip/iplink.c",
                "include/x.h"
            ]
        );

        let quiet = "\
ip
    CC       ipaddress.o
ipaddress.c:120:5: warning: unused variable 'x' [-Wunused-variable]
ipaddress.c:130:9: warning: incorrect type in assignment (different base types)
ipaddress.c:130:9:    expected int *p
ipaddress.c:130:9:    got char *
utils.c:1:1: warning: both
ip/ip.c:2:2: warning: already a path
";
        let known: Vec<String> = ["ip/ipaddress.c", "ip/ip.c", "lib/utils.c", "tc/utils.c"]
            .map(String::from)
            .to_vec();
        let f = resolve_paths(parse_compiler(quiet, "/s/tree"), &known);
        let files: Vec<&str> = f.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(
            files,
            ["ip/ipaddress.c", "ip/ipaddress.c", "utils.c", "ip/ip.c"]
        );
        assert_eq!(f[1].detail, ["expected int *p", "got char *"]);
        assert!(f[0].one_line().starts_with("ip/ipaddress.c:120: warning"));
    }
}
