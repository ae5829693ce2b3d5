//! What a source tree is, and the commands that build it.

use std::fs;
use std::path::Path;

use super::env::make_argv;
use super::{BuildError, MKT_DIR};

/// What a source tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Project {
    /// A Linux kernel tree, with its Makefile version (e.g. `6.1.192`).
    Kernel {
        version: String,
    },
    RdmaCore,
    Iproute2,
    Qemu,
}

impl Project {
    /// The name used in logs and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Project::Kernel { .. } => "linux",
            Project::RdmaCore => "rdma-core",
            Project::Iproute2 => "iproute2",
            Project::Qemu => "qemu",
        }
    }

    /// `linux 6.1.192`, `iproute2`, ...
    pub fn describe(&self) -> String {
        match self {
            Project::Kernel { version } => format!("linux {version}"),
            p => p.name().to_string(),
        }
    }
}

/// The PROJECT argument's accepted names.
pub const PROJECT_NAMES: [&str; 6] = ["kernel", "linux", "rdma-core", "iproute2", "qemu", "custom"];

fn is_file(p: &Path) -> bool {
    p.is_file()
}

/// Recognises the tree in `dir`, or says what was looked for.
pub fn discover(dir: &Path) -> Result<Project, BuildError> {
    let f = |n: &str| dir.join(n);
    if is_file(&f("Kbuild"))
        && f("arch").is_dir()
        && let Some(version) = fs::read_to_string(f("Makefile"))
            .ok()
            .and_then(|mk| kernel_version(&mk))
    {
        return Ok(Project::Kernel { version });
    }
    if let Ok(cm) = fs::read_to_string(f("CMakeLists.txt")) {
        let cm = cm.to_ascii_lowercase().replace(' ', "");
        if cm.contains("project(rdma-core") {
            return Ok(Project::RdmaCore);
        }
    }
    if is_file(&f("configure")) && is_file(&f("meson.build")) && is_file(&f("qemu-options.hx")) {
        return Ok(Project::Qemu);
    }
    if is_file(&f("configure")) && f("ip").is_dir() {
        return Ok(Project::Iproute2);
    }
    Err(BuildError::NotAProject(dir.to_path_buf()))
}

/// `6.1.192` from the kernel Makefile's VERSION, PATCHLEVEL, SUBLEVEL and
/// EXTRAVERSION; `None` without VERSION and PATCHLEVEL.
pub fn kernel_version(makefile: &str) -> Option<String> {
    let var = |name: &str| {
        makefile.lines().take(20).find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let (v, p) = (var("VERSION")?, var("PATCHLEVEL")?);
    let mut s = format!("{v}.{p}");
    if let Some(sub) = var("SUBLEVEL").filter(|s| !s.is_empty()) {
        s = format!("{s}.{sub}");
    }
    if let Some(extra) = var("EXTRAVERSION") {
        s.push_str(&extra);
    }
    Some(s)
}

/// One command run inside the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step(pub Vec<String>);

impl Step {
    fn new<S: AsRef<str>>(argv: &[S]) -> Step {
        Step(argv.iter().map(|s| s.as_ref().to_string()).collect())
    }
}

/// What the steps depend on besides the project.
#[derive(Debug, Clone, Default)]
pub struct StepInput {
    pub jobs: u32,
    pub clean: bool,
    /// Generate the VM kernel config first.
    pub kconfig: bool,
    /// Kernel: `.config` is newer than `include/config/auto.conf`.
    pub olddefconfig: bool,
    /// The build system was configured already (iproute2 config.mk,
    /// rdma-core/QEMU build/build.ninja).
    pub configured: bool,
    /// `-- ARGS`: given to make (or ninja).
    pub args: Vec<String>,
}

/// The commands that build `project`; pure.
pub fn steps(project: &Project, i: &StepInput) -> Vec<Step> {
    let j = format!("-j{}", i.jobs);
    let make = |extra: &[&str]| Step(make_argv(extra));
    let mut s = Vec::new();
    match project {
        Project::Kernel { .. } => {
            if i.clean {
                s.push(make(&["clean"]));
            }
            if i.kconfig {
                s.push(make(&["tinyconfig"]));
                s.push(Step::new(&[
                    "scripts/kconfig/merge_config.sh",
                    "-m",
                    ".config",
                    "kernel/configs/kvm_guest.config",
                    &format!("{MKT_DIR}/vm.config"),
                ]));
                s.push(make(&["olddefconfig"]));
            } else if i.olddefconfig {
                s.push(make(&["olddefconfig"]));
            }
            let mut m = make(&[&j]);
            m.0.extend(i.args.iter().cloned());
            s.push(m);
        }
        Project::Iproute2 => {
            if i.clean {
                s.push(make(&["clean"]));
            }
            if !i.configured {
                s.push(Step::new(&["./configure"]));
            }
            let mut m = make(&[&j]);
            m.0.extend(i.args.iter().cloned());
            s.push(m);
        }
        Project::RdmaCore | Project::Qemu => {
            if i.clean {
                s.push(Step::new(&["rm", "-rf", "build"]));
            }
            if i.clean || !i.configured {
                s.push(if *project == Project::Qemu {
                    Step::new(&[
                        "./configure",
                        &format!("--target-list={}", crate::arch::HOST.qemu_target),
                    ])
                } else {
                    // build.sh runs cmake and a first ninja.
                    Step::new(&["./build.sh"])
                });
            }
            let mut n = Step::new(&["ninja", "-C", "build", &j]);
            n.0.extend(i.args.iter().cloned());
            s.push(n);
        }
    }
    s
}

pub(crate) fn check_wanted(want: &str, dir: &Path, found: &Project) -> Result<(), BuildError> {
    let ok = match want {
        "kernel" | "linux" => matches!(found, Project::Kernel { .. }),
        w => w == found.name(),
    };
    if ok {
        Ok(())
    } else {
        Err(BuildError::WrongProject {
            dir: dir.into(),
            want: want.into(),
            found: found.describe(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)], dirs: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in dirs {
            fs::create_dir_all(t.path().join(d)).unwrap();
        }
        for (f, text) in files {
            fs::write(t.path().join(f), text).unwrap();
        }
        t
    }

    #[test]
    fn discovery_table() {
        let mk = "# SPDX\nVERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION = -rc1\n";
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, &'a str)>,
            Vec<&'a str>,
            Option<Project>,
        );
        let cases: Vec<Case> = vec![
            (
                "kernel",
                vec![("Kbuild", ""), ("Makefile", mk)],
                vec!["arch"],
                Some(Project::Kernel {
                    version: "6.1.192-rc1".into(),
                }),
            ),
            (
                "kernel without arch/",
                vec![("Kbuild", ""), ("Makefile", mk)],
                vec![],
                None,
            ),
            (
                "rdma-core",
                vec![(
                    "CMakeLists.txt",
                    "cmake_minimum_required(VERSION 3)\nproject(rdma-core C)\n",
                )],
                vec![],
                Some(Project::RdmaCore),
            ),
            (
                "rdma-core, upper case",
                vec![("CMakeLists.txt", "PROJECT (RDMA-CORE C)\n")],
                vec![],
                Some(Project::RdmaCore),
            ),
            (
                "other cmake",
                vec![("CMakeLists.txt", "project(foo)\n")],
                vec![],
                None,
            ),
            (
                "iproute2",
                vec![("configure", "")],
                vec!["ip"],
                Some(Project::Iproute2),
            ),
            (
                "qemu",
                vec![
                    ("configure", ""),
                    ("meson.build", ""),
                    ("qemu-options.hx", ""),
                ],
                vec![],
                Some(Project::Qemu),
            ),
            ("empty", vec![], vec![], None),
        ];
        for (name, files, dirs, want) in cases {
            let t = tree(&files, &dirs);
            match (discover(t.path()), want) {
                (Ok(p), Some(w)) => assert_eq!(p, w, "{name}"),
                (Err(e), None) => {
                    let msg = e.to_string();
                    assert!(msg.contains("looked for a Linux kernel"), "{name}: {msg}");
                    assert!(msg.contains("rdma-core") && msg.contains("QEMU"), "{msg}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn kernel_steps() {
        let k = Project::Kernel {
            version: "6.1".into(),
        };
        let base = StepInput {
            jobs: 4,
            ..Default::default()
        };
        let argv = |s: Vec<Step>| s.into_iter().map(|s| s.0.join(" ")).collect::<Vec<_>>();
        assert_eq!(argv(steps(&k, &base)), ["make -j4"]);
        let fresh = StepInput {
            kconfig: true,
            args: vec!["W=1".into()],
            ..base.clone()
        };
        assert_eq!(
            argv(steps(&k, &fresh)),
            [
                "make tinyconfig",
                "scripts/kconfig/merge_config.sh -m .config kernel/configs/kvm_guest.config /tmp/.mkt/vm.config",
                "make olddefconfig",
                "make -j4 W=1",
            ]
        );
        let stale = StepInput {
            olddefconfig: true,
            clean: true,
            ..base.clone()
        };
        assert_eq!(
            argv(steps(&k, &stale)),
            ["make clean", "make olddefconfig", "make -j4"]
        );
        assert_eq!(
            argv(steps(&Project::Iproute2, &base)),
            ["./configure", "make -j4"]
        );
        let configured = StepInput {
            configured: true,
            ..base
        };
        assert_eq!(
            argv(steps(&Project::Qemu, &configured)),
            ["ninja -C build -j4"]
        );
        assert_eq!(
            argv(steps(&Project::RdmaCore, &StepInput::default())),
            ["./build.sh", "ninja -C build -j0"]
        );
    }
}
