//! The protocol between mkt and its guest init: the plan, one operation a
//! line of tab-separated, escaped fields, which the host encodes
//! ([`super::generate`]) and the init decodes; and the lines the init
//! sends back (the command's exit status, whether sshd listens).
//! Std only: the init (src/guest/init/, built by rustc alone) includes this
//! file by `#[path]`.

use std::fmt;

/// How a host directory reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    NineP,
    Virtiofs,
}

impl FsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::NineP => "9p",
            FsKind::Virtiofs => "virtiofs",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [FsKind::NineP, FsKind::Virtiofs]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// `--fs`'s value.
impl std::str::FromStr for FsKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FsKind::parse(s).ok_or_else(|| format!("{s:?} is neither 9p nor virtiofs"))
    }
}

/// What the init ends with: the command, a login shell, or systemd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Exec,
    Shell,
    Systemd,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exec => "exec",
            Mode::Shell => "shell",
            Mode::Systemd => "systemd",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Mode::Exec, Mode::Shell, Mode::Systemd]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// The user the command, shell and boot script run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// The host terminal mkt runs in: TERM and its size (0: unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminal {
    pub term: String,
    pub rows: u16,
    pub cols: u16,
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Mode(Mode),
    /// The rootfs share, mounted read-only under a tmpfs overlay.
    Root {
        kind: FsKind,
        tag: String,
    },
    User(User),
    Hostname(String),
    /// A host directory mounted at `path` in the new root.
    Share {
        tag: String,
        path: String,
        readonly: bool,
        kind: FsKind,
    },
    Symlink {
        target: String,
        link: String,
    },
    /// /mkt/`name` copied to `dest` with this mode (octal) and owner.
    File {
        name: String,
        dest: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// The boot script, run as the user before the command or shell.
    Boot(String),
    /// The host terminal, for shell mode's console.
    Term(Terminal),
    /// Where the init copies itself (`mkt modules-reload` in the guest).
    InstallSelf(String),
    /// The command's working directory (exec mode).
    Cwd(String),
    /// The tree's sshd, which the init starts (shell mode).
    Sshd(String),
    /// Configure `dev` by DHCP, giving up after `timeout` seconds.
    Dhcp {
        dev: String,
        host: String,
        timeout: u32,
    },
    /// A fixed address and default route (QEMU's NAT).
    Net {
        dev: String,
        addr: String,
        mask: String,
        gateway: String,
    },
    /// A script the init runs as root before the mode starts.
    Setup(String),
    /// The command of exec mode, argv.
    Exec(Vec<String>),
}

/// The plan's first line.
pub const HEADER: &str = "# mkt guest plan: one operation a line, tab-separated\n";

impl Op {
    /// The line's fields, unescaped: the kind, then its arguments.
    pub fn fields(&self) -> Vec<String> {
        let s = |v: &[&str]| v.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        match self {
            Op::Mode(m) => s(&["mode", m.as_str()]),
            Op::Root { kind, tag } => s(&["root", kind.as_str(), tag]),
            Op::User(u) => s(&[
                "user",
                &u.name,
                &u.uid.to_string(),
                &u.gid.to_string(),
                &u.home,
            ]),
            Op::Hostname(h) => s(&["hostname", h]),
            Op::Share {
                tag,
                path,
                readonly,
                kind,
            } => {
                let rw = if *readonly { "ro" } else { "rw" };
                s(&["share", tag, path, rw, kind.as_str()])
            }
            Op::Symlink { target, link } => s(&["symlink", target, link]),
            Op::File {
                name,
                dest,
                mode,
                uid,
                gid,
            } => s(&[
                "file",
                name,
                dest,
                &format!("{mode:o}"),
                &uid.to_string(),
                &gid.to_string(),
            ]),
            Op::Boot(p) => s(&["boot", p]),
            Op::Term(t) => s(&["term", &t.term, &t.rows.to_string(), &t.cols.to_string()]),
            Op::InstallSelf(p) => s(&["install-self", p]),
            Op::Cwd(p) => s(&["cwd", p]),
            Op::Sshd(p) => s(&["sshd", p]),
            Op::Dhcp { dev, host, timeout } => s(&["dhcp", dev, host, &timeout.to_string()]),
            Op::Net {
                dev,
                addr,
                mask,
                gateway,
            } => s(&["net", dev, addr, mask, gateway]),
            Op::Setup(p) => s(&["setup", p]),
            Op::Exec(argv) => std::iter::once("exec".to_string())
                .chain(argv.iter().cloned())
                .collect(),
        }
    }

    /// The plan line, newline included.
    pub fn encode(&self) -> String {
        let mut line = self
            .fields()
            .iter()
            .map(|f| escape(f))
            .collect::<Vec<_>>()
            .join("\t");
        line.push('\n');
        line
    }

    /// The operation of one plan line; None for a blank or comment line.
    pub fn decode(line: &str) -> Result<Option<Op>, DecodeError> {
        if line.is_empty() || line.starts_with('#') {
            return Ok(None);
        }
        let f: Vec<String> = line.split('\t').map(unescape).collect();
        let bad = || DecodeError(line.to_string());
        fn num<T: std::str::FromStr>(s: &str, line: &str) -> Result<T, DecodeError> {
            s.parse().map_err(|_| DecodeError(line.to_string()))
        }
        let fs = |s: &String| FsKind::parse(s).ok_or_else(bad);
        let o = |s: &String| s.clone();
        let op = match (f[0].as_str(), &f[1..]) {
            ("mode", [m]) => Op::Mode(Mode::parse(m).ok_or_else(bad)?),
            ("root", [kind, tag]) => Op::Root {
                kind: fs(kind)?,
                tag: o(tag),
            },
            ("user", [name, uid, gid, home]) => Op::User(User {
                name: o(name),
                uid: num(uid, line)?,
                gid: num(gid, line)?,
                home: o(home),
            }),
            ("hostname", [h]) => Op::Hostname(o(h)),
            ("share", [tag, path, rw, kind]) => Op::Share {
                tag: o(tag),
                path: o(path),
                readonly: match rw.as_str() {
                    "ro" => true,
                    "rw" => false,
                    _ => return Err(bad()),
                },
                kind: fs(kind)?,
            },
            ("symlink", [target, link]) => Op::Symlink {
                target: o(target),
                link: o(link),
            },
            ("file", [name, dest, mode, uid, gid]) => Op::File {
                name: o(name),
                dest: o(dest),
                mode: u32::from_str_radix(mode, 8).map_err(|_| bad())?,
                uid: num(uid, line)?,
                gid: num(gid, line)?,
            },
            ("boot", [p]) => Op::Boot(o(p)),
            ("term", [term, rows, cols]) => Op::Term(Terminal {
                term: o(term),
                rows: num(rows, line)?,
                cols: num(cols, line)?,
            }),
            ("install-self", [p]) => Op::InstallSelf(o(p)),
            ("cwd", [p]) => Op::Cwd(o(p)),
            ("sshd", [p]) => Op::Sshd(o(p)),
            ("dhcp", [dev, host, timeout]) => Op::Dhcp {
                dev: o(dev),
                host: o(host),
                timeout: num(timeout, line)?,
            },
            ("net", [dev, addr, mask, gateway]) => Op::Net {
                dev: o(dev),
                addr: o(addr),
                mask: o(mask),
                gateway: o(gateway),
            },
            ("setup", [p]) => Op::Setup(o(p)),
            ("exec", argv) => Op::Exec(argv.to_vec()),
            _ => return Err(bad()),
        };
        Ok(Some(op))
    }
}

/// The whole plan: the header, then one line an operation.
pub fn encode(ops: &[Op]) -> String {
    std::iter::once(HEADER.to_string())
        .chain(ops.iter().map(Op::encode))
        .collect()
}

/// Every operation of a plan, in order.
pub fn decode(text: &str) -> Result<Vec<Op>, DecodeError> {
    text.lines()
        .filter_map(|l| Op::decode(l).transpose())
        .collect()
}

/// What the init says on the status port once the command ended: its
/// exit status (exec mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit(pub i32);

impl Exit {
    pub fn encode(self) -> String {
        format!("EXIT {}\n", self.0)
    }

    /// The status in what the port carried: its first `EXIT` line.
    pub fn decode(text: &str) -> Option<Exit> {
        let code = text.lines().find_map(|l| l.strip_prefix("EXIT "))?;
        code.trim().parse().ok().map(Exit)
    }
}

/// What the guest says on the ready port about its sshd, once it listens
/// or once the init gave up waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshdReport {
    Ready,
    /// Why not.
    Failed(String),
}

impl SshdReport {
    /// The line, without its newline.
    pub fn encode(&self) -> String {
        match self {
            SshdReport::Ready => "sshd ready".into(),
            SshdReport::Failed(why) => format!("sshd failed: {why}"),
        }
    }

    pub fn decode(line: &str) -> Option<SshdReport> {
        match line.strip_prefix("sshd failed: ") {
            Some(why) => Some(SshdReport::Failed(why.into())),
            None => (line == "sshd ready").then_some(SshdReport::Ready),
        }
    }
}

/// A plan line that is no operation (unknown, or fields missing or wrong).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad plan line {:?}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Escapes a plan field: tab, newline and backslash.
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

/// Undoes [`escape`].
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(ch) = it.next() {
        if ch == '\\' {
            match it.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => out.push('\\'),
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// The virtio-serial port on which the guest says whether its sshd listens.
pub const READY_PORT: &str = "mkt.ready";

/// The virtio-serial port that carries the host terminal's size.
pub const WINSIZE_PORT: &str = "mkt.winsize";

#[cfg(test)]
mod tests {
    use super::*;

    /// One of every operation, with the characters escaping must keep.
    fn every_op() -> Vec<Op> {
        let odd = "a\tb\nc\\d \\t";
        vec![
            Op::Mode(Mode::Exec),
            Op::Mode(Mode::Shell),
            Op::Mode(Mode::Systemd),
            Op::Root {
                kind: FsKind::Virtiofs,
                tag: "root".into(),
            },
            Op::User(User {
                name: "dev".into(),
                uid: 1000,
                gid: 1001,
                home: odd.into(),
            }),
            Op::Hostname(String::new()),
            Op::Share {
                tag: "m0".into(),
                path: odd.into(),
                readonly: true,
                kind: FsKind::NineP,
            },
            Op::Share {
                tag: "m1".into(),
                path: "/x".into(),
                readonly: false,
                kind: FsKind::Virtiofs,
            },
            Op::Symlink {
                target: "/dev/null".into(),
                link: odd.into(),
            },
            Op::File {
                name: "shadow".into(),
                dest: "/etc/shadow".into(),
                mode: 0o640,
                uid: 0,
                gid: 42,
            },
            Op::Boot("/etc/mkt/boot-script".into()),
            Op::Term(Terminal {
                term: "xterm".into(),
                rows: 50,
                cols: 132,
            }),
            Op::InstallSelf("/usr/local/bin/mkt".into()),
            Op::Cwd(odd.into()),
            Op::Sshd("/usr/sbin/sshd".into()),
            Op::Dhcp {
                dev: "eth0".into(),
                host: "cx5".into(),
                timeout: 30,
            },
            Op::Net {
                dev: "eth0".into(),
                addr: "10.0.2.15".into(),
                mask: "255.255.255.0".into(),
                gateway: String::new(),
            },
            Op::Setup("/run/mkt/setup.sh".into()),
            Op::Exec(vec![]),
            Op::Exec(vec![String::new()]),
            Op::Exec(vec!["sh".into(), "-c".into(), odd.into()]),
        ]
    }

    #[test]
    fn every_operation_round_trips() {
        let ops = every_op();
        let text = encode(&ops);
        assert!(text.starts_with(HEADER));
        // One line each: no field's tab or newline leaks.
        assert_eq!(text.lines().count(), ops.len() + 1, "{text}");
        assert_eq!(decode(&text).unwrap(), ops);
        for op in &ops {
            assert_eq!(
                Op::decode(op.encode().trim_end_matches('\n')),
                Ok(Some(op.clone()))
            );
        }
    }

    #[test]
    fn lines_are_the_documented_fields() {
        let f = Op::File {
            name: "passwd".into(),
            dest: "/etc/passwd".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        assert_eq!(f.encode(), "file\tpasswd\t/etc/passwd\t644\t0\t0\n");
        let e = Op::Exec(vec!["sh".into(), "-c".into(), "echo a\tb".into()]);
        assert_eq!(e.encode(), "exec\tsh\t-c\techo a\\tb\n");
    }

    #[test]
    fn bad_lines_are_refused_and_comments_skipped() {
        for line in [
            "mkdir\t/x\t755",
            "mode\tcontainer",
            "root\text4\troot",
            "user\tdev\tx\t1\t/h",
            "file\tp\t/etc/p\t9\t0\t0",
            "share\tm0\t/h\tmaybe\t9p",
            "hostname",
            "cwd\t/a\t/b",
            "term\txterm\t-1\t80",
        ] {
            assert_eq!(Op::decode(line), Err(DecodeError(line.into())), "{line}");
        }
        assert_eq!(
            decode("# c\n\nhostname\th\n").unwrap(),
            [Op::Hostname("h".into())]
        );
        assert!(
            decode("hostname\th\nbogus\n")
                .unwrap_err()
                .to_string()
                .contains("\"bogus\"")
        );
    }

    #[test]
    fn exit_and_sshd_reports_round_trip() {
        for code in [0, 1, 127, 137, 255, -1] {
            assert_eq!(Exit::decode(&Exit(code).encode()), Some(Exit(code)));
        }
        assert_eq!(Exit(3).encode(), "EXIT 3\n");
        assert_eq!(Exit::decode("noise\nEXIT 4 \nEXIT 5\n"), Some(Exit(4)));
        assert_eq!(Exit::decode("EXIT x\nEXIT 5\n"), None);
        assert_eq!(Exit::decode(""), None);
        for r in [
            SshdReport::Ready,
            SshdReport::Failed("nothing listens".into()),
        ] {
            assert_eq!(SshdReport::decode(&r.encode()), Some(r));
        }
        assert_eq!(SshdReport::Ready.encode(), "sshd ready");
        assert_eq!(SshdReport::decode("sshd readyish"), None);
    }

    #[test]
    fn escape_round_trips_special_characters() {
        assert_eq!(escape("a\tb\nc\\d"), "a\\tb\\nc\\\\d");
        for s in ["", "\\", "\\t", "a\\", "\t\n\\\\n"] {
            assert_eq!(unescape(&escape(s)), s);
        }
    }
}
