//! The report of one `mkt ci` job: per check, whether it ran and what the
//! patch introduced; rendered for people, as JSON and as JUnit XML. Pure.

use serde::{Deserialize, Serialize};

use super::findings::Finding;

/// The checks, in report order.
pub(crate) const CHECKS: [&str; 5] = ["checkpatch", "sparse", "smatch", "warnings", "clang"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// The check ran on the revision (and its parent, when compared).
    Ran,
    /// Turned off on the command line (`--no-sparse`), or not for this
    /// project: not a pass, not a failure.
    Disabled,
    /// Could not run (tool not installed, build broken at the parent, ...):
    /// never a pass.
    NotRun,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub status: Status,
    /// Why it was disabled or not run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// What the patch introduced.
    pub new: Vec<Finding>,
    /// Findings also present at the parent (only listed with --show-all).
    pub preexisting: usize,
    /// Every finding at the revision, with --show-all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub all: Vec<Finding>,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl CheckResult {
    pub fn disabled(name: &str, reason: &str) -> CheckResult {
        CheckResult::skipped(name, Status::Disabled, reason)
    }
    pub fn not_run(name: &str, reason: &str) -> CheckResult {
        CheckResult::skipped(name, Status::NotRun, reason)
    }
    fn skipped(name: &str, status: Status, reason: &str) -> CheckResult {
        CheckResult {
            name: name.to_string(),
            status,
            reason: reason.to_string(),
            new: vec![],
            preexisting: 0,
            all: vec![],
            seconds: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub job: u64,
    pub project: String,
    pub source: String,
    pub rev: String,
    pub commit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub subject: String,
    pub files: Vec<String>,
    /// Kbuild directories analysed.
    pub dirs: Vec<String>,
    /// The kernel config used: `--kernel-config FILE` or the default's
    /// description.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel_config: String,
    /// How the scope was chosen, and touched files no check compiled.
    pub notes: Vec<String>,
    pub checks: Vec<CheckResult>,
    pub seconds: f64,
    pub exit: i32,
}

/// 0 nothing new and every enabled check ran; 1 findings introduced; 2 a
/// check could not run; 3 both.
pub(crate) fn exit_code(checks: &[CheckResult]) -> i32 {
    let found = checks.iter().any(|c| !c.new.is_empty());
    let not_run = checks.iter().any(|c| c.status == Status::NotRun);
    i32::from(found) | (i32::from(not_run) << 1)
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The summary for people, grouped by check.
pub fn human(r: &Report, show_all: bool) -> String {
    let mut s = format!(
        "mkt ci job {}: {} {:?} ({} in {})\n",
        r.job,
        short(&r.commit),
        r.subject,
        r.project,
        r.source
    );
    if !r.dirs.is_empty() {
        s += &format!("  analysed: {}\n", r.dirs.join(" "));
    }
    if !r.kernel_config.is_empty() {
        s += &format!("  kernel config: {}\n", r.kernel_config);
    }
    for n in &r.notes {
        s += &format!("  note: {n}\n");
    }
    for c in &r.checks {
        match c.status {
            Status::Disabled => s += &format!("{}: disabled ({})\n", c.name, c.reason),
            Status::NotRun => s += &format!("{}: NOT RUN ({})\n", c.name, c.reason),
            Status::Ran => {
                let pre = if c.preexisting > 0 && !show_all {
                    format!("; {} pre-existing not shown (--show-all)", c.preexisting)
                } else if c.preexisting > 0 {
                    format!("; {} pre-existing", c.preexisting)
                } else {
                    String::new()
                };
                let head = if c.new.is_empty() {
                    "nothing new".to_string()
                } else {
                    format!("{} new", c.new.len())
                };
                s += &format!("{}: {head}{pre} ({:.1}s)\n", c.name, c.seconds);
                for f in &c.new {
                    s += &format!("  NEW {}\n", f.one_line());
                    for d in &f.detail {
                        s += &format!("        {d}\n");
                    }
                }
                if show_all {
                    for f in c.all.iter().filter(|f| !c.new.contains(f)) {
                        s += &format!("  old {}\n", f.one_line());
                    }
                }
            }
        }
    }
    let new: usize = r.checks.iter().map(|c| c.new.len()).sum();
    let not_run: Vec<&str> = r
        .checks
        .iter()
        .filter(|c| c.status == Status::NotRun)
        .map(|c| c.name.as_str())
        .collect();
    let mut verdict = match new {
        0 => "no new findings".to_string(),
        1 => "1 new finding".to_string(),
        n => format!("{n} new findings"),
    };
    if !not_run.is_empty() {
        verdict += &format!("; not run: {}", not_run.join(", "));
    }
    s += &format!("result: {verdict} (exit {}, {:.0}s)\n", r.exit, r.seconds);
    s
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// JUnit XML: one test case per check; new findings are a failure, a check
/// that could not run an error, a disabled one skipped.
pub fn junit(r: &Report) -> String {
    let failures = r.checks.iter().filter(|c| !c.new.is_empty()).count();
    let errors = r
        .checks
        .iter()
        .filter(|c| c.status == Status::NotRun)
        .count();
    let skipped = r
        .checks
        .iter()
        .filter(|c| c.status == Status::Disabled)
        .count();
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    s += &format!(
        "<testsuite name=\"mkt-ci {}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{:.1}\">\n",
        xml_escape(short(&r.commit)),
        r.checks.len(),
        r.seconds
    );
    for c in &r.checks {
        s += &format!(
            "  <testcase classname=\"mkt-ci\" name=\"{}\" time=\"{:.1}\">\n",
            xml_escape(&c.name),
            c.seconds
        );
        match c.status {
            Status::Disabled => {
                s += &format!("    <skipped message=\"{}\"/>\n", xml_escape(&c.reason))
            }
            Status::NotRun => {
                s += &format!(
                    "    <error type=\"not-run\" message=\"not run: {}\"/>\n",
                    xml_escape(&c.reason)
                )
            }
            Status::Ran if !c.new.is_empty() => {
                let body: Vec<String> = c.new.iter().map(Finding::one_line).collect();
                s += &format!(
                    "    <failure type=\"new-findings\" message=\"{} new\">{}</failure>\n",
                    c.new.len(),
                    xml_escape(&body.join("\n"))
                );
            }
            Status::Ran => {}
        }
        s += "  </testcase>\n";
    }
    s += "</testsuite>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding() -> Finding {
        Finding {
            file: "a.c".into(),
            line: 3,
            severity: "warning".into(),
            kind: String::new(),
            message: "x < y & \"z\"".into(),
            detail: vec![],
        }
    }

    fn report() -> Report {
        let mut sparse = CheckResult::not_run("smatch", "smatch is not installed in the rootfs");
        sparse.name = "smatch".into();
        let mut warn = CheckResult::disabled("warnings", "");
        warn.status = Status::Ran;
        warn.new = vec![finding()];
        warn.preexisting = 2;
        Report {
            job: 7,
            project: "linux 6.1".into(),
            source: "/src/linux".into(),
            rev: "HEAD".into(),
            commit: "0123456789abcdef0123".into(),
            parent: None,
            subject: "net: x".into(),
            files: vec!["a.c".into()],
            dirs: vec!["drivers/net".into()],
            kernel_config: String::new(),
            notes: vec![],
            checks: vec![CheckResult::disabled("clang", "--no-clang"), sparse, warn],
            seconds: 12.0,
            exit: 3,
        }
    }

    #[test]
    fn exit_codes() {
        let r = report();
        assert_eq!(exit_code(&r.checks), 3);
        assert_eq!(exit_code(&r.checks[..1]), 0);
        assert_eq!(exit_code(&r.checks[..2]), 2);
        assert_eq!(exit_code(&r.checks[2..]), 1);
    }

    #[test]
    fn human_names_not_run_checks_and_hides_old_findings() {
        let h = human(&report(), false);
        assert!(
            h.contains("smatch: NOT RUN (smatch is not installed"),
            "{h}"
        );
        assert!(h.contains("clang: disabled (--no-clang)"), "{h}");
        assert!(
            h.contains("warnings: 1 new; 2 pre-existing not shown"),
            "{h}"
        );
        assert!(h.contains("  NEW a.c:3: warning: x < y"), "{h}");
        assert!(
            h.contains("result: 1 new finding; not run: smatch (exit 3"),
            "{h}"
        );
    }

    #[test]
    fn junit_is_escaped_and_classified() {
        let j = junit(&report());
        assert!(
            j.contains("failures=\"1\" errors=\"1\" skipped=\"1\""),
            "{j}"
        );
        assert!(j.contains("x &lt; y &amp; &quot;z&quot;"), "{j}");
        assert!(j.contains("<error type=\"not-run\""), "{j}");
    }
}
