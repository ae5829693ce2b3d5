//! mkt's configuration: the TOML rendering of Mellanox MKT's per-host INI
//! file (`[defaults]` plus any number of `[setup.NAME]` tables), its typed
//! values ([`values`]), and [`Paths`], where mkt keeps its files on this
//! host ([`paths`]).
//!
//! Parsing is pure (text, file name and HOME in, [`Config`] out) so every
//! error message can be tested without touching the real environment.

mod paths;
mod values;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub use paths::{Paths, expand_home};
pub use values::{Cpus, InitMode, MacAddr, MemSize, NetMode, PciAddr, SoftRdma};

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[defaults]`: source trees, shared paths and the default setup.
    #[serde(default)]
    pub defaults: Defaults,
    /// `[setup.NAME]` tables, by name.
    #[serde(default, rename = "setup", skip_serializing_if = "BTreeMap::is_empty")]
    pub setups: BTreeMap<String, Setup>,
    /// `[limits]`: size limits of `mkt rootfs pull`.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// Where the configuration was read from; `None` when no file existed.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// `[defaults]`: values used when a setup or the command line says nothing.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Directory holding the source trees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<PathBuf>,
    /// Kernel source tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// rdma-core source tree.
    #[serde(default, rename = "rdma-core", skip_serializing_if = "Option::is_none")]
    pub rdma_core: Option<PathBuf>,
    /// iproute2 source tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iproute2: Option<PathBuf>,
    /// Where logs go (overrides [`Paths::logs_dir`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<PathBuf>,
    /// ccache directory (overrides [`Paths::ccache_dir`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ccache: Option<PathBuf>,
    /// Root filesystem: a name under [`Paths::rootfs_dir`] or a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Name of the setup used when none is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<String>,
    /// Directories shared into every guest and build.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<PathBuf>,
}

/// `[setup.NAME]`: one machine/NIC combination to boot.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// Kernel source tree (overrides `defaults.kernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Root filesystem name or directory (overrides `defaults.rootfs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// PCI functions passed through, normalised to `DDDD:BB:DD.F`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci: Vec<PciAddr>,
    /// Script run inside the guest after boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_script: Option<PathBuf>,
    /// SR-IOV virtual functions to create per physical function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_of_vfs: Option<u32>,
    /// Number of ports of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_ports: Option<u32>,
    /// Test script or directory run by `mkt ci`/`mkt run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<PathBuf>,
    /// PCI functions handed on to a nested guest, normalised like `pci`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nested_pci: Vec<PciAddr>,
    /// Named guest profile (for example `iommu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Guest CPUs (at least one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    /// Guest memory such as `"2G"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<MemSize>,
    /// Guest network: `nat`, `none`, `tap`, `bridge` or `bridge=IFNAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetMode>,
    /// The guest NIC's MAC address on a bridge or tap [default: derived
    /// from the setup name].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Size of the NVMe scratch disk, such as `"1G"` (none when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<MemSize>,
    /// Soft RDMA devices made in the guest (MKT's "virt" devices):
    /// `rxe-IFNAME` (soft-RoCE) or `siw-IFNAME` (soft-iWARP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virt: Vec<SoftRdma>,
    /// Extra directories shared into this guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<PathBuf>,
}

/// `[limits]`: how big a pulled image may be, as sizes such as `"16G"`
/// (the syntax of `mem`); unset keys keep [`crate::oci::Limits`]' defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// A manifest or index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<MemSize>,
    /// An image config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<MemSize>,
    /// File content one layer may unpack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<MemSize>,
    /// File content all layers of an image may unpack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<MemSize>,
}

impl Limits {
    fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// The limits in bytes, the defaults where unset.
    pub fn bytes(&self) -> crate::oci::Limits {
        let mut l = crate::oci::Limits::default();
        for (bytes, size) in [
            (&mut l.manifest, self.manifest),
            (&mut l.config, self.config),
            (&mut l.layer, self.layer),
            (&mut l.image, self.image),
        ] {
            if let Some(m) = size {
                *bytes = m.mib().saturating_mul(1 << 20);
            }
        }
        l
    }
}

/// Why configuration or directory handling failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (including: it does not exist).
    #[error("cannot read config file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// TOML syntax error, unknown key, wrong type or bad setup name.
    /// `line` and `column` are 1-based; `key` is the bare key (or setup
    /// name) concerned, when known.
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Parse {
        path: PathBuf,
        line: u32,
        column: u32,
        key: Option<String>,
        message: String,
    },
    /// A well-typed value that mkt cannot use; `key` is the dotted TOML
    /// path, such as `setup.cx5-ib.pci`.
    #[error("{}: bad value {value:?} for key `{key}`: {reason}", location(.path, .line, .column))]
    BadValue {
        path: PathBuf,
        line: Option<u32>,
        column: Option<u32>,
        key: String,
        value: String,
        reason: String,
    },
    /// Without an absolute HOME there is nowhere to put config and data.
    #[error("cannot locate mkt's directories: HOME is unset or not an absolute path")]
    NoHome,
    /// Creating, inspecting or chmod-ing the runtime directory failed.
    #[error("cannot {action} runtime directory {}", .path.display())]
    RuntimeDir {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// The runtime directory exists but someone else could tamper with it.
    #[error("refusing to use runtime directory {}: {reason}", .path.display())]
    UnsafeRuntimeDir { path: PathBuf, reason: String },
}

fn location(path: &Path, line: &Option<u32>, column: &Option<u32>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}", path.display()),
        _ => path.display().to_string(),
    }
}

impl Config {
    /// Parses `text` (read from `file`, used in messages and stored in
    /// [`Config::file`]), validates it and expands `~`/`$HOME` with `home`.
    pub fn parse(text: &str, file: &Path, home: &Path) -> Result<Config, ConfigError> {
        let doc = Doc { text, path: file };
        // A schema-free parse keeps the span of every key and value, which
        // serde's typed result does not; errors are located with it.
        let tree = DeTable::parse(text).map_err(|e| doc.toml_error(&e, None))?;
        let tree = tree.get_ref();
        Config::check_tables(&doc, tree)?;
        let mut cfg: Config = toml::from_str(text).map_err(|e| doc.toml_error(&e, Some(tree)))?;
        cfg.validate(&doc, tree)?;
        cfg.expand(home);
        cfg.file = Some(file.to_path_buf());
        Ok(cfg)
    }

    /// Reads and parses `file`; a missing file is an error.
    pub fn load(file: &Path, home: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(file).map_err(|source| ConfigError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        Config::parse(&text, file, home)
    }

    /// Like [`Config::load`], but a missing file gives the default config
    /// (with `file` None): mkt works without any configuration.
    pub fn load_optional(file: &Path, home: &Path) -> Result<Config, ConfigError> {
        match fs::read_to_string(file) {
            Ok(text) => Config::parse(&text, file, home),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: file.to_path_buf(),
                source,
            }),
        }
    }

    /// `[defaults]`, `[limits]`, `[setup]` and each `[setup.NAME]` must be
    /// tables: serde would fill a struct from an array, field by field.
    fn check_tables(doc: &Doc, tree: &DeTable) -> Result<(), ConfigError> {
        let tables = ["defaults", "setup", "limits"];
        let top = tree.iter().map(|(k, v)| ("at top level", k, v));
        let top = top.filter(|(_, k, _)| tables.contains(&k.get_ref().as_ref()));
        let setups = tree.get("setup").and_then(|s| s.get_ref().as_table());
        let each = setups.into_iter().flat_map(|t| t.iter());
        let mut all = top.chain(each.map(|(k, v)| ("in [setup]", k, v)));
        match all.find(|(_, _, v)| v.get_ref().as_array().is_some()) {
            Some((context, key, v)) => Err(doc.parse_error(
                Some(v.span()),
                Some(key.get_ref().to_string()),
                format!("wrong type for key `{key}` {context}: expected a table, not an array"),
            )),
            None => Ok(()),
        }
    }

    /// What serde cannot check: setup names and that the default setup exists.
    fn validate(&self, doc: &Doc, tree: &DeTable) -> Result<(), ConfigError> {
        let setup_table = lookup(tree, &["setup"]).and_then(|v| v.get_ref().as_table());
        for name in self.setups.keys() {
            if !is_valid_setup_name(name) {
                let span = setup_table
                    .and_then(|t| t.get_key_value(name.as_str()))
                    .map(|(k, _)| k.span());
                return Err(doc.parse_error(
                    span,
                    Some(name.clone()),
                    format!(
                        "bad setup name `{name}`: it becomes the guest hostname, so it must \
                         match [A-Za-z0-9][A-Za-z0-9._-]* and be at most 64 characters"
                    ),
                ));
            }
        }
        if let Some(name) = &self.defaults.setup
            && !self.setups.contains_key(name)
        {
            let span = lookup(tree, &["defaults", "setup"]).map(Spanned::span);
            return Err(doc.bad_value(
                span,
                &["defaults", "setup"],
                name,
                format!("there is no [setup.{}] in this file", toml_key(name)),
            ));
        }
        Ok(())
    }

    fn expand(&mut self, home: &Path) {
        let d = &mut self.defaults;
        let paths = [
            &mut d.src,
            &mut d.kernel,
            &mut d.rdma_core,
            &mut d.iproute2,
            &mut d.logs,
            &mut d.ccache,
        ];
        for p in paths.into_iter().flatten().chain(d.dirs.iter_mut()) {
            paths::expand_in_place(p, home);
        }
        // rootfs may be a directory, so it gets the same treatment; a plain
        // name contains neither `~` nor `$HOME` and is left alone.
        if let Some(r) = &mut d.rootfs {
            *r = expand_home(r, home).to_string_lossy().into_owned();
        }
        for s in self.setups.values_mut() {
            for p in [&mut s.kernel, &mut s.boot_script, &mut s.test]
                .into_iter()
                .flatten()
                .chain(s.dirs.iter_mut())
            {
                paths::expand_in_place(p, home);
            }
            if let Some(r) = &mut s.rootfs {
                *r = expand_home(r, home).to_string_lossy().into_owned();
            }
        }
    }
}

/// True when `name` can be a setup name: it becomes a hostname, so
/// `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 bytes (HOST_NAME_MAX).
pub(crate) fn is_valid_setup_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name.len() <= 64
}

/// The text being parsed and its file name, for building errors.
struct Doc<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Doc<'_> {
    /// 1-based line and column (in characters) of a byte offset.
    fn line_col(&self, offset: usize) -> (u32, u32) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        // u32 keeps ConfigError small; no config file has 4G lines.
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        (clamp(line), clamp(column))
    }

    fn parse_error(
        &self,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: String,
    ) -> ConfigError {
        let (line, column) = self.line_col(span.map_or(0, |s| s.start));
        ConfigError::Parse {
            path: self.path.to_path_buf(),
            line,
            column,
            key,
            message,
        }
    }

    fn bad_value(
        &self,
        span: Option<Range<usize>>,
        keys: &[impl AsRef<str>],
        value: &str,
        reason: String,
    ) -> ConfigError {
        let pos = span.map(|s| self.line_col(s.start));
        ConfigError::BadValue {
            path: self.path.to_path_buf(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            key: keys
                .iter()
                .map(|k| toml_key(k.as_ref()))
                .collect::<Vec<_>>()
                .join("."),
            value: value.to_string(),
            reason,
        }
    }

    /// Turns a toml/serde error into [`ConfigError::Parse`], naming the key
    /// and its table when `tree` (the schema-free parse) can place the span.
    fn toml_error(&self, err: &toml::de::Error, tree: Option<&DeTable>) -> ConfigError {
        let span = err.span();
        let msg = err.message();
        let (mut keys, string) = match (tree, &span) {
            (Some(t), Some(s)) => locate(t, s.start),
            _ => (Vec::new(), None),
        };
        if tree.is_none() {
            // toml says just "duplicate key"; the span holds the key itself.
            let dup = span
                .clone()
                .filter(|_| msg == "duplicate key")
                .and_then(|s| self.text.get(s))
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty());
            return match dup {
                Some(k) => self.parse_error(span, Some(k.clone()), format!("{msg} `{k}`")),
                None => self.parse_error(span, None, msg.to_string()),
            };
        }
        if msg.starts_with("unknown field ") {
            // serde: "unknown field `cpu`, expected one of `kernel`, `rootfs`, ..."
            let mut names = backticked(msg).into_iter();
            let key = names.next().unwrap_or_default();
            if keys.last() == Some(&key) {
                keys.pop();
            }
            let expected: Vec<String> = names.collect();
            let expected = if expected.is_empty() {
                String::new()
            } else {
                format!(" (expected one of: {})", expected.join(", "))
            };
            let message = format!("unknown key `{key}` {}{expected}", table_context(&keys));
            return self.parse_error(span, Some(key), message);
        }
        let typed = ["invalid type", "invalid value", "invalid length"];
        if let Some(value) = string.filter(|_| !typed.iter().any(|t| msg.starts_with(t))) {
            // A string our types refused (values.rs): the message is the reason.
            return self.bad_value(span, &keys, &value, msg.to_string());
        }
        let Some(key) = keys.pop() else {
            return self.parse_error(span, None, msg.to_string());
        };
        let what = if msg.starts_with("invalid type") {
            "wrong type for key"
        } else if msg.starts_with("invalid value") || msg.starts_with("invalid length") {
            "bad value for key"
        } else {
            "key"
        };
        let message = format!("{what} `{key}` {}: {msg}", table_context(&keys));
        self.parse_error(span, Some(key), message)
    }
}

/// The value at a key path in the schema-free parse.
fn lookup<'t, 'i>(table: &'t DeTable<'i>, keys: &[&str]) -> Option<&'t Spanned<DeValue<'i>>> {
    let (first, rest) = keys.split_first()?;
    let mut node = table.get(*first)?;
    for k in rest {
        node = node.get_ref().as_table()?.get(*k)?;
    }
    Some(node)
}

/// The key path of the innermost key or value whose span holds `pos`, and
/// that value when it is a string.
fn locate(table: &DeTable, pos: usize) -> (Vec<String>, Option<String>) {
    struct Search {
        pos: usize,
        path: Vec<String>,
        best: Option<(usize, Vec<String>, Option<String>)>,
    }
    impl Search {
        fn consider(&mut self, span: Range<usize>, v: Option<&DeValue>) {
            let holds = span.contains(&self.pos) || (span.is_empty() && span.start == self.pos);
            // `<=`: children come after their parent and win ties.
            if holds && self.best.as_ref().is_none_or(|b| span.len() <= b.0) {
                let string = v.and_then(DeValue::as_str).map(String::from);
                self.best = Some((span.len(), self.path.clone(), string));
            }
        }
        fn table(&mut self, t: &DeTable) {
            for (k, v) in t.iter() {
                self.path.push(k.get_ref().to_string());
                self.consider(k.span(), None);
                self.consider(v.span(), Some(v.get_ref()));
                self.value(v.get_ref());
                self.path.pop();
            }
        }
        fn value(&mut self, v: &DeValue) {
            match v {
                DeValue::Table(t) => self.table(t),
                DeValue::Array(a) => {
                    for e in a.iter() {
                        self.consider(e.span(), Some(e.get_ref()));
                        self.value(e.get_ref());
                    }
                }
                _ => {}
            }
        }
    }
    let mut search = Search {
        pos,
        path: Vec::new(),
        best: None,
    };
    search.table(table);
    search.best.map(|(_, p, s)| (p, s)).unwrap_or_default()
}

/// "in [setup.cx5-ib]" or "at top level".
fn table_context(keys: &[String]) -> String {
    if keys.is_empty() {
        "at top level".to_string()
    } else {
        let names: Vec<String> = keys.iter().map(|k| toml_key(k)).collect();
        format!("in [{}]", names.join("."))
    }
}

/// A key as written in TOML: bare when possible, else quoted.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// The `quoted` names in a serde message.
fn backticked(msg: &str) -> Vec<String> {
    msg.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The starter config `mkt setup` writes: every line commented out.
pub fn starter_config() -> &'static str {
    include_str!("../../configs/starter.toml")
}

#[cfg(test)]
pub(super) mod tests {
    use super::values::tests::{check_mac, check_net, parse_mem_mib, parse_virt};
    use super::*;
    use std::collections::BTreeSet;

    const HOME: &str = "/home/u";

    pub(crate) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/c.toml"), Path::new(HOME))
    }

    #[test]
    fn parse_expands_paths_and_rootfs() {
        let cfg = parse(
            "[defaults]\nsrc = \"~/src\"\nrootfs = \"debian\"\ndirs = [\"$HOME/w\"]\n\
             [setup.a]\nkernel = \"${HOME}/k\"\nrootfs = \"~/fs\"\ntest = \"/abs\"\n",
        )
        .unwrap();
        assert_eq!(cfg.defaults.src, Some(PathBuf::from("/home/u/src")));
        assert_eq!(cfg.defaults.rootfs.as_deref(), Some("debian"));
        assert_eq!(cfg.defaults.dirs, vec![PathBuf::from("/home/u/w")]);
        let a = &cfg.setups["a"];
        assert_eq!(a.kernel, Some(PathBuf::from("/home/u/k")));
        assert_eq!(a.rootfs.as_deref(), Some("/home/u/fs"));
        assert_eq!(a.test, Some(PathBuf::from("/abs")));
        assert_eq!(cfg.file.as_deref(), Some(Path::new("/c.toml")));
    }

    #[test]
    fn setup_names() {
        for good in ["a", "cx5-ib", "A.b_c-1", "9"] {
            assert!(is_valid_setup_name(good), "{good}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "é", &"a".repeat(65)] {
            assert!(!is_valid_setup_name(bad), "{bad}");
        }
    }

    #[test]
    fn pci_is_normalised_in_config() {
        let cfg = parse("[setup.a]\npci = [\"5:0.0\"]\nnested_pci = [\"0000:06:00.1\"]\n").unwrap();
        assert_eq!(cfg.setups["a"].pci[0].as_str(), "0000:05:00.0");
        assert_eq!(cfg.setups["a"].nested_pci[0].as_str(), "0000:06:00.1");
    }

    #[test]
    fn virt_values() {
        assert_eq!(parse_virt("rxe-eth0"), Ok(("rxe", "eth0".into())));
        assert_eq!(parse_virt("siw-ens3f0"), Ok(("siw", "ens3f0".into())));
        for bad in [
            "rxe",
            "rxe-",
            "roce-eth0",
            "rxe-a/b",
            "siw-aaaaaaaaaaaaaaaaaa",
        ] {
            assert!(parse_virt(bad).is_err(), "{bad}");
        }
        let err = parse("[setup.a]\nvirt = [\"rxe-eth0\", \"ib-eth0\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`setup.a.virt`") && err.contains("unknown soft RDMA kind"),
            "{err}"
        );
    }

    #[test]
    fn mac_and_nvme_values() {
        let cfg = parse("[setup.a]\nmac = \"0A:6D:6B:00:00:01\"\nnvme = \"2G\"\n").unwrap();
        let mac = cfg.setups["a"].mac.as_ref().map(ToString::to_string);
        assert_eq!(mac.as_deref(), Some("0a:6d:6b:00:00:01"));
        for bad in ["01:00:00:00:00:00", "0a:6d:6b:00:00", "zz:00:00:00:00:00"] {
            assert!(check_mac(bad).is_err(), "{bad}");
        }
        let err = parse("[setup.a]\nnvme = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`setup.a.nvme`"), "{err}");
    }

    /// serde fills a struct from an array, field by field: an array where
    /// a table belongs must be refused, at its line, naming the key.
    #[test]
    fn an_array_where_a_table_belongs_is_an_error_at_its_line() {
        let msg = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(
            msg("[defaults]\nsrc = \"/s\"\n[setup]\na = [\"/k\", \"fs\"]\n"),
            "/c.toml:4:5: wrong type for key `a` in [setup]: expected a table, not an array"
        );
        assert_eq!(
            msg("\n[[setup.b]]\ncpus = 1\n"),
            "/c.toml:2:1: wrong type for key `b` in [setup]: expected a table, not an array"
        );
        for key in ["defaults", "setup", "limits"] {
            assert_eq!(
                msg(&format!("{key} = [\"/k\"]\n")),
                format!(
                    "/c.toml:1:{}: wrong type for key `{key}` at top level: \
                     expected a table, not an array",
                    key.len() + 4
                )
            );
        }
        let err = parse("setup.a = []\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: 1, key: Some(k), .. } if k == "a"));
    }

    #[test]
    fn default_setup_must_exist() {
        let err = parse("[defaults]\nsetup = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/c.toml:2:9: bad value \"nope\" for key `defaults.setup`"),
            "{err}"
        );
        assert!(parse("[defaults]\nsetup = \"a\"\n[setup.a]\n").is_ok());
    }

    #[test]
    fn zero_cpus_rejected() {
        let err = parse("[setup.a]\ncpus = 0\n").unwrap_err().to_string();
        assert!(
            err.contains("/c.toml:2:8: key `cpus` in [setup.a]: a guest needs at least one CPU"),
            "{err}"
        );
    }

    #[test]
    fn cpus_has_one_parser_for_flag_and_file() {
        use std::str::FromStr;
        assert_eq!(Cpus::from_str("2").unwrap().get(), 2);
        let flag = Cpus::from_str("0").unwrap_err();
        let file = parse("[setup.a]\ncpus = 0\n").unwrap_err().to_string();
        assert!(file.ends_with(&flag), "{file} / {flag}");
        assert!(Cpus::from_str("two").unwrap_err().contains("not a number"));
        let cfg = parse("[setup.a]\ncpus = 3\n").unwrap();
        assert_eq!(cfg.setups["a"].cpus.map(Cpus::get), Some(3));
    }

    #[test]
    fn inline_and_dotted_tables_are_located() {
        let err = parse("[setup]\na = { cpus = 1, bad = 2 }\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2:17: unknown key `bad` in [setup.a]"),
            "{err}"
        );
        let err = parse("setup.b.cpus = \"x\"\n").unwrap_err().to_string();
        assert!(
            err.contains(":1:16: wrong type for key `cpus` in [setup.b]"),
            "{err}"
        );
        let err = parse("[setup.a]\npci = [\"00:01.0\", 3]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2:19: wrong type for key `pci` in [setup.a]"),
            "{err}"
        );
        let err = parse("bogus = 1\n").unwrap_err().to_string();
        assert!(
            err.contains(
                ":1:1: unknown key `bogus` at top level (expected one of: defaults, setup, limits)"
            ),
            "{err}"
        );
    }

    #[test]
    fn limits_are_sizes_with_defaults_for_unset_keys() {
        let cfg = parse("[limits]\nlayer = \"1G\"\nimage = \"1536M\"\n").unwrap();
        let l = cfg.limits.bytes();
        assert_eq!((l.layer, l.image), (1 << 30, 1536 << 20));
        let d = crate::oci::Limits::default();
        assert_eq!((l.manifest, l.config), (d.manifest, d.config));
        assert_eq!(Config::default().limits.bytes(), d);
        let paths = Paths::from_env(|k| (k == "HOME").then(|| HOME.into()), 1000, None)
            .unwrap()
            .with_config(&cfg);
        assert_eq!(paths.limits, l);

        let err = parse("[limits]\nlayer = \"16Q\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/c.toml:2:9: bad value \"16Q\" for key `limits.layer`"),
            "{err}"
        );
        let err = parse("[limits]\nlayers = \"1G\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "unknown key `layers` in [limits] (expected one of: manifest, config, layer, image)"
            ),
            "{err}"
        );
        let err = parse("[limits]\nimage = 5\n").unwrap_err().to_string();
        assert!(
            err.contains("wrong type for key `image` in [limits]"),
            "{err}"
        );
    }

    #[test]
    fn columns_count_characters() {
        let err = parse("[defaults]\nsrc = \"é\"; cpus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/c.toml:2:10:"), "{err}");
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = parse(include_str!("../../configs/example.toml")).unwrap();
        let text = toml::to_string(&cfg).unwrap();
        let again = parse(&text).unwrap();
        assert_eq!(again.defaults, cfg.defaults);
        assert_eq!(again.setups, cfg.setups);
        assert_eq!(again.limits, cfg.limits);
    }

    /// Keys present in a serialised struct (empty fields are skipped).
    fn keys_of<T: Serialize>(v: &T) -> BTreeSet<String> {
        toml::Table::try_from(v).unwrap().keys().cloned().collect()
    }

    #[test]
    fn example_and_starter_configs_parse_and_cover_every_key() {
        let starter = parse(starter_config()).unwrap();
        assert_eq!(
            starter.setups.len(),
            0,
            "the starter's example setup is commented out"
        );
        let cfg = parse(include_str!("../../configs/example.toml")).unwrap();

        // Struct literals without `..Default`: a new field breaks the build
        // here until the example covers it.
        let all_defaults = Defaults {
            src: Some("x".into()),
            kernel: Some("x".into()),
            rdma_core: Some("x".into()),
            iproute2: Some("x".into()),
            logs: Some("x".into()),
            ccache: Some("x".into()),
            rootfs: Some("x".into()),
            setup: Some("x".into()),
            dirs: vec!["x".into()],
        };
        let all_setup = Setup {
            kernel: Some("x".into()),
            rootfs: Some("x".into()),
            pci: vec!["1:0.0".parse().unwrap()],
            boot_script: Some("x".into()),
            num_of_vfs: Some(1),
            num_ports: Some(1),
            test: Some("x".into()),
            nested_pci: vec!["1:0.0".parse().unwrap()],
            profile: Some("x".into()),
            cpus: Some(Cpus::try_from(1).unwrap()),
            mem: Some("1G".parse().unwrap()),
            net: Some("nat".parse().unwrap()),
            mac: Some("02:00:00:00:00:00".parse().unwrap()),
            nvme: Some("1G".parse().unwrap()),
            virt: vec!["rxe-eth0".parse().unwrap()],
            dirs: vec!["x".into()],
        };
        let all_limits = Limits {
            manifest: Some("1M".parse().unwrap()),
            config: Some("1M".parse().unwrap()),
            layer: Some("1M".parse().unwrap()),
            image: Some("1M".parse().unwrap()),
        };
        assert_eq!(keys_of(&cfg.limits), keys_of(&all_limits));
        assert_eq!(keys_of(&cfg.defaults), keys_of(&all_defaults));
        let used: BTreeSet<String> = cfg.setups.values().flat_map(keys_of).collect();
        assert_eq!(used, keys_of(&all_setup));
        for name in ["cx5-ib", "cx4-eth", "cx6-roce"] {
            assert!(cfg.setups.contains_key(name), "{name}");
        }
        assert!(cfg.setups.values().any(|s| s.num_of_vfs == Some(3)));
        assert!(
            cfg.setups
                .values()
                .any(|s| s.profile.as_deref() == Some("iommu") && !s.nested_pci.is_empty())
        );
        assert!(cfg.setups["cx5-ib"].pci.len() == 2 && cfg.setups["cx5-ib"].boot_script.is_some());
    }

    /// Runs `f` on a thread of its own and returns its result. An endless
    /// loop (some mutants of the loops below make one) ends the whole test
    /// run at once, failing it, rather than stalling every test that
    /// reaches the loop until an outer timeout notices.
    pub(crate) fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::sync::mpsc::{RecvTimeoutError, channel};
        let (tx, rx) = channel();
        std::thread::spawn(move || tx.send(f()));
        match rx.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(v) => v,
            Err(RecvTimeoutError::Disconnected) => panic!("the function panicked"),
            Err(RecvTimeoutError::Timeout) => {
                eprintln!("a function under test ran for 5 s without returning: endless loop");
                std::process::exit(101);
            }
        }
    }

    #[test]
    fn load_reads_the_file_and_only_a_missing_one_is_optional() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Path::new(HOME);
        let file = tmp.path().join("config.toml");
        fs::write(&file, "[setup.a]\ncpus = 2\nkernel = \"~/k\"\n").unwrap();
        for cfg in [
            Config::load(&file, home).unwrap(),
            Config::load_optional(&file, home).unwrap(),
        ] {
            assert_eq!(cfg.setups["a"].cpus.map(Cpus::get), Some(2));
            assert_eq!(cfg.setups["a"].kernel, Some(PathBuf::from("/home/u/k")));
            assert_eq!(cfg.file.as_deref(), Some(file.as_path()));
        }
        fs::write(&file, "[setup.a]\ncpus = 0\n").unwrap();
        let err = Config::load_optional(&file, home).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}:2:8: key `cpus` in [setup.a]: a guest needs at least one CPU, not 0",
                file.display()
            )
        );

        let missing = tmp.path().join("missing.toml");
        let err = Config::load(&missing, home).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot read config file {}", missing.display())
        );
        assert!(matches!(&err, ConfigError::Read { source, .. }
                         if source.kind() == io::ErrorKind::NotFound));
        assert_eq!(
            Config::load_optional(&missing, home).unwrap(),
            Config::default()
        );

        // Any other failure to read is an error, even for the optional file.
        let err = Config::load_optional(tmp.path(), home).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot read config file {}", tmp.path().display())
        );
        assert!(matches!(&err, ConfigError::Read { source, .. }
                         if source.kind() != io::ErrorKind::NotFound));
    }

    #[test]
    fn every_limit_goes_to_its_own_field_and_unset_limits_are_not_written() {
        let cfg = parse("[limits]\nmanifest = \"1M\"\nconfig = \"2M\"\n").unwrap();
        let l = cfg.limits.bytes();
        let d = crate::oci::Limits::default();
        assert_eq!((l.manifest, l.config), (1 << 20, 2 << 20));
        assert_eq!((l.layer, l.image), (d.layer, d.image));
        assert!(toml::to_string(&cfg).unwrap().contains("[limits]"));
        let text = toml::to_string(&Config::default()).unwrap();
        assert!(!text.contains("limits"), "{text}");
    }

    #[test]
    fn size_errors_say_what_is_wrong() {
        const FORM: &str = "expected a size such as \"2G\" or \"2048M\" (suffix K, M, G or T)";
        for bad in ["", " ", "G", "-1G", "1.5G"] {
            assert_eq!(parse_mem_mib(bad), Err(FORM.to_string()), "{bad:?}");
        }
        assert_eq!(parse_mem_mib("1024K"), Ok(1));
        assert_eq!(
            parse_mem_mib("1536K"),
            Err("not a whole number of MiB".to_string())
        );
        assert_eq!(
            parse_mem_mib("512K"),
            Err("not a whole number of MiB".to_string())
        );
        assert_eq!(
            parse_mem_mib("2X"),
            Err("unknown suffix `X` (use K, M, G or T)".into())
        );
        assert_eq!(parse_mem_mib("0G"), Err("size must be at least 1M".into()));
        let err = parse("[setup.a]\nmem = \"G\"\n").unwrap_err().to_string();
        assert_eq!(
            err,
            format!("/c.toml:2:7: bad value \"G\" for key `setup.a.mem`: {FORM}")
        );
    }

    #[test]
    fn mac_addresses_need_six_two_digit_octets_and_an_even_first_one() {
        const FORM: &str = "expected a MAC address such as 02:6d:6b:74:00:01";
        assert_eq!(
            check_mac("00:11:22:33:44:55").as_deref(),
            Ok("00:11:22:33:44:55")
        );
        assert_eq!(
            check_mac("FE:ff:00:00:00:01").as_deref(),
            Ok("fe:ff:00:00:00:01")
        );
        for bad in [
            "0a:6d:6b:0:00:01",
            "0a:6d:6b:000:00:01",
            "zz:00:00:00:00:00",
            "",
        ] {
            assert_eq!(check_mac(bad), Err(FORM.to_string()), "{bad:?}");
        }
        for multicast in [
            "01:00:00:00:00:00",
            "03:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
        ] {
            assert!(
                check_mac(multicast).unwrap_err().contains("multicast"),
                "{multicast}"
            );
        }
        let err = parse("[setup.a]\nmac = \"03:00:00:00:00:00\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/c.toml:2:7: bad value \"03:00:00:00:00:00\" for key `setup.a.mac`: \
             a multicast address cannot be a NIC's (the first octet must be even)"
        );
    }

    #[test]
    fn interface_names_refuse_slash_colon_and_blanks() {
        for c in ['/', ':', ' ', '\t'] {
            assert!(parse_virt(&format!("rxe-a{c}b")).is_err(), "{c:?}");
            assert!(check_net(&format!("bridge=a{c}b")).is_err(), "{c:?}");
        }
        assert_eq!(parse_virt("rxe-a.b_c-d"), Ok(("rxe", "a.b_c-d".into())));
        assert!(check_net("bridge=a.b_c-d").is_ok());
        assert!(check_net("bridge=..").is_err() && check_net("bridge=.").is_err());
        let err = parse("[setup.a]\nnet = \"bridge=br:0\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/c.toml:2:7: bad value \"bridge=br:0\" for key `setup.a.net`: \
             not a valid interface name after `bridge=`"
        );
        let err = parse("[setup.a]\nvirt = [\"rxe-eth0\", \"siw-a b\"]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/c.toml:2:21: bad value \"siw-a b\" for key `setup.a.virt`: \
             not a valid interface name after the kind"
        );
    }

    #[test]
    fn a_position_inside_a_character_is_that_character() {
        // "é\nxé": é is bytes 0-1, x is byte 3, the second é bytes 4-5.
        let at = |offset| {
            finishes(move || {
                let doc = Doc {
                    text: "é\nxé",
                    path: Path::new("/c.toml"),
                };
                doc.line_col(offset)
            })
        };
        assert_eq!(at(1), (1, 1));
        assert_eq!(at(2), (1, 2));
        assert_eq!(at(5), (2, 2));
        assert_eq!(at(6), (2, 3));
        assert_eq!(at(99), (2, 3));
    }

    #[test]
    fn syntax_errors_are_located_and_name_a_duplicate_key() {
        let err = parse("a = 1\na = 2\n").unwrap_err();
        assert_eq!(err.to_string(), "/c.toml:2:1: duplicate key `a`");
        assert!(matches!(&err, ConfigError::Parse { key: Some(k), .. } if k == "a"));
        let err = parse("[setup.a]\ncpus = 1\n[setup.a]\n").unwrap_err();
        assert_eq!(err.to_string(), "/c.toml:3:8: duplicate key `a`");
        let err = parse("\"é\" = 1\n\"é\" = 2\n").unwrap_err();
        assert_eq!(err.to_string(), "/c.toml:2:1: duplicate key `\"é\"`");

        let err = parse("[defaults]\nsrc = é\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/c.toml:2:7: string values must be quoted, expected literal string"
        );
        assert!(matches!(&err, ConfigError::Parse { key: None, .. }));
    }

    #[test]
    fn type_and_value_errors_name_the_innermost_key() {
        let err = parse("[setup.a]\nnum_of_vfs = -1\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/c.toml:2:14: bad value for key `num_of_vfs` in [setup.a]: \
             invalid value: integer `-1`, expected u32"
        );
        let err = parse("[setup]\na = { cpus = \"x\" }\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/c.toml:2:14: wrong type for key `cpus` in [setup.a]: \
             invalid type: string \"x\", expected u32"
        );
        // A typed value given as a number: the typed values are strings.
        let err = parse("[setup.a]\nmem = 4\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "/c.toml:2:7: wrong type for key `mem` in [setup.a]: \
             invalid type: integer `4`, expected a string"
        );
    }

    #[test]
    fn locate_finds_keys_inside_arrays_and_empty_spans_at_their_start() {
        let text = "x = [1, { y = 2 }]\n";
        let tree = DeTable::parse(text).unwrap();
        assert_eq!(
            locate(tree.get_ref(), text.find('2').unwrap()).0,
            ["x", "y"]
        );
        assert_eq!(locate(tree.get_ref(), text.find('1').unwrap()).0, ["x"]);
        assert!(locate(tree.get_ref(), text.len()).0.is_empty());

        // a = { b = <empty at 5>, c = <3..4> }, spanning 0..10.
        let mut inner = DeTable::new();
        inner.insert(
            Spanned::new(5..5, "b".into()),
            Spanned::new(5..5, DeValue::Boolean(true)),
        );
        inner.insert(
            Spanned::new(2..3, "c".into()),
            Spanned::new(3..4, DeValue::Boolean(true)),
        );
        let mut outer = DeTable::new();
        outer.insert(
            Spanned::new(0..1, "a".into()),
            Spanned::new(0..10, DeValue::Table(inner)),
        );
        assert_eq!(locate(&outer, 3).0, ["a", "c"]);
        assert_eq!(locate(&outer, 5).0, ["a", "b"]);
        assert_eq!(locate(&outer, 7).0, ["a"]);
    }

    #[test]
    fn keys_in_messages_are_quoted_only_when_toml_needs_it() {
        let wrong_cpus = |name: &str| {
            parse(&format!("[setup.{name}]\ncpus = \"x\"\n"))
                .unwrap_err()
                .to_string()
        };
        assert!(
            wrong_cpus("cx5_ib-2").contains("key `cpus` in [setup.cx5_ib-2]:"),
            "{}",
            wrong_cpus("cx5_ib-2")
        );
        for (written, shown) in [("\"a.b\"", "[setup.\"a.b\"]"), ("\"\"", "[setup.\"\"]")] {
            let err = wrong_cpus(written);
            assert!(err.contains(&format!("key `cpus` in {shown}:")), "{err}");
        }
        let err = parse("[defaults]\nsetup = \"x.y\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(": there is no [setup.\"x.y\"] in this file"),
            "{err}"
        );
    }

    #[test]
    fn the_starter_config_uncommented_is_a_working_config() {
        let starter = starter_config();
        assert!(starter.starts_with("# mkt configuration"), "{starter}");
        // `#key = ...` and `#[table]` lines are examples; `# ` lines are prose.
        let uncommented: String = starter
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.is_empty() && !rest.starts_with(' ') => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = parse(&uncommented).unwrap();
        assert_eq!(cfg.defaults.setup.as_deref(), Some("cx5-ib"));
        assert_eq!(
            cfg.defaults.kernel,
            Some(PathBuf::from("/home/u/src/kernel"))
        );
        let s = &cfg.setups["cx5-ib"];
        let pci: Vec<String> = s.pci.iter().map(ToString::to_string).collect();
        assert_eq!(pci, ["0000:05:00.0", "0000:05:00.1"]);
        assert_eq!(s.mem.map(MemSize::mib), Some(4096));
    }
}
