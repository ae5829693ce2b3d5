//! Which kernel modules a guest needs, as data.
//!
//! Two cases:
//!
//! - **A built kernel tree** (`mkt run --kernel TREE`): [`tree_modules`]
//!   reads the release and the modules the build produced, and [`link_plan`]
//!   says which symlinks make up the guest's `/lib/modules/<release>/` and
//!   `/boot/*-<release>`. A tree has no `modules.dep` (`make
//!   modules_install` runs depmod), so whoever needs one must run `depmod`
//!   over the linked directory.
//! - **A distro kernel** whose virtio/virtiofs/vsock drivers are modules
//!   (Debian's cloud kernel): [`resolve`] turns a list of wanted module
//!   names into the files to load, dependencies first, using `modules.dep`
//!   when present and otherwise each module's own `.modinfo` `depends=`
//!   (Debian's `linux-image-*` package ships no `modules.dep`: its postinst
//!   runs depmod). [`decompress`] gives the raw `.ko` bytes to hand to
//!   `init_module`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Why reading a kernel tree or a modules directory failed.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    /// `include/config/kernel.release` is missing: the tree was not built.
    #[error("not a built kernel tree: {} missing (run make first)", .path.display())]
    NotKernelTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `include/config/kernel.release` exists but holds no release.
    #[error("not a built kernel tree: {} is empty", .path.display())]
    EmptyRelease { path: PathBuf },
    /// Reading a file (modules.order, modules.dep, a module, ...) failed.
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Listing a modules directory failed.
    #[error("cannot list modules directory {}", .path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The decompressor for a compressed module is not installed.
    #[error("cannot decompress {}: `{program}` is not installed", .path.display())]
    ProgramMissing {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The decompressor could not be started for another reason.
    #[error("cannot run `{program}` to decompress {}", .path.display())]
    Spawn {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The decompressor ran and failed.
    #[error("`{program} -dc {}` failed ({status}): {stderr}", .path.display())]
    Decompress {
        program: &'static str,
        path: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
    /// Not a `.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz` file.
    #[error("cannot decompress {}: not a .ko, .ko.xz, .ko.zst or .ko.gz file", .path.display())]
    UnknownCompression { path: PathBuf },
    /// The module is not an ELF file with a readable `.modinfo` section.
    #[error("cannot read the .modinfo section of {}: {reason}", .path.display())]
    Modinfo { path: PathBuf, reason: String },
}

// ---------------------------------------------------------------------------
// A built kernel tree.

/// The modules of a built kernel tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeModules {
    /// `include/config/kernel.release`, e.g. `6.1.192`.
    pub release: String,
    /// Built modules, as `.ko` paths relative to the tree, in
    /// `modules.order` order (e.g. `drivers/net/dummy.ko`).
    pub modules: Vec<PathBuf>,
    /// Which of `modules.order`, `modules.builtin` and
    /// `modules.builtin.modinfo` exist at the top of the tree.
    pub extra_files: Vec<&'static str>,
    /// Modules listed in `modules.order` whose `.ko` does not exist: the
    /// tree was built without `make modules`.
    pub missing: Vec<PathBuf>,
}

/// Metadata files linked into the guest's `/lib/modules/<release>/`.
const TREE_EXTRA_FILES: [&str; 3] = [
    "modules.order",
    "modules.builtin",
    "modules.builtin.modinfo",
];

/// Reads the release and module list of the built kernel tree `tree`.
///
/// `modules.order` lists `drivers/net/dummy.ko` (Linux ≤ 6.1) or
/// `drivers/net/dummy.o` (Linux ≥ 6.2, mapped to `.ko`). A tree without
/// `modules.order` (e.g. `CONFIG_MODULES=n`) has no modules; that is not an
/// error.
pub(crate) fn tree_modules(tree: &Path) -> Result<TreeModules, ModulesError> {
    let release_path = tree.join("include/config/kernel.release");
    let release = match fs::read_to_string(&release_path) {
        Ok(s) => s.trim().to_string(),
        Err(source) if source.kind() == io::ErrorKind::NotFound => {
            return Err(ModulesError::NotKernelTree {
                path: release_path,
                source,
            });
        }
        Err(source) => {
            return Err(ModulesError::Read {
                path: release_path,
                source,
            });
        }
    };
    if release.is_empty() {
        return Err(ModulesError::EmptyRelease { path: release_path });
    }

    let extra_files: Vec<&'static str> = TREE_EXTRA_FILES
        .into_iter()
        .filter(|name| tree.join(name).is_file())
        .collect();

    let mut modules = Vec::new();
    let mut missing = Vec::new();
    let order_path = tree.join("modules.order");
    if extra_files.contains(&"modules.order") {
        let order = read_text(&order_path)?;
        let mut seen = HashSet::new();
        for line in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let rel = tree_order_entry(tree, line);
            if !seen.insert(rel.clone()) {
                continue;
            }
            if tree.join(&rel).is_file() {
                modules.push(rel);
            } else {
                missing.push(rel);
            }
        }
    }
    Ok(TreeModules {
        release,
        modules,
        extra_files,
        missing,
    })
}

/// The `.ko` path, relative to the tree, of one `modules.order` line.
fn tree_order_entry(tree: &Path, line: &str) -> PathBuf {
    let ko = match line.strip_suffix(".o") {
        Some(stem) => format!("{stem}.ko"),
        None => line.to_string(),
    };
    // Kernels before 5.x wrote `kernel/drivers/...`; the tree itself has a
    // top-level `kernel/` directory (kernel/kheaders.ko), so strip the prefix
    // only when that is what makes the path exist.
    if let Some(stripped) = ko.strip_prefix("kernel/")
        && !tree.join(&ko).exists()
        && tree.join(stripped).exists()
    {
        return PathBuf::from(stripped);
    }
    PathBuf::from(ko)
}

/// The symlinks that make up the guest's view of a built tree, as
/// `(link path inside the guest, absolute target on the host)`:
///
/// - `/lib/modules/REL/kernel/<path>.ko` → `TREE/<path>.ko` for each module;
/// - `/lib/modules/REL/<name>` → `TREE/<name>` for each of
///   [`TreeModules::extra_files`] (note that the tree's `modules.order`
///   lacks the `kernel/` prefix `make modules_install` adds; depmod only
///   uses it for ordering, and [`installed_modules_order`] gives the
///   installed form if exactness matters);
/// - `/lib/modules/REL/build` and `/lib/modules/REL/source` → `TREE`;
/// - `/boot/System.map-REL` → `TREE/System.map`, `/boot/config-REL` →
///   `TREE/.config`, `/boot/vmlinuz-REL` → the kernel image
///   (`TREE/arch/x86/boot/bzImage` on x86).
///
/// A relative `tree` is made absolute against the current directory.
pub(crate) fn link_plan(tm: &TreeModules, tree: &Path) -> Vec<(PathBuf, PathBuf)> {
    let tree = std::path::absolute(tree).unwrap_or_else(|_| tree.to_path_buf());
    let libdir = PathBuf::from("/lib/modules").join(&tm.release);
    let mut plan = Vec::with_capacity(tm.modules.len() + tm.extra_files.len() + 5);
    for m in &tm.modules {
        plan.push((libdir.join("kernel").join(m), tree.join(m)));
    }
    for name in &tm.extra_files {
        plan.push((libdir.join(name), tree.join(name)));
    }
    plan.push((libdir.join("build"), tree.clone()));
    plan.push((libdir.join("source"), tree.clone()));
    let boot = Path::new("/boot");
    let rel = &tm.release;
    plan.push((
        boot.join(format!("System.map-{rel}")),
        tree.join("System.map"),
    ));
    plan.push((boot.join(format!("config-{rel}")), tree.join(".config")));
    plan.push((
        boot.join(format!("vmlinuz-{rel}")),
        tree.join(crate::arch::HOST.image),
    ));
    plan
}

/// `modules.order` as `make modules_install` writes it: one
/// `kernel/<path>.ko` line per built module.
pub fn installed_modules_order(tm: &TreeModules) -> String {
    tm.modules
        .iter()
        .map(|m| format!("kernel/{}\n", m.display()))
        .collect()
}

// ---------------------------------------------------------------------------
// A distro kernel's modules directory.

/// What loading a list of wanted modules takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ModulePlan {
    /// Module files to load, in load order (dependencies first, each once),
    /// relative to the modules directory as in `modules.dep` (e.g.
    /// `kernel/fs/fuse/virtiofs.ko`).
    pub needed: Vec<PathBuf>,
    /// Wanted modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
    /// Wanted modules (or their dependencies) that are neither built in nor
    /// available as a module: this kernel lacks them.
    pub absent: Vec<String>,
}

/// Resolves `wanted` module names (`-` and `_` are equivalent) against the
/// modules directory `modules_dir` (`<root>/lib/modules/<release>`).
///
/// Reads `modules.builtin` (required) and `modules.dep` when present. Without
/// `modules.dep` — an unpacked distro package, before depmod — the modules
/// under `modules_dir` are indexed by file name and each needed module's
/// `depends=` is read from its `.modinfo` section (decompressing it if
/// need be). Softdeps are not followed.
pub(crate) fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<ModulePlan, ModulesError> {
    let builtin_text = read_text(&modules_dir.join("modules.builtin"))?;
    let dep_path = modules_dir.join("modules.dep");
    match fs::read_to_string(&dep_path) {
        Ok(dep) => return Ok(resolve_text(&dep, &builtin_text, wanted)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ModulesError::Read {
                path: dep_path,
                source,
            });
        }
    }
    tracing::debug!(
        dir = %modules_dir.display(),
        "no modules.dep: reading dependencies from each module's .modinfo"
    );
    let builtin = parse_builtin(&builtin_text);
    let index = index_modules(modules_dir)?;
    resolve_with(&builtin, wanted, |name| {
        let Some(rel) = index.get(name) else {
            return Ok(None);
        };
        let depends = module_depends(&modules_dir.join(rel))?;
        Ok(Some(Node {
            path: rel.clone(),
            deps: depends.iter().map(|d| normalize_name(d)).collect(),
        }))
    })
}

/// The pure core of [`resolve`]: `modules_dep` and `modules_builtin` are
/// the texts of `modules.dep` and `modules.builtin`.
pub(crate) fn resolve_text(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[&str],
) -> ModulePlan {
    let builtin = parse_builtin(modules_builtin);
    let mut graph: HashMap<String, Node> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim();
        if path.is_empty() {
            continue;
        }
        // modprobe loads a module's dependencies from the last listed to the
        // first; visiting them in that order reproduces its order.
        let deps = deps.split_whitespace().rev().map(module_name).collect();
        graph.entry(module_name(path)).or_insert(Node {
            path: PathBuf::from(path),
            deps,
        });
    }
    let result: Result<ModulePlan, std::convert::Infallible> =
        resolve_with(&builtin, wanted, |name| Ok(graph.get(name).cloned()));
    match result {
        Ok(plan) => plan,
        Err(never) => match never {},
    }
}

/// One module: its file, relative to the modules directory, and the
/// normalised names of the modules it depends on.
#[derive(Debug, Clone)]
struct Node {
    path: PathBuf,
    deps: Vec<String>,
}

/// Depth-first, dependencies first, each module once. `lookup` takes a
/// normalised name.
fn resolve_with<E>(
    builtin: &HashSet<String>,
    wanted: &[&str],
    mut lookup: impl FnMut(&str) -> Result<Option<Node>, E>,
) -> Result<ModulePlan, E> {
    struct Walk<'a, F> {
        builtin: &'a HashSet<String>,
        lookup: F,
        /// Modules entered (including those in progress: breaks cycles).
        seen: HashSet<String>,
        plan: ModulePlan,
    }
    impl<F, E> Walk<'_, F>
    where
        F: FnMut(&str) -> Result<Option<Node>, E>,
    {
        /// Visits `name` (normalised); `shown` is how to report it.
        fn visit(&mut self, name: String, shown: &str) -> Result<(), E> {
            if !self.seen.insert(name.clone()) {
                return Ok(());
            }
            if self.builtin.contains(&name) {
                self.plan.builtin.push(shown.to_string());
                return Ok(());
            }
            let Some(node) = (self.lookup)(&name)? else {
                self.plan.absent.push(shown.to_string());
                return Ok(());
            };
            for dep in node.deps {
                let shown = dep.clone();
                self.visit(dep, &shown)?;
            }
            self.plan.needed.push(node.path);
            Ok(())
        }
    }
    let mut walk = Walk {
        builtin,
        lookup: &mut lookup,
        seen: HashSet::new(),
        plan: ModulePlan::default(),
    };
    for w in wanted {
        walk.visit(normalize_name(w), w)?;
    }
    Ok(walk.plan)
}

/// Module names in `modules.builtin` (one path a line), normalised.
fn parse_builtin(text: &str) -> HashSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect()
}

/// Every module file under `modules_dir`, by normalised name. Symlinks
/// (`build`, `source`) are not followed. When a name occurs twice, `updates/`
/// wins over `kernel/`, which wins over anything else (depmod's default
/// search order), then the lexically first path.
fn index_modules(modules_dir: &Path) -> Result<HashMap<String, PathBuf>, ModulesError> {
    fn rank(rel: &Path) -> (u8, PathBuf) {
        let r = if rel.starts_with("updates") {
            0
        } else if rel.starts_with("kernel") {
            1
        } else {
            2
        };
        (r, rel.to_path_buf())
    }
    let mut index: HashMap<String, PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let dir = modules_dir.join(&rel_dir);
        let entries = fs::read_dir(&dir).map_err(|source| ModulesError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| ModulesError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let file_type = entry.file_type().map_err(|source| ModulesError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let rel = rel_dir.join(entry.file_name());
            if file_type.is_dir() {
                stack.push(rel);
            } else if file_type.is_file()
                && let Some(name) = entry.file_name().to_str()
                && compression(name).is_some()
            {
                let name = module_name(name);
                match index.get(&name) {
                    Some(old) if rank(old) <= rank(&rel) => {}
                    _ => {
                        index.insert(name, rel);
                    }
                }
            }
        }
    }
    Ok(index)
}

/// The normalised module name of a module path or file name:
/// `kernel/drivers/char/hw_random/virtio-rng.ko.xz` → `virtio_rng`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = ["", ".xz", ".zst", ".gz"]
        .iter()
        .find_map(|c| file.strip_suffix(&format!(".ko{c}")))
        .unwrap_or(file);
    normalize_name(stem)
}

/// `-` and `_` are the same in module names; the kernel uses `_`.
fn normalize_name(name: &str) -> String {
    name.trim().replace('-', "_")
}

// ---------------------------------------------------------------------------
// Module files.

/// How a module file is compressed: `None` for a non-module, `Some(None)`
/// for a plain `.ko`, else the decompressor.
fn compression(file_name: &str) -> Option<Option<&'static str>> {
    if file_name.ends_with(".ko") {
        Some(None)
    } else if file_name.ends_with(".ko.xz") {
        Some(Some("xz"))
    } else if file_name.ends_with(".ko.zst") {
        Some(Some("zstd"))
    } else if file_name.ends_with(".ko.gz") {
        Some(Some("gzip"))
    } else {
        None
    }
}

/// The raw ELF bytes of the module at `path`: a `.ko` is read as is;
/// `.ko.xz`, `.ko.zst` and `.ko.gz` are piped through `xz -dc`, `zstd -dc`
/// and `gzip -dc` (the guest's `init_module` needs uncompressed data unless
/// the kernel was built with module decompression support).
pub(crate) fn decompress(path: &Path) -> Result<Vec<u8>, ModulesError> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match compression(file_name) {
        None => Err(ModulesError::UnknownCompression {
            path: path.to_path_buf(),
        }),
        Some(None) => fs::read(path).map_err(|source| ModulesError::Read {
            path: path.to_path_buf(),
            source,
        }),
        Some(Some(program)) => {
            // Fail on a missing input with the same error as a plain .ko,
            // rather than with the decompressor's message.
            if let Err(source) = fs::metadata(path) {
                return Err(ModulesError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
            let out = Command::new(program)
                .arg("-dc")
                .arg(path)
                .stdin(Stdio::null())
                .output()
                .map_err(|source| {
                    let path = path.to_path_buf();
                    if source.kind() == io::ErrorKind::NotFound {
                        ModulesError::ProgramMissing {
                            program,
                            path,
                            source,
                        }
                    } else {
                        ModulesError::Spawn {
                            program,
                            path,
                            source,
                        }
                    }
                })?;
            if !out.status.success() {
                return Err(ModulesError::Decompress {
                    program,
                    path: path.to_path_buf(),
                    status: out.status,
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=` list of the module at `path` (compressed or not): the
/// names of the modules it needs, as the build recorded them.
pub(crate) fn module_depends(path: &Path) -> Result<Vec<String>, ModulesError> {
    let elf = decompress(path)?;
    let modinfo = modinfo_section(&elf).map_err(|reason| ModulesError::Modinfo {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(modinfo
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect())
}

/// The contents of the `.modinfo` section of an ELF file (32 or 64 bit,
/// either byte order).
fn modinfo_section(elf: &[u8]) -> Result<&[u8], String> {
    if elf.len() < 0x34 || &elf[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    let is64 = match elf[4] {
        1 => false,
        2 => true,
        c => return Err(format!("bad ELF class {c}")),
    };
    let le = match elf[5] {
        1 => true,
        2 => false,
        d => return Err(format!("bad ELF byte order {d}")),
    };
    let uint = |off: usize, size: usize| -> Result<u64, String> {
        let b = elf
            .get(off..off + size)
            .ok_or_else(|| format!("truncated at offset {off:#x}"))?;
        let mut v = 0u64;
        for i in 0..size {
            let byte = if le { b[size - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        Ok(v)
    };
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| format!("offset {v:#x} too large"));
    // (e_shoff, e_shentsize, e_shnum, e_shstrndx) and, within a section
    // header, (sh_offset, sh_size) with their widths.
    let (shoff, shentsize, shnum, shstrndx) = if is64 {
        (
            uint(0x28, 8)?,
            uint(0x3a, 2)?,
            uint(0x3c, 2)?,
            uint(0x3e, 2)?,
        )
    } else {
        (
            uint(0x20, 4)?,
            uint(0x2e, 2)?,
            uint(0x30, 2)?,
            uint(0x32, 2)?,
        )
    };
    let (off_at, size_at, width) = if is64 {
        (0x18, 0x20, 8)
    } else {
        (0x10, 0x14, 4)
    };
    let (shoff, shentsize) = (to_usize(shoff)?, to_usize(shentsize)?);
    let section = |i: u64| -> Result<(u64, &[u8]), String> {
        let hdr = shoff + to_usize(i)? * shentsize;
        let name = uint(hdr, 4)?;
        let off = to_usize(uint(hdr + off_at, width)?)?;
        let size = to_usize(uint(hdr + size_at, width)?)?;
        let data = off
            .checked_add(size)
            .and_then(|end| elf.get(off..end))
            .ok_or_else(|| format!("section {i} out of bounds"))?;
        Ok((name, data))
    };
    let (_, strtab) = section(shstrndx)?;
    for i in 0..shnum {
        let (name, data) = section(i)?;
        let name = strtab.get(to_usize(name)?..).unwrap_or(&[]);
        if name.starts_with(b".modinfo\0") {
            return Ok(data);
        }
    }
    Err("no .modinfo section".into())
}

fn read_text(path: &Path) -> Result<String, ModulesError> {
    fs::read_to_string(path).map_err(|source| ModulesError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
    }

    /// Skips (locally, printing why) or fails (in CI).
    fn unavailable<T>(what: &str) -> Option<T> {
        if in_ci() {
            panic!("prerequisite missing in CI: {what}");
        }
        eprintln!("SKIP: {what}");
        None
    }

    /// $MKT_TEST_CACHE, else $XDG_CACHE_HOME or ~/.cache, + mkt-test/v1 (as
    /// tests/fixtures/prepare.sh and tests/common do).
    fn fixture_cache() -> PathBuf {
        if let Some(p) = std::env::var_os("MKT_TEST_CACHE") {
            return PathBuf::from(p);
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
            });
        base.join("mkt-test/v1")
    }

    fn fixture(name: &str, marker: &str) -> Option<PathBuf> {
        let p = fixture_cache().join(name);
        if p.join(marker).exists() {
            Some(p)
        } else {
            unavailable(&format!(
                "fixture {} (run tests/fixtures/prepare.sh)",
                p.join(marker).display()
            ))
        }
    }

    const WANTED: [&str; 10] = [
        "virtio_pci",
        "9p",
        "9pnet_virtio",
        "virtio_console",
        "overlay",
        "virtiofs",
        "virtio_net",
        "virtio_rng",
        "vsock",
        "vmw_vsock_virtio_transport",
    ];

    fn paths(v: &[&str]) -> Vec<PathBuf> {
        v.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn resolve_text_orders_dependencies_first() {
        // As depmod writes it: each module's full closure, the deepest last.
        let dep = "\
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz kernel/fs/fscache/fscache.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/fs/netfs/netfs.ko.xz: kernel/fs/fscache/fscache.ko.xz
kernel/fs/fscache/fscache.ko.xz:
kernel/drivers/virtio/virtio.ko.xz:
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
";
        let builtin = "kernel/fs/overlayfs/overlay.ko\nkernel/drivers/virtio/virtio_pci.ko\n";
        let plan = resolve_text(
            dep,
            builtin,
            &[
                "9p",
                "9pnet-virtio",
                "overlay",
                "virtio_rng",
                "virtio-pci",
                "nosuch",
                "9p",
            ],
        );
        assert_eq!(
            plan.needed,
            paths(&[
                "kernel/fs/fscache/fscache.ko.xz",
                "kernel/fs/netfs/netfs.ko.xz",
                "kernel/net/9p/9pnet.ko.xz",
                "kernel/fs/9p/9p.ko.xz",
                "kernel/drivers/virtio/virtio.ko.xz",
                "kernel/drivers/virtio/virtio_ring.ko.xz",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/drivers/char/hw_random/virtio-rng.ko.xz",
            ])
        );
        assert_eq!(plan.builtin, ["overlay", "virtio-pci"]);
        assert_eq!(plan.absent, ["nosuch"]);
    }

    #[test]
    fn resolve_text_order_does_not_depend_on_listing_order() {
        // Direct deps only, listed shallowest first, and a cycle.
        let dep = "a.ko: b.ko\nb.ko: c.ko\nc.ko:\nx.ko: y.ko\ny.ko: x.ko\n";
        let plan = resolve_text(dep, "", &["a", "x"]);
        assert_eq!(
            plan.needed,
            paths(&["c.ko", "b.ko", "a.ko", "y.ko", "x.ko"])
        );
        assert!(plan.builtin.is_empty() && plan.absent.is_empty());
    }

    fn fake_tree(order: &str, built: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        fs::create_dir_all(t.join("include/config")).unwrap();
        fs::write(t.join("include/config/kernel.release"), "6.9.0-rc1+\n").unwrap();
        fs::write(t.join("modules.order"), order).unwrap();
        fs::write(t.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        for m in built {
            let p = t.join(m);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"\x7fELF").unwrap();
        }
        dir
    }

    #[test]
    fn tree_modules_maps_o_to_ko_and_reports_missing() {
        let dir = fake_tree(
            "drivers/net/dummy.o\nfs/fuse/fuse.ko\nnet/9p/9pnet.o\n\ndrivers/net/dummy.o\nkernel/kheaders.o\n",
            &[
                "drivers/net/dummy.ko",
                "fs/fuse/fuse.ko",
                "kernel/kheaders.ko",
            ],
        );
        let t = dir.path();
        let tm = tree_modules(t).unwrap();
        assert_eq!(tm.release, "6.9.0-rc1+");
        assert_eq!(
            tm.modules,
            paths(&[
                "drivers/net/dummy.ko",
                "fs/fuse/fuse.ko",
                "kernel/kheaders.ko"
            ])
        );
        assert_eq!(tm.missing, paths(&["net/9p/9pnet.ko"]));
        assert_eq!(tm.extra_files, ["modules.order", "modules.builtin"]);
        assert_eq!(
            installed_modules_order(&tm),
            "kernel/drivers/net/dummy.ko\nkernel/fs/fuse/fuse.ko\nkernel/kernel/kheaders.ko\n"
        );

        let plan = link_plan(&tm, t);
        let l = |s: &str| PathBuf::from(s);
        let want = vec![
            (
                l("/lib/modules/6.9.0-rc1+/kernel/drivers/net/dummy.ko"),
                t.join("drivers/net/dummy.ko"),
            ),
            (
                l("/lib/modules/6.9.0-rc1+/kernel/fs/fuse/fuse.ko"),
                t.join("fs/fuse/fuse.ko"),
            ),
            (
                l("/lib/modules/6.9.0-rc1+/kernel/kernel/kheaders.ko"),
                t.join("kernel/kheaders.ko"),
            ),
            (
                l("/lib/modules/6.9.0-rc1+/modules.order"),
                t.join("modules.order"),
            ),
            (
                l("/lib/modules/6.9.0-rc1+/modules.builtin"),
                t.join("modules.builtin"),
            ),
            (l("/lib/modules/6.9.0-rc1+/build"), t.to_path_buf()),
            (l("/lib/modules/6.9.0-rc1+/source"), t.to_path_buf()),
            (l("/boot/System.map-6.9.0-rc1+"), t.join("System.map")),
            (l("/boot/config-6.9.0-rc1+"), t.join(".config")),
            (
                l("/boot/vmlinuz-6.9.0-rc1+"),
                t.join(crate::arch::HOST.image),
            ),
        ];
        assert_eq!(plan, want);
    }

    #[test]
    fn tree_modules_old_style_order_and_no_modules() {
        // Linux 6.1: `.ko` lines. Pre-5.x: a `kernel/` prefix.
        let dir = fake_tree("kernel/drivers/net/dummy.ko\n", &["drivers/net/dummy.ko"]);
        assert_eq!(
            tree_modules(dir.path()).unwrap().modules,
            paths(&["drivers/net/dummy.ko"])
        );

        // CONFIG_MODULES=n: no modules.order, no modules, no error.
        fs::remove_file(dir.path().join("modules.order")).unwrap();
        let tm = tree_modules(dir.path()).unwrap();
        assert!(tm.modules.is_empty() && tm.missing.is_empty());
        assert_eq!(tm.extra_files, ["modules.builtin"]);
    }

    #[test]
    fn tree_modules_names_the_missing_release_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = tree_modules(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "not a built kernel tree: {}/include/config/kernel.release missing (run make first)",
                dir.path().display()
            )
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn module_names_normalise() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz"),
            "virtio_rng"
        );
        assert_eq!(module_name("9p.ko"), "9p");
        assert_eq!(module_name("kernel/fs/x.ko.zst"), "x");
        assert_eq!(
            normalize_name(" vmw-vsock_virtio-transport "),
            "vmw_vsock_virtio_transport"
        );
    }

    #[test]
    fn decompress_plain_gzip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ko = dir.path().join("a.ko");
        fs::write(&ko, b"\x7fELF raw").unwrap();
        assert_eq!(decompress(&ko).unwrap(), b"\x7fELF raw");

        let err = decompress(&dir.path().join("a.txt")).unwrap_err();
        assert!(
            matches!(err, ModulesError::UnknownCompression { .. }),
            "{err}"
        );
        let err = decompress(&dir.path().join("gone.ko.xz")).unwrap_err();
        assert!(matches!(err, ModulesError::Read { .. }), "{err}");

        // A corrupt .xz names the program.
        let bad = dir.path().join("bad.ko.xz");
        fs::write(&bad, b"not xz").unwrap();
        match decompress(&bad) {
            Err(ModulesError::Decompress { program, .. }) => assert_eq!(program, "xz"),
            Err(ModulesError::ProgramMissing { .. }) if !in_ci() => {
                eprintln!("SKIP: xz not installed")
            }
            other => panic!("unexpected: {other:?}"),
        }

        for (program, suffix) in [("gzip", "gz"), ("xz", "xz"), ("zstd", "zst")] {
            let path = dir.path().join(format!("m.ko.{suffix}"));
            let status = Command::new(program)
                .arg("-c")
                .arg(&ko)
                .stdout(fs::File::create(&path).unwrap())
                .stderr(Stdio::null())
                .status();
            match status {
                Ok(s) if s.success() => assert_eq!(decompress(&path).unwrap(), b"\x7fELF raw"),
                _ => {
                    let _: Option<()> = unavailable(&format!("{program} not installed"));
                }
            }
        }
    }

    #[test]
    fn modinfo_of_a_minimal_elf() {
        // ELF64 LE: header, then .modinfo data, .shstrtab data, 3 section headers.
        let modinfo = b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_pci\0";
        let strtab = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let mi_off = elf.len();
        elf.extend_from_slice(modinfo);
        let st_off = elf.len();
        elf.extend_from_slice(strtab);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        elf.extend(sh(0, 0, 0));
        elf.extend(sh(1, mi_off, modinfo.len()));
        elf.extend(sh(10, st_off, strtab.len()));
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(modinfo_section(&elf).unwrap(), modinfo);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("virtio_pci.ko");
        fs::write(&p, &elf).unwrap();
        assert_eq!(module_depends(&p).unwrap(), ["virtio", "virtio_ring"]);
        assert!(modinfo_section(b"not an elf file at all, not at all, not at all......").is_err());
    }

    /// Every module's `depends=` comes before it in `plan.needed`.
    /// Recreates `src` at `dst` with hard links (copies across file systems).
    fn mirror(src: &Path, dst: &Path) {
        fs::create_dir_all(dst).unwrap();
        for e in fs::read_dir(src).unwrap().flatten() {
            let (from, to) = (e.path(), dst.join(e.file_name()));
            if e.file_type().unwrap().is_dir() {
                mirror(&from, &to);
            } else if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).unwrap();
            }
        }
    }

    fn assert_load_order(dir: &Path, plan: &ModulePlan) {
        let names: Vec<String> = plan
            .needed
            .iter()
            .map(|p| module_name(&p.to_string_lossy()))
            .collect();
        for (i, p) in plan.needed.iter().enumerate() {
            for dep in module_depends(&dir.join(p)).unwrap() {
                let j = names.iter().position(|n| *n == normalize_name(&dep));
                assert!(
                    j.is_some_and(|j| j < i),
                    "{} needs {dep}, which does not come before it in {:#?}",
                    p.display(),
                    plan.needed
                );
            }
        }
    }

    /// The cloud kernel's package has no modules.dep: resolving through each
    /// module's .modinfo must agree with resolving through the modules.dep
    /// that depmod would write.
    #[test]
    fn resolve_without_modules_dep_agrees_with_depmod() {
        let Some(root) = fixture("cloud-kernel", ".complete") else {
            return;
        };
        let Some(dir) = cloud_modules_dir(&root) else {
            return;
        };
        // The fixture has a modules.dep (prepare.sh runs depmod); a view of
        // the same modules without it exercises the .modinfo path.
        let view = tempfile::tempdir().unwrap();
        mirror(&dir.join("kernel"), &view.path().join("kernel"));
        fs::copy(
            dir.join("modules.builtin"),
            view.path().join("modules.builtin"),
        )
        .unwrap();
        let release = dir.file_name().unwrap().to_string_lossy().into_owned();
        // `depmod -n` prints modules.dep first, then files headed by `#`.
        let out = match Command::new("depmod")
            .arg("-n")
            .arg("-b")
            .arg(root.join("root"))
            .arg(&release)
            .stderr(Stdio::inherit())
            .output()
        {
            Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
            _ => {
                let _: Option<()> = unavailable("depmod (kmod) not installed or failed");
                return;
            }
        };
        let modules_dep: String = out
            .lines()
            .take_while(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap();
        let via_depmod = resolve_text(&modules_dep, &builtin, &WANTED);
        let via_modinfo = resolve(view.path(), &WANTED).unwrap();
        assert_load_order(&dir, &via_depmod);
        assert_load_order(&dir, &via_modinfo);
        let sorted = |v: &[PathBuf]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        assert_eq!(sorted(&via_depmod.needed), sorted(&via_modinfo.needed));
        assert_eq!(via_depmod.builtin, via_modinfo.builtin);
        assert_eq!(via_depmod.absent, via_modinfo.absent);
    }

    fn cloud_modules_dir(root: &Path) -> Option<PathBuf> {
        let mods = root.join("root/lib/modules");
        let mut dirs: Vec<PathBuf> = fs::read_dir(&mods)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        dirs.sort();
        match dirs.pop() {
            Some(d) => Some(d),
            None => unavailable(&format!("no kernel release under {}", mods.display())),
        }
    }

    /// Debian's cloud kernel: which of the modules mkt wants it has and
    /// in which order they load.
    #[test]
    fn cloud_kernel_plan() {
        let Some(root) = fixture("cloud-kernel", ".complete") else {
            return;
        };
        let Some(dir) = cloud_modules_dir(&root) else {
            return;
        };
        let plan = resolve(&dir, &WANTED).unwrap();
        eprintln!("{}: {plan:#?}", dir.display());
        for p in &plan.needed {
            assert!(dir.join(p).is_file(), "{} does not exist", p.display());
        }
        assert_load_order(&dir, &plan);
        let pos = |name: &str| {
            plan.needed
                .iter()
                .position(|p| module_name(&p.to_string_lossy()) == name)
                .unwrap_or_else(|| panic!("{name} not in {:#?}", plan.needed))
        };
        // Every module once.
        let mut names: Vec<_> = plan
            .needed
            .iter()
            .map(|p| module_name(&p.to_string_lossy()))
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), plan.needed.len());

        let config = fs::read_to_string(root.join("root/boot").join(format!(
            "config-{}",
            dir.file_name().unwrap().to_string_lossy()
        )))
        .unwrap_or_default();
        if config.contains("CONFIG_NET_9P=m") {
            // Kernels with 9p as a module: 9pnet before 9p and 9pnet_virtio,
            // netfs (6.x) before 9p.
            assert!(pos("9pnet") < pos("9p"));
            assert!(pos("9pnet") < pos("9pnet_virtio"));
            assert!(pos("virtio_ring") < pos("9pnet_virtio"));
            if names.iter().any(|n| n == "netfs") {
                assert!(pos("netfs") < pos("9p"));
            }
        } else {
            // Debian bookworm's cloud kernel: "# CONFIG_NET_9P is not set".
            assert_eq!(plan.absent, ["9p", "9pnet_virtio"], "{plan:#?}");
        }
        // virtiofs (the shared-directory path this kernel supports).
        assert!(pos("fuse") < pos("virtiofs"));
        assert!(pos("virtio") < pos("virtiofs") && pos("virtio_ring") < pos("virtiofs"));
        assert!(pos("virtio") < pos("virtio_pci"));
        assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
        assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
        assert!(pos("net_failover") < pos("virtio_net"));
        assert!(pos("failover") < pos("net_failover"));
        pos("overlay");
        pos("virtio_console");
        pos("virtio_rng");
        for p in &plan.needed {
            let raw = decompress(&dir.join(p)).unwrap();
            assert_eq!(&raw[..4], b"\x7fELF");
        }
    }

    /// The fixture kernel tree (tinyconfig + vm.config; CONFIG_DUMMY=m).
    #[test]
    fn fixture_tree_modules() {
        let Some(tree) = fixture("linux", crate::arch::HOST.image) else {
            return;
        };
        let tm = tree_modules(&tree).unwrap();
        assert!(tm.release.starts_with("6."), "{}", tm.release);
        assert!(tm.missing.is_empty(), "not built: {:?}", tm.missing);
        assert!(
            tm.modules.contains(&PathBuf::from("drivers/net/dummy.ko")),
            "{:?}",
            tm.modules
        );
        for (link, target) in link_plan(&tm, &tree) {
            assert!(link.is_absolute());
            assert!(
                target.exists(),
                "{} -> {} missing",
                link.display(),
                target.display()
            );
        }
    }
}
