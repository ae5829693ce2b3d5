//! QEMU profiles: the machine type, device bus and kernel words that differ
//! between kinds of guest (plain PC, microvm, IOMMU testing).
//!
//! The built-in profiles live in `qemu-profiles/*.toml` and are compiled in,
//! so the binary works from any directory. A file `<user_dir>/<name>.toml`
//! overrides the built-in profile of the same name, or adds a new one.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The profile used when none is asked for.
pub const DEFAULT_PROFILE: &str = "default";

/// Built-in profiles, `(name, TOML text)`, sorted by name.
const BUILTIN: &[(&str, &str)] = &[
    ("debug", include_str!("../../../qemu-profiles/debug.toml")),
    (
        "default",
        include_str!("../../../qemu-profiles/default.toml"),
    ),
    ("iommu", include_str!("../../../qemu-profiles/iommu.toml")),
    (
        "microvm",
        include_str!("../../../qemu-profiles/microvm.toml"),
    ),
];

/// How virtio devices attach to the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    /// `virtio-*-pci` devices.
    Pci,
    /// `virtio-*-device` (virtio-mmio), for machines without PCI such as microvm.
    Mmio,
}

impl Bus {
    /// The QEMU device name for a virtio device on this bus:
    /// `virtio("virtio-9p")` is `virtio-9p-pci` or `virtio-9p-device`.
    pub fn virtio(self, base: &str) -> String {
        match self {
            Bus::Pci => format!("{base}-pci"),
            Bus::Mmio => format!("{base}-device"),
        }
    }
}

/// One QEMU profile. See `qemu-profiles/default.toml` for the file format.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The name it was loaded under (not part of the file).
    #[serde(skip)]
    pub name: String,
    /// The file it was loaded from; `None` for a built-in profile.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    pub description: String,
    /// The `-machine` value, without `accel=` (mkt adds `-accel`).
    pub machine: String,
    pub bus: Bus,
    /// The `-cpu` model under TCG; KVM always uses `host`.
    #[serde(default = "default_cpu")]
    pub cpu: String,
    /// Extra kernel command-line words.
    #[serde(default)]
    pub append: Vec<String>,
    /// Extra raw QEMU arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

fn default_cpu() -> String {
    "max".to_owned()
}

/// Why a profile could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("invalid QEMU profile name {name:?}: use letters, digits, '-', '_' and '.'")]
    InvalidName { name: String },

    #[error("unknown QEMU profile `{name}`; known profiles: {}", .known.join(", "))]
    Unknown { name: String, known: Vec<String> },

    #[error("cannot read QEMU profile {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("invalid QEMU profile {}", origin(.name, .path.as_deref()))]
    Parse {
        name: String,
        path: Option<PathBuf>,
        // Boxed: toml's error is large and would bloat every Result.
        #[source]
        source: Box<toml::de::Error>,
    },

    #[error("invalid QEMU profile {}: {reason}", origin(.name, .path.as_deref()))]
    Invalid {
        name: String,
        path: Option<PathBuf>,
        reason: String,
    },
}

fn origin(name: &str, path: Option<&Path>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None => format!("`{name}` (built in)"),
    }
}

impl Profile {
    /// Loads profile `name`: `<user_dir>/<name>.toml` if it exists, else the
    /// built-in profile of that name.
    pub fn load(name: &str, user_dir: Option<&Path>) -> Result<Profile, ProfileError> {
        // Keeps `name` from escaping `user_dir` (`../x`, `/etc/x`).
        if !valid_name(name) {
            return Err(ProfileError::InvalidName {
                name: name.to_owned(),
            });
        }
        if let Some(dir) = user_dir {
            let path = dir.join(format!("{name}.toml"));
            match std::fs::read_to_string(&path) {
                Ok(text) => return Profile::parse(name, &text, Some(&path)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(ProfileError::Read { path, source }),
            }
        }
        match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((_, text)) => Profile::parse(name, text, None),
            None => Err(ProfileError::Unknown {
                name: name.to_owned(),
                known: known_names(user_dir),
            }),
        }
    }

    /// Parses profile text; `path` only names the file in errors.
    pub fn parse(name: &str, text: &str, path: Option<&Path>) -> Result<Profile, ProfileError> {
        let mut p: Profile = toml::from_str(text).map_err(|source| ProfileError::Parse {
            name: name.to_owned(),
            path: path.map(Path::to_owned),
            source: Box::new(source),
        })?;
        let invalid = |reason: &str| ProfileError::Invalid {
            name: name.to_owned(),
            path: path.map(Path::to_owned),
            reason: reason.to_owned(),
        };
        if p.machine.trim().is_empty() {
            return Err(invalid("`machine` is empty"));
        }
        // mkt passes -accel itself; a second accelerator would conflict.
        if p.machine.split(',').any(|o| o.starts_with("accel=")) {
            return Err(invalid(
                "`machine` must not set accel= (mkt chooses kvm or tcg)",
            ));
        }
        if p.cpu.trim().is_empty() {
            return Err(invalid("`cpu` is empty"));
        }
        p.name = name.to_owned();
        p.source = path.map(Path::to_owned);
        Ok(p)
    }
}

/// Names of the built-in profiles.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(n, _)| *n)
}

/// Built-in profile names plus `*.toml` in `user_dir`, sorted, no duplicates.
pub fn known_names(user_dir: Option<&Path>) -> Vec<String> {
    let mut names: Vec<String> = builtin_names().map(str::to_owned).collect();
    if let Some(entries) = user_dir.and_then(|d| std::fs::read_dir(d).ok()) {
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".toml")) else {
                continue;
            };
            if valid_name(stem) {
                names.push(stem.to_owned());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn every_builtin_profile_parses() {
        for name in builtin_names() {
            let p = Profile::load(name, None).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(p.name, name);
            assert_eq!(p.source, None);
            assert!(!p.description.is_empty(), "{name}");
        }
    }

    #[test]
    fn builtin_profiles_have_the_documented_values() {
        type Case = (
            &'static str,
            &'static str,
            Bus,
            &'static [&'static str],
            &'static [&'static str],
        );
        let cases: &[Case] = &[
            (
                "default",
                "q35",
                Bus::Pci,
                &["i8042.noaux", "8250.nr_uarts=1"],
                &[],
            ),
            (
                "debug",
                "q35",
                Bus::Pci,
                &[
                    "i8042.noaux",
                    "8250.nr_uarts=1",
                    "panic_on_warn=1",
                    "ignore_loglevel",
                    "earlyprintk=serial,ttyS0,115200",
                ],
                &[],
            ),
            (
                "microvm",
                "microvm,isa-serial=on,rtc=on",
                Bus::Mmio,
                &["i8042.noaux"],
                &[],
            ),
            (
                "iommu",
                "q35,kernel-irqchip=split",
                Bus::Pci,
                &["intel_iommu=on", "iommu=pt"],
                &["-device", "intel-iommu,intremap=on,caching-mode=on"],
            ),
        ];
        assert_eq!(cases.len(), builtin_names().count(), "a case per profile");
        for &(name, machine, bus, append, args) in cases {
            let p = Profile::load(name, None).unwrap();
            assert_eq!(p.machine, machine, "{name}");
            assert_eq!(p.bus, bus, "{name}");
            assert_eq!(p.cpu, "max", "{name}");
            assert_eq!(p.append, append, "{name}");
            assert_eq!(p.args, args, "{name}");
        }
    }

    #[test]
    fn unknown_name_lists_known_profiles() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.toml"), "").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "").unwrap();
        let err = Profile::load("nope", Some(dir.path())).unwrap_err();
        match &err {
            ProfileError::Unknown { name, known } => {
                assert_eq!(name, "nope");
                assert_eq!(known, &["debug", "default", "iommu", "microvm", "mine"]);
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "unknown QEMU profile `nope`; known profiles: debug, default, iommu, microvm, mine"
        );
    }

    #[test]
    fn user_profile_overrides_builtin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("default.toml");
        std::fs::write(
            &path,
            "description = \"mine\"\nmachine = \"q35\"\nbus = \"pci\"\n",
        )
        .unwrap();
        let p = Profile::load("default", Some(dir.path())).unwrap();
        assert_eq!(p.description, "mine");
        assert_eq!(p.machine, "q35");
        assert_eq!(p.cpu, "max");
        assert!(p.append.is_empty() && p.args.is_empty());
        assert_eq!(p.source.as_deref(), Some(path.as_path()));
        // Other built-ins are still found when the user dir lacks them.
        assert_eq!(
            Profile::load("microvm", Some(dir.path())).unwrap().bus,
            Bus::Mmio
        );
    }

    #[test]
    fn bad_user_profile_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "typo",
                "description = \"x\"\nmachine = \"pc\"\nbus = \"pci\"\nmachin = \"q35\"\n",
            ),
            (
                "badbus",
                "description = \"x\"\nmachine = \"pc\"\nbus = \"isa\"\n",
            ),
            ("missing", "description = \"x\"\nbus = \"pci\"\n"),
            ("syntax", "description = \n"),
        ];
        for (name, text) in cases {
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(&path, text).unwrap();
            let err = Profile::load(name, Some(dir.path())).unwrap_err();
            assert!(matches!(err, ProfileError::Parse { .. }), "{name}: {err:?}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{name}: {err}"
            );
            assert!(err.source().is_some(), "{name}: toml error kept as source");
        }
    }

    #[test]
    fn invalid_values_are_rejected() {
        let cases = [
            (
                "description = \"x\"\nmachine = \"\"\nbus = \"pci\"\n",
                "`machine` is empty",
            ),
            (
                "description = \"x\"\nmachine = \"pc,accel=kvm\"\nbus = \"pci\"\n",
                "accel=",
            ),
            (
                "description = \"x\"\nmachine = \"pc\"\nbus = \"pci\"\ncpu = \" \"\n",
                "`cpu` is empty",
            ),
        ];
        for (text, want) in cases {
            let err = Profile::parse("x", text, Some(Path::new("/p/x.toml"))).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("invalid QEMU profile /p/x.toml: "), "{msg}");
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn unreadable_user_profile_is_an_error_not_a_fallback() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails with EISDIR.
        std::fs::create_dir(dir.path().join("default.toml")).unwrap();
        let err = Profile::load("default", Some(dir.path())).unwrap_err();
        assert!(matches!(err, ProfileError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("default.toml"));
    }

    #[test]
    fn names_cannot_escape_the_user_dir() {
        for name in ["", "../default", "/etc/passwd", ".hidden", "a b"] {
            let err = Profile::load(name, None).unwrap_err();
            assert!(
                matches!(err, ProfileError::InvalidName { .. }),
                "{name:?}: {err:?}"
            );
        }
    }

    #[test]
    fn builtin_parse_error_names_the_profile() {
        let err = Profile::parse("default", "bus = 1", None).unwrap_err();
        assert!(err.to_string().contains("`default` (built in)"), "{err}");
    }

    #[test]
    fn bus_picks_the_virtio_transport() {
        assert_eq!(Bus::Pci.virtio("virtio-net"), "virtio-net-pci");
        assert_eq!(Bus::Mmio.virtio("virtio-net"), "virtio-net-device");
    }
}
