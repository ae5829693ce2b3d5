//! `mkt run`: resolve the kernel and rootfs, generate the guest files and
//! initramfs into a private run directory, start QEMU, relay the command's
//! output and exit status, and tear everything down whatever happens.

use crate::config::{Config, Paths, Setup};
use crate::guest::{self, FsKind as GFs, GuestMount, GuestUser, Mode, PlanInput, RootfsEtc};
use crate::host::{self, kvm};
use crate::instance::{self, RunDir};
use crate::net;
use crate::qemu::{self, Console, FsKind, Net, Port, Profile, Share, VmSpec};
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--virt {virt}: the kernel lacks {option} (build it with {option}=m)")]
    NoSoftRdma { virt: String, option: &'static str },
    #[error(transparent)]
    Rootfs(#[from] crate::rootfs::resolve::ResolveError),
    #[error("cannot serve {} with its owners", .0.display())]
    Owners(PathBuf, #[source] crate::ns::IdsError),
    #[error(
        "--kernel {0}: neither a built kernel tree (arch/x86/boot/bzImage) nor a kernel image file"
    )]
    BadKernel(PathBuf),
    #[error(
        "no kernel: --kernel not given, no kernel in the config, the current directory is not a built kernel tree, and {0}/boot has no vmlinuz-*"
    )]
    NoKernel(PathBuf),
    #[error("kernel tree {0}")]
    Modules(PathBuf, #[source] guest::modules::ModulesError),
    #[error("cannot read the kernel release from {0} (pass --modules DIR to name the modules)")]
    NoRelease(PathBuf),
    #[error("the kernel needs module {name} to boot, and {dir} does not have it")]
    MissingBootModule { name: String, dir: PathBuf },
    #[error("--boot-script {0}: {1}")]
    BootScript(PathBuf, String),
    #[error("setup {0:?} is not in the config{1}")]
    NoSetup(String, String),
    #[error("--profile")]
    Profile(#[source] qemu::ProfileError),
    #[error("cannot prepare the run directory")]
    RunDir(#[source] instance::InstanceError),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] io::Error),
    #[error("{0}")]
    Io(String, #[source] io::Error),
    /// `nine_p`: the kernel can mount 9p, so `--fs 9p` is a way out.
    #[error("virtiofs needs virtiofsd, which is not installed (see `mkt doctor`; ./install.sh installs it){}",
        if *.nine_p { ", or use --fs 9p" } else { "; this kernel has no 9p, so virtiofs is the only way to share the rootfs" })]
    NoVirtiofsd { nine_p: bool },
    #[error("virtiofsd for {0} did not start: {1}")]
    Virtiofsd(PathBuf, String),
    #[error("QEMU is not installed (qemu-system-x86_64 not found; see `mkt doctor`)")]
    NoQemu,
    #[error("the guest ended without reporting the command's exit status ({qemu}){}\nconsole log: {}", last_lines(.console), .log.display())]
    NoStatus {
        qemu: String,
        console: String,
        log: PathBuf,
    },
    #[error(
        "the kernel command line would be {len} bytes, but {} takes at most {limit}: shorten --append (the kernel would cut it, and the guest hang)", .kernel.display()
    )]
    CmdlineTooLong {
        len: usize,
        limit: usize,
        kernel: PathBuf,
    },
    #[error("{0}")]
    Qemu(String),
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
    #[error("{0}: {1}")]
    Invalid(String, String),
    #[error(transparent)]
    Vfio(#[from] crate::vfio::VfioError),
    #[error(transparent)]
    Net(#[from] net::NetError),
}

fn last_lines(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    let tail = &lines[lines.len().saturating_sub(25)..];
    let panic = lines.iter().find(|l| l.contains("Kernel panic"));
    let mut s = String::new();
    if let Some(p) = panic {
        s += &format!("\n{}", p.trim());
    }
    if !tail.is_empty() {
        s += "\nlast console lines:\n";
        s += &tail.join("\n");
    }
    s
}

/// What `mkt run` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub setup: Option<String>,
    pub rootfs: Option<String>,
    pub kernel: Option<PathBuf>,
    pub modules: Option<PathBuf>,
    pub command: Vec<String>,
    pub fs: Option<String>,
    pub accel: Option<kvm::Accel>,
    pub cpus: Option<u32>,
    pub mem_mib: Option<u64>,
    pub append: Vec<String>,
    pub qemu_args: Vec<String>,
    pub dirs: Vec<PathBuf>,
    pub gdb_port: Option<u16>,
    pub ssh_port: Option<u16>,
    pub net_none: bool,
    /// `--net`: nat, none, tap, bridge, bridge=BR [default: the setup's, nat].
    pub net: Option<String>,
    /// Host PCI functions to pass through, added to the setup's.
    pub pci: Vec<String>,
    /// Size of the NVMe scratch disk in MiB.
    pub nvme_mib: Option<u64>,
    /// `--virt`: soft RDMA devices, added to the setup's.
    pub virt: Vec<String>,
    pub profile: Option<String>,
    pub boot_script: Option<PathBuf>,
    pub init: Option<String>,
    pub keep: bool,
    /// Start another VM even when the setup is already running.
    pub new: bool,
    pub dry_run: bool,
    pub quiet: bool,
    pub verbose: bool,
}

/// The kernel to boot and how its modules reach the guest.
#[derive(Debug, Clone, PartialEq)]
pub enum Kernel {
    /// A built tree: bzImage, modules linked from the tree.
    Tree { tree: PathBuf, release: String },
    /// An image file with its modules dir (a distro kernel).
    Image {
        image: PathBuf,
        release: String,
        modules: Option<PathBuf>,
    },
}

impl Kernel {
    pub fn image(&self) -> PathBuf {
        match self {
            Kernel::Tree { tree, .. } => tree.join("arch/x86/boot/bzImage"),
            Kernel::Image { image, .. } => image.clone(),
        }
    }
}

/// The release string in a bzImage's header (the "kernel_version" field).
pub fn bzimage_release(data: &[u8]) -> Option<String> {
    // Boot protocol: "HdrS" at 0x202; kernel_version pointer at 0x20e,
    // relative to 0x200.
    if data.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes([*data.get(0x20e)?, *data.get(0x20f)?]) as usize + 0x200;
    let s = data.get(off..off + 256)?;
    let end = s.iter().position(|&b| b == 0 || b == b' ')?;
    String::from_utf8(s[..end].to_vec()).ok()
}

fn is_kernel_tree(dir: &Path) -> bool {
    dir.join("arch/x86/boot/bzImage").is_file() && dir.join("Kbuild").exists()
}

/// --kernel, else the setup's or config's kernel, else the current
/// directory when it is a built tree, else the rootfs's own newest kernel.
pub fn resolve_kernel(
    explicit: Option<&Path>,
    modules: Option<&Path>,
    cwd: &Path,
    rootfs: &Path,
) -> Result<Kernel, RunError> {
    let tree = |t: &Path| -> Result<Kernel, RunError> {
        let tm = guest::modules::tree_modules(t).map_err(|e| RunError::Modules(t.into(), e))?;
        Ok(Kernel::Tree {
            tree: t.to_path_buf(),
            release: tm.release,
        })
    };
    let image = |img: &Path, modules: Option<&Path>, root: Option<&Path>| {
        let data = std::fs::read(img)
            .map_err(|e| RunError::Io(format!("cannot read {}", img.display()), e))?;
        let release = bzimage_release(&data)
            .or_else(|| {
                img.file_name()?
                    .to_str()?
                    .strip_prefix("vmlinuz-")
                    .map(str::to_string)
            })
            .ok_or_else(|| RunError::NoRelease(img.into()))?;
        let modules = modules.map(Path::to_path_buf).or_else(|| {
            let d = root?.join("lib/modules").join(&release);
            d.is_dir().then_some(d)
        });
        Ok(Kernel::Image {
            image: img.to_path_buf(),
            release,
            modules,
        })
    };
    if let Some(k) = explicit {
        if k.is_dir() {
            if k.join("arch/x86/boot/bzImage").is_file() {
                return tree(k);
            }
            return Err(RunError::BadKernel(k.into()));
        }
        if k.is_file() {
            return image(k, modules, None);
        }
        return Err(RunError::BadKernel(k.into()));
    }
    if is_kernel_tree(cwd) {
        return tree(cwd);
    }
    let boot = rootfs.join("boot");
    let mut images: Vec<PathBuf> = std::fs::read_dir(&boot)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vmlinuz-"))
                })
                .collect()
        })
        .unwrap_or_default();
    images.sort();
    match images.last() {
        Some(img) => image(img, modules, Some(rootfs)),
        None => Err(RunError::NoKernel(rootfs.into())),
    }
}

/// Modules a distro kernel needs before it can mount the root and talk to mkt.
/// virtio_mmio is the transport on microvm (`--profile microvm`); `button`
/// (the ACPI power button) lets the init act on `mkt stop`'s power-off.
pub const BOOT_MODULES: &[&str] = &[
    "button",
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "virtiofs",
    "overlay",
];

/// The boot modules for a run over `fs` on `bus`: without the other
/// transport's (a kernel with both as modules would load 9p, 9pnet, netfs
/// and fscache for nothing on a virtiofs run: ~30 ms each under TCG), and
/// without virtio_mmio on a PCI machine (it has no virtio-mmio devices).
pub fn boot_module_names(fs: GFs, bus: qemu::Bus) -> Vec<&'static str> {
    let other: &[&str] = match fs {
        GFs::NineP => &["virtiofs"],
        GFs::Virtiofs => &["9pnet_virtio", "9p"],
    };
    BOOT_MODULES
        .iter()
        .copied()
        .filter(|m| !other.contains(m))
        .filter(|m| *m != "virtio_mmio" || bus == qemu::Bus::Mmio)
        .collect()
}

/// The modules to pack into the initramfs, decompressed.
fn boot_modules(
    kernel: &Kernel,
    fs: GFs,
    bus: qemu::Bus,
) -> Result<Vec<guest::initramfs::BootModule>, RunError> {
    let Kernel::Image {
        modules: Some(dir), ..
    } = kernel
    else {
        return Ok(Vec::new());
    };
    let plan = guest::modules::resolve(dir, &boot_module_names(fs, bus))
        .map_err(|e| RunError::Modules(dir.clone(), e))?;
    let fs_modules: &[&str] = match fs {
        GFs::NineP => &["9p", "9pnet_virtio"],
        GFs::Virtiofs => &["virtiofs"],
    };
    for &must in fs_modules.iter().chain(&["overlay", "virtio_console"]) {
        if plan.absent.iter().any(|a| a.replace('-', "_") == must) {
            return Err(RunError::MissingBootModule {
                name: must.into(),
                dir: dir.clone(),
            });
        }
    }
    plan.needed
        .iter()
        .map(|rel| {
            let data = guest::modules::decompress(&dir.join(rel))
                .map_err(|e| RunError::Modules(dir.clone(), e))?;
            let base = rel.file_name().and_then(|n| n.to_str()).unwrap_or("m.ko");
            let name = base.split(".ko").next().unwrap_or(base).to_string() + ".ko";
            Ok(guest::initramfs::BootModule { name, data })
        })
        .collect()
}

/// `guest` with its first component replaced by that component's target
/// when it is a relative link in `tree` (merged /usr: /lib -> usr/lib).
/// The init makes each generated file and link with several path walks,
/// and a shared root answers each walk through such a link with a
/// round trip to the file server (the guest caches no symlink targets on
/// virtiofs): ~100 READLINKs of /lib in a kernel tree's boot before.
pub fn through_tree_link(tree: &Path, guest: &Path) -> PathBuf {
    use std::path::Component;
    let mut parts = guest.components();
    let (Some(Component::RootDir), Some(Component::Normal(first))) = (parts.next(), parts.next())
    else {
        return guest.to_path_buf();
    };
    match std::fs::read_link(tree.join(first)) {
        Ok(t) if t.components().all(|c| matches!(c, Component::Normal(_))) => {
            Path::new("/").join(t).join(parts.as_path())
        }
        _ => guest.to_path_buf(),
    }
}

/// A free TCP port on 127.0.0.1 (the kernel picks it).
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn read_etc(rootfs: &Path) -> RootfsEtc {
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).ok();
    RootfsEtc {
        passwd: read("etc/passwd").unwrap_or_else(|| "root:x:0:0:root:/root:/bin/sh\n".into()),
        group: read("etc/group").unwrap_or_else(|| "root:x:0:\n".into()),
        shadow: read("etc/shadow"),
        sudoers_readable: std::fs::File::open(rootfs.join("etc/sudoers")).is_ok(),
        has_sudo: rootfs.join("usr/bin/sudo").exists(),
        has_sshd: rootfs.join("usr/sbin/sshd").exists(),
    }
}

/// Everything prepared for one boot, before anything is started.
pub struct Prepared {
    pub spec: VmSpec,
    pub files: guest::Generated,
    pub initrd: Vec<u8>,
    pub accel_note: Option<String>,
    pub exec: bool,
    /// The virtiofsd binary when shares go over virtiofs.
    pub virtiofsd: Option<PathBuf>,
    /// The id map the root share's virtiofsd runs under (a tree with
    /// subordinate-id owners), else the caller's own ids.
    pub root_ids: Option<crate::ns::Ids>,
    pub user: String,
    pub rootfs: PathBuf,
    pub net_mode: net::Mode,
    /// The NVMe disk's size, when there is one (the file is made at run).
    pub nvme_mib: Option<u64>,
    /// The guest says on a port when its sshd listens.
    pub ssh_reports_ready: bool,
}

/// A guest file system a kernel may lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guestfs {
    NineP,
    Virtiofs,
}

/// Whether the kernel has `option` (=y or =m), from the tree's .config or
/// an image's config-RELEASE (next to its modules or in the rootfs's
/// /boot); None when no config says.
pub fn kernel_option(kernel: &Kernel, rootfs: &Path, option: &str) -> Option<bool> {
    let text = match kernel {
        Kernel::Tree { tree, .. } => std::fs::read_to_string(tree.join(".config")).ok()?,
        Kernel::Image {
            release, modules, ..
        } => {
            let name = format!("config-{release}");
            let mut places = vec![rootfs.join("boot").join(&name)];
            if let Some(m) = modules
                && let Some(root) = m.ancestors().nth(3)
            {
                // .../lib/modules/REL → .../boot/config-REL
                places.push(root.join("boot").join(&name));
            }
            places
                .iter()
                .find_map(|p| std::fs::read_to_string(p).ok())?
        }
    };
    Some(
        text.lines()
            .any(|l| l == format!("{option}=y") || l == format!("{option}=m")),
    )
}

/// Whether the kernel can mount `fs` (built in or as a module); true when
/// it cannot be told (an image without modules).
pub fn kernel_has(kernel: &Kernel, fs: Guestfs) -> bool {
    let (option, module) = match fs {
        Guestfs::NineP => ("CONFIG_9P_FS", "9p"),
        Guestfs::Virtiofs => ("CONFIG_VIRTIO_FS", "virtiofs"),
    };
    match kernel {
        Kernel::Tree { tree, .. } => std::fs::read_to_string(tree.join(".config"))
            .map(|c| {
                c.lines()
                    .any(|l| l == format!("{option}=y") || l == format!("{option}=m"))
            })
            .unwrap_or(true),
        Kernel::Image {
            modules: Some(dir), ..
        } => guest::modules::resolve(dir, &[module])
            .map(|p| p.absent.is_empty())
            .unwrap_or(true),
        Kernel::Image { .. } => true,
    }
}

/// Resolves and generates everything, with no side effect but reading.
#[allow(clippy::too_many_lines)] // still to be split (the structure issue)
pub fn prepare(
    opts: &RunOptions,
    config: &Config,
    paths: &Paths,
    run_dir: &Path,
) -> Result<Prepared, RunError> {
    let setup_name = opts.setup.clone().or_else(|| config.defaults.setup.clone());
    let setup: Setup = match &setup_name {
        Some(n) => config.setups.get(n).cloned().ok_or_else(|| {
            let known: Vec<_> = config.setups.keys().cloned().collect();
            let mut detail = config
                .file
                .as_ref()
                .map(|f| format!(" {} (known: {})", f.display(), known.join(", ")))
                .unwrap_or_default();
            // `mkt run uname`: a command without `--` reads as a setup.
            if opts.setup.as_ref() == Some(n) && opts.command.is_empty() {
                detail +=
                    &format!("\n  to run a command in the guest, put it after --: mkt run -- {n}");
            }
            RunError::NoSetup(n.clone(), detail)
        })?,
        None => Setup::default(),
    };
    let wanted = crate::rootfs::resolve::wanted(opts.rootfs.as_deref(), Some(&setup), config);
    let first_use = crate::rootfs::resolve::FirstUse {
        dry_run: opts.dry_run,
        quiet: opts.quiet,
        verbose: opts.verbose,
    };
    let rootfs = crate::rootfs::resolve::resolve(paths, &wanted, first_use)?.path(paths);
    // A tree whose owners are shifted by the user's subordinate ids is
    // served from a user namespace with the same map, so the guest sees
    // its real owners (root's files as root's, setuid sudo working).
    let root_ids = match rootfs
        .parent()
        .filter(|p| *p == paths.rootfs_dir)
        .and_then(|_| rootfs.file_name())
        .and_then(|n| crate::rootfs::meta(paths, &n.to_string_lossy()))
        .map(|m| m.owners)
    {
        Some(crate::rootfs::Owners::Mapped) if !nix::unistd::geteuid().is_root() => {
            Some(crate::ns::Ids::for_owners().map_err(|e| RunError::Owners(rootfs.clone(), e))?)
        }
        _ => None,
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let kernel_arg = opts
        .kernel
        .clone()
        .or(setup.kernel.clone())
        .or(config.defaults.kernel.clone());
    let kernel = resolve_kernel(
        kernel_arg.as_deref(),
        opts.modules.as_deref(),
        &cwd,
        &rootfs,
    )?;
    let boot_script = match opts.boot_script.as_ref().or(setup.boot_script.as_ref()) {
        Some(script) => {
            check_boot_script(script)?;
            Some(
                std::fs::read(script)
                    .map_err(|e| RunError::BootScript(script.clone(), e.to_string()))?,
            )
        }
        None => None,
    };

    let (accel, accel_note) = kvm::choose(opts.accel.clone(), kvm::probe);
    // Passed through: --pci, the setup's pci, and the functions its guest
    // hands on to a nested guest (they must reach that guest first).
    let mut pci: Vec<String> = Vec::new();
    for a in opts.pci.iter().chain(&setup.pci).chain(&setup.nested_pci) {
        let bdf = crate::config::normalize_pci(a)
            .map_err(|e| RunError::Invalid(format!("--pci {a:?}"), e))?;
        if !pci.contains(&bdf) {
            pci.push(bdf);
        }
    }
    let num_vfs = setup.num_of_vfs.filter(|&n| n > 0 && !pci.is_empty());
    let explicit_profile = opts.profile.clone().or(setup.profile.clone());
    // Nested passthrough needs the guest's own IOMMU; SR-IOV needs PCIe
    // (the capability sits in extended config space): both get q35.
    let wants_iommu = !setup.nested_pci.is_empty() || num_vfs.is_some();
    let profile_name = explicit_profile.clone().unwrap_or_else(|| {
        if wants_iommu {
            "iommu"
        } else {
            qemu::DEFAULT_PROFILE
        }
        .to_string()
    });
    let user_profiles = paths.config_file.parent().map(|d| d.join("qemu-profiles"));
    let profile =
        Profile::load(&profile_name, user_profiles.as_deref()).map_err(RunError::Profile)?;
    let nvme_mib = match (opts.nvme_mib, &setup.nvme) {
        (Some(m), _) => Some(m),
        (None, Some(s)) => {
            Some(crate::config::parse_mem_mib(s).map_err(|e| RunError::Invalid("nvme".into(), e))?)
        }
        (None, None) => None,
    };
    if profile.bus == qemu::Bus::Mmio && (!pci.is_empty() || nvme_mib.is_some()) {
        return Err(RunError::Invalid(
            format!("profile {profile_name}"),
            "it has no PCI bus, which --pci and --nvme need (use the default or iommu profile)"
                .into(),
        ));
    }
    if num_vfs.is_some() && !qemu::is_pcie(&profile) {
        return Err(RunError::Invalid(
            "num_of_vfs".into(),
            format!(
                "SR-IOV needs a PCI Express machine, and profile {profile_name} is not one (use profile iommu)"
            ),
        ));
    }
    let net_mode = if opts.net_none {
        net::Mode::None
    } else {
        match opts.net.as_deref().or(setup.net.as_deref()) {
            Some(s) => {
                net::Mode::parse(s).map_err(|e| RunError::Invalid(format!("--net {s}"), e))?
            }
            None => net::Mode::Nat,
        }
    };
    let qemu_bin = host::probe::find_program("qemu-system-x86_64").ok_or(RunError::NoQemu)?;

    let have_virtiofsd = host::probe::find_program("virtiofsd").is_some();
    let fs = match opts.fs.as_deref() {
        Some("virtiofs") => GFs::Virtiofs,
        Some("9p") => {
            if root_ids.is_some() {
                tracing::warn!(
                    "9p shows {} with host ids (your subordinate ids), not its real owners; virtiofs shows them",
                    rootfs.display()
                );
            }
            GFs::NineP
        }
        _ if root_ids.is_some() && have_virtiofsd => GFs::Virtiofs,
        // Both boot equally fast; virtiofs is ~1.8x faster on file-heavy
        // work (docs/run.md, BENCHMARKS), so it is the default when it can be.
        _ if have_virtiofsd && kernel_has(&kernel, Guestfs::Virtiofs) => GFs::Virtiofs,
        _ if kernel_has(&kernel, Guestfs::NineP) => GFs::NineP,
        _ => GFs::Virtiofs,
    };
    let virtiofsd =
        match fs {
            GFs::Virtiofs => Some(host::probe::find_program("virtiofsd").ok_or_else(|| {
                RunError::NoVirtiofsd {
                    nine_p: kernel_has(&kernel, Guestfs::NineP),
                }
            })?),
            GFs::NineP => None,
        };
    let mut user = GuestUser::of(crate::host::user::current());
    user.shell = if rootfs.join("bin/bash").exists() {
        "/bin/bash".into()
    } else {
        "/bin/sh".into()
    };

    // Host dirs shared at the same path: home (rw), --dir and config dirs,
    // the kernel tree (ro) unless already inside one of them.
    let mut shared: Vec<(PathBuf, bool)> = vec![(user.home.clone(), false)];
    for d in opts
        .dirs
        .iter()
        .chain(&setup.dirs)
        .chain(&config.defaults.dirs)
    {
        let d = std::fs::canonicalize(d)
            .map_err(|e| RunError::Io(format!("--dir {}", d.display()), e))?;
        if !shared.iter().any(|(s, _)| d.starts_with(s)) {
            shared.push((d, false));
        }
    }
    let mut links = Vec::new();
    let mut depmod_release = None;
    let mut extra_files = Vec::new();
    match &kernel {
        Kernel::Tree { tree, release } => {
            let tree = std::fs::canonicalize(tree).unwrap_or(tree.clone());
            if !shared.iter().any(|(s, _)| tree.starts_with(s)) {
                shared.push((tree.clone(), true));
            }
            let tm = guest::modules::tree_modules(&tree)
                .map_err(|e| RunError::Modules(tree.clone(), e))?;
            links = guest::modules::link_plan(&tm, &tree);
            match host_depmod(&links, release, &paths.data_dir.join("depmod"), run_dir) {
                Some(files) => extra_files = files,
                None => depmod_release = Some(release.clone()),
            }
            extra_files.push(modules_boot_record(&links, release));
        }
        Kernel::Image {
            release,
            modules: Some(dir),
            ..
        } => {
            let dir = std::fs::canonicalize(dir).unwrap_or(dir.clone());
            let guest_dir = PathBuf::from("/lib/modules").join(release);
            // The rootfs's own modules (its own kernel) are there already;
            // compared canonically, as /lib is often a link to usr/lib.
            let in_rootfs = rootfs.join(guest_dir.strip_prefix("/").unwrap());
            if dir != std::fs::canonicalize(&in_rootfs).unwrap_or(in_rootfs) {
                links.push((guest_dir, dir.clone()));
                if !shared.iter().any(|(s, _)| dir.starts_with(s)) {
                    shared.push((dir, true));
                }
            }
        }
        Kernel::Image { .. } => {}
    }
    let mounts: Vec<GuestMount> = shared
        .iter()
        .enumerate()
        .map(|(i, (path, ro))| GuestMount {
            tag: format!("m{i}"),
            guest_path: path.clone(),
            readonly: *ro,
            kind: fs,
        })
        .collect();
    let cwd_in_guest = shared
        .iter()
        .any(|(s, _)| cwd.starts_with(s))
        .then(|| cwd.clone());

    let exec = !opts.command.is_empty();
    let mode = if exec {
        Mode::Exec(opts.command.clone())
    } else {
        interactive_mode(opts.init.as_deref(), &rootfs)
    };
    let net = net_mode != net::Mode::None;
    // A bridge normally has a DHCP server; a bare tap may never get one,
    // so the guest waits less before booting on without an address.
    let dhcp = match net_mode {
        net::Mode::Bridge(_) => Some(30),
        net::Mode::Tap => Some(5),
        _ => None,
    };
    let sriov = num_vfs.map(|n| {
        let sys = host_sysfs();
        let ids: Option<Vec<_>> = opts
            .pci
            .iter()
            .chain(&setup.pci)
            .filter_map(|a| crate::config::normalize_pci(a).ok())
            .map(|b| sys.ids(&b))
            .collect();
        guest::Sriov {
            num_vfs: n,
            ids: ids.unwrap_or_default(),
        }
    });
    let virt: Vec<guest::SoftRdma> = opts
        .virt
        .iter()
        .chain(&setup.virt)
        .filter_map(|v| crate::config::parse_virt(v).ok())
        .map(|(kind, netdev)| guest::SoftRdma {
            kind: kind.to_string(),
            netdev: netdev.to_string(),
        })
        .collect();
    for v in &virt {
        let option = if v.kind == "rxe" {
            "CONFIG_RDMA_RXE"
        } else {
            "CONFIG_RDMA_SIW"
        };
        if let Some(false) = kernel_option(&kernel, &rootfs, option) {
            return Err(RunError::NoSoftRdma {
                virt: format!("{}-{}", v.kind, v.netdev),
                option,
            });
        }
    }
    // Without the virtio-mmio transport the guest finds no root device and
    // hangs; say so before booting.
    if profile.bus == qemu::Bus::Mmio
        && kernel_option(&kernel, &rootfs, "CONFIG_VIRTIO_MMIO") == Some(false)
    {
        return Err(RunError::Invalid(
            format!("--profile {profile_name}"),
            format!(
                "the kernel {} lacks CONFIG_VIRTIO_MMIO, which microvm's devices need (build it with CONFIG_VIRTIO_MMIO=y, or use the default profile)",
                kernel.image().display()
            ),
        ));
    }
    let ssh_keys = if !exec && net && rootfs.join("usr/sbin/sshd").exists() {
        Some(ensure_ssh_keys(&paths.data_dir.join("ssh"))?)
    } else {
        None
    };
    let hostname = setup_name.clone().unwrap_or_else(|| "mkt".into());
    let term = if exec { None } else { host_terminal() };
    let relay_size = mode == Mode::Shell && term.is_some();
    // Written through the tree's own links (merged /usr: /lib -> usr/lib).
    let links: Vec<(PathBuf, PathBuf)> = links
        .into_iter()
        .map(|(l, t)| (through_tree_link(&rootfs, &l), t))
        .collect();
    for f in &mut extra_files {
        if let Some(d) = &f.dest {
            f.dest = Some(
                through_tree_link(&rootfs, Path::new(d))
                    .display()
                    .to_string(),
            );
        }
    }
    let input = PlanInput {
        mode,
        user,
        hostname,
        root: GuestMount {
            tag: "root".into(),
            guest_path: "/".into(),
            readonly: true,
            kind: fs,
        },
        mounts: mounts.clone(),
        cwd: cwd_in_guest,
        links,
        depmod_release,
        extra_files,
        etc: read_etc(&rootfs),
        ssh: match (&ssh_keys, net) {
            (Some(k), true) => Some(guest::SshSetup {
                authorized_key: k.client_pub.clone(),
                host_key: k.host_private.clone(),
            }),
            _ => None,
        },
        net,
        dhcp,
        sriov,
        virt,
        boot_script,
        term,
    };
    let files = guest::generate(&input);
    let initrd = guest::initramfs::build(&files, &boot_modules(&kernel, fs, profile.bus)?)
        .map_err(|e| RunError::Io("cannot build the initramfs".into(), e))?;

    let qfs = |tag: &str, path: &Path, ro: bool| Share {
        tag: tag.into(),
        path: path.into(),
        readonly: ro,
        kind: match fs {
            GFs::NineP => FsKind::NineP,
            GFs::Virtiofs => FsKind::Virtiofs {
                socket: run_dir.join(format!("vfs-{tag}.sock")),
            },
        },
    };
    let mut shares = vec![qfs("root", &rootfs, true)];
    shares.extend(
        mounts
            .iter()
            .map(|m| qfs(&m.tag, &m.guest_path, m.readonly)),
    );

    let mut append = vec!["console=ttyS0".to_string(), "panic=-1".into()];
    if exec && !opts.verbose {
        // Less serial output: under TCG every console byte costs time.
        append.push("quiet".into());
    }
    append.extend(opts.append.iter().cloned());
    if opts.gdb_port.is_some() {
        gdb_nokaslr(&mut append);
    }
    if let Some(w) = tsc_word(&profile, &accel, &append, host::tsc::khz) {
        append.insert(kernel_words_end(&append), w);
    }
    let mut ports = if exec {
        ["stdout", "stderr", "status"]
            .iter()
            .map(|n| Port {
                name: format!("mkt.{n}"),
                socket: run_dir.join(format!("{n}.sock")),
            })
            .collect()
    } else if relay_size {
        // The host terminal's new size after a resize (SIGWINCH), for the
        // init to set on the console: a serial line carries none.
        vec![Port {
            name: WINSIZE_PORT.into(),
            socket: run_dir.join("winsize.sock"),
        }]
    } else {
        Vec::new()
    };
    let mac = setup
        .mac
        .clone()
        .unwrap_or_else(|| net::mac_for(setup_name.as_deref().unwrap_or("mkt")));
    let net = match &net_mode {
        net::Mode::Tap => Net::Tap { fd: None, mac },
        // Without CAP_NET_ADMIN, a configured qemu-bridge-helper can still
        // put the VM on the bridge.
        net::Mode::Bridge(br) => match net::bridge_helper(br) {
            Some(helper) if !net::has_net_admin() => Net::BridgeHelper {
                bridge: br.clone(),
                helper,
                mac,
            },
            _ => Net::Tap { fd: None, mac },
        },
        _ if net => Net::User {
            // No sshd in the tree: no port to advertise (an explicit
            // --ssh-port is still forwarded, for an sshd of the user's).
            ssh_port: if exec || (ssh_keys.is_none() && opts.ssh_port.is_none()) {
                None
            } else {
                Some(
                    opts.ssh_port
                        .map_or_else(free_port, Ok)
                        .map_err(|e| RunError::Io("cannot find a free port".into(), e))?,
                )
            },
        },
        _ => Net::None,
    };
    // The guest says when its sshd listens (mkt's init, or a unit in
    // systemd mode), so `mkt ssh` waits for that rather than connecting early.
    let ssh_reports_ready = ssh_keys.is_some() && matches!(net, Net::User { ssh_port: Some(_) });
    if ssh_reports_ready {
        ports.push(Port {
            name: READY_PORT.into(),
            socket: run_dir.join("ready.sock"),
        });
    }
    let cpus = opts
        .cpus
        .or(setup.cpus.map(crate::config::Cpus::get))
        .unwrap_or_else(crate::host::user::available_cpus);
    let mem_mib = opts
        .mem_mib
        .or_else(|| {
            setup
                .mem
                .as_deref()
                .and_then(|m| crate::config::parse_mem_mib(m).ok())
        })
        .unwrap_or(1024);
    // Passed devices pin DMA memory: the default grows with them (MKT's
    // rule); an explicit --mem is taken as is.
    let mem_mib = if opts.mem_mib.is_some() {
        mem_mib
    } else {
        qemu::mem_for_devices(mem_mib, pci.len())
    };
    let nvme_name = setup_name.as_deref().unwrap_or("run");
    let spec = VmSpec {
        qemu: qemu_bin,
        profile,
        accel,
        cpus,
        mem_mib,
        kernel: kernel.image(),
        initrd: Some(run_dir.join("initrd")),
        append,
        shares,
        console: if exec {
            Console::Log(console_log(paths, setup_name.as_deref().unwrap_or("run")))
        } else {
            Console::Interactive
        },
        ports,
        qmp: run_dir.join("qmp.sock"),
        net,
        pci,
        nvme: nvme_mib.map(|_| qemu::Nvme {
            path: paths.data_dir.join("nvme").join(format!("{nvme_name}.img")),
            serial: format!("mkt-{nvme_name}"),
        }),
        gdb_port: opts.gdb_port,
        extra: opts.qemu_args.clone(),
    };
    check_cmdline(&spec)?;
    Ok(Prepared {
        spec,
        files,
        initrd,
        accel_note,
        exec,
        virtiofsd,
        root_ids: if fs == GFs::Virtiofs { root_ids } else { None },
        user: input.user.name.clone(),
        rootfs,
        net_mode,
        nvme_mib,
        ssh_reports_ready,
    })
}

/// Where the kernel's words end: at a `--` (init's words follow), else the end.
fn kernel_words_end(append: &[String]) -> usize {
    append
        .iter()
        .position(|w| w == "--")
        .unwrap_or(append.len())
}

/// `tsc_early_khz=<host TSC>` for microvm under TCG: microvm has no HPET
/// and no ACPI PM timer, so when the kernel's quick PIT calibration fails
/// (often, on a loaded host) it has no TSC frequency and hangs calibrating
/// the delay loop. Under TCG the guest TSC is the host's, so the host's
/// frequency is right. Not when --append already sets it.
fn tsc_word(
    profile: &Profile,
    accel: &kvm::Accel,
    append: &[String],
    host_khz: impl FnOnce() -> Option<u64>,
) -> Option<String> {
    let microvm = profile.machine.split(',').next() == Some("microvm");
    if !microvm || *accel != kvm::Accel::Tcg {
        return None;
    }
    if append[..kernel_words_end(append)]
        .iter()
        .any(|w| w.starts_with("tsc_early_khz="))
    {
        return None;
    }
    host_khz().map(|k| format!("tsc_early_khz={k}"))
}

/// With the gdb stub, the kernel boots with `nokaslr` (before any `--`, so
/// the kernel reads it), so that vmlinux's symbol addresses are the running
/// kernel's; an explicit `kaslr`/`nokaslr` in --append is left alone.
fn gdb_nokaslr(append: &mut Vec<String>) {
    let kernel_words = kernel_words_end(append);
    if !append[..kernel_words]
        .iter()
        .any(|w| w == "kaslr" || w == "nokaslr")
    {
        append.insert(kernel_words, "nokaslr".into());
    }
}

/// Refuses a kernel command line longer than the kernel takes: QEMU would
/// boot it cut short (or not at all), with nothing on the console.
fn check_cmdline(spec: &VmSpec) -> Result<(), RunError> {
    let mut head = Vec::with_capacity(0x240);
    if let Ok(f) = std::fs::File::open(&spec.kernel) {
        let _ = f.take(0x240).read_to_end(&mut head);
    }
    let (len, limit) = (qemu::cmdline(spec).len(), qemu::cmdline_limit(&head));
    if len > limit {
        return Err(RunError::CmdlineTooLong {
            len,
            limit,
            kernel: spec.kernel.clone(),
        });
    }
    Ok(())
}

/// mkt's SSH keys: one for the user (client) and one for every guest's sshd.
#[derive(Debug, Clone)]
pub struct SshKeys {
    pub client_key: PathBuf,
    pub client_pub: String,
    pub host_private: String,
    pub known_hosts: PathBuf,
}

/// The alias every guest's host key is pinned under in mkt's known_hosts.
const HOST_KEY_ALIAS: &str = "mkt-guest";

/// Creates (once) and reads mkt's SSH keys under `dir`.
pub fn ensure_ssh_keys(dir: &Path) -> Result<SshKeys, RunError> {
    use std::os::unix::fs::DirBuilderExt;
    let io_err = |what: &str, e| RunError::Io(format!("{what} in {}", dir.display()), e);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err("cannot create the ssh key directory", e))?;
    // Two runs starting at once must not both generate (or read half of)
    // the keys: serialise on a lock file.
    let lock_path = dir.join("lock");
    let lock_file =
        std::fs::File::create(&lock_path).map_err(|e| io_err("cannot create the lock", e))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io_err("cannot lock", e.into()))?;
    let keygen = host::which("ssh-keygen").ok_or_else(|| {
        RunError::Io(
            "ssh-keygen not found (install openssh-client)".into(),
            io::ErrorKind::NotFound.into(),
        )
    })?;
    for name in ["id_ed25519", "host_ed25519"] {
        let key = dir.join(name);
        if key.exists() {
            continue;
        }
        let out = Command::new(&keygen)
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                &format!("mkt-{name}"),
                "-f",
            ])
            .arg(&key)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| RunError::Spawn(keygen.clone(), e))?;
        if !out.status.success() {
            return Err(RunError::Io(
                format!(
                    "ssh-keygen failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                io::Error::other("ssh-keygen"),
            ));
        }
    }
    let read = |n: &str| {
        std::fs::read_to_string(dir.join(n)).map_err(|e| io_err(&format!("cannot read {n}"), e))
    };
    let host_pub = read("host_ed25519.pub")?;
    let known_hosts = dir.join("known_hosts");
    let line = format!("{HOST_KEY_ALIAS} {}", host_pub.trim());
    if read("known_hosts").ok().as_deref().map(str::trim) != Some(line.as_str()) {
        std::fs::write(&known_hosts, format!("{line}\n"))
            .map_err(|e| RunError::Write(known_hosts.clone(), e))?;
    }
    Ok(SshKeys {
        client_key: dir.join("id_ed25519"),
        client_pub: read("id_ed25519.pub")?,
        host_private: read("host_ed25519")?,
        known_hosts,
    })
}

/// The ssh command line that logs into a guest as the user, no prompts.
pub fn ssh_argv(keys: &SshKeys, user: &str, port: u16, command: &[String]) -> Vec<String> {
    let mut a = vec![
        "ssh".to_string(),
        "-p".into(),
        port.to_string(),
        "-i".into(),
        keys.client_key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        format!("HostKeyAlias={HOST_KEY_ALIAS}"),
        "-o".into(),
        format!("UserKnownHostsFile={}", keys.known_hosts.display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        format!("{user}@127.0.0.1"),
    ];
    if !command.is_empty() {
        // ssh joins its words with spaces for the remote shell to split
        // again: one quoted line makes the guest run exactly this argv.
        a.push("--".into());
        a.push(qemu::shell_quote(command));
    }
    a
}

/// The running VM called `name`: the one of exactly that name, else the one
/// numbered VM of it (`run` finds `run-1` when that is the only one).
/// Several candidates are an error listing them, never a silent pick.
fn find_vm<'a>(
    running: &'a [instance::Record],
    name: &str,
) -> anyhow::Result<&'a instance::Record> {
    if let Some(r) = running.iter().find(|r| r.name == name) {
        return Ok(r);
    }
    let numbered: Vec<&instance::Record> = running
        .iter()
        .filter(|r| {
            r.name
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    match numbered.as_slice() {
        [one] => Ok(one),
        [] => anyhow::bail!("no running VM named {name:?} (running: {})", names(running)),
        several => anyhow::bail!(
            "{name:?} is ambiguous: {} VMs match ({}); name one",
            several.len(),
            several
                .iter()
                .map(|r| format!("{} (pid {})", r.name, r.pid))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `mkt ssh [NAME] [-- CMD]`: runs ssh into a running guest; its exit status.
pub fn ssh(
    paths: &Paths,
    name: Option<&str>,
    command: &[String],
    quiet: bool,
) -> anyhow::Result<i32> {
    ssh_with_stdin(paths, name, command, None, quiet)
}

/// [`ssh`] with the remote command's stdin read from `stdin` (else mkt's).
fn ssh_with_stdin(
    paths: &Paths,
    name: Option<&str>,
    command: &[String],
    stdin: Option<std::fs::File>,
    quiet: bool,
) -> anyhow::Result<i32> {
    let running = instance::list(&paths.runtime_dir)?;
    let rec = match name {
        Some(n) => find_vm(&running, n)?,
        None => match running.as_slice() {
            [one] => one,
            [] => anyhow::bail!("no VM is running (start one with `mkt run`)"),
            _ => anyhow::bail!("several VMs are running; name one: {}", names(&running)),
        },
    };
    let port = rec.ssh_port.ok_or_else(|| {
        anyhow::anyhow!(
            "VM {:?} has no SSH port (started with --net none or a command, or its rootfs has no sshd)",
            rec.name
        )
    })?;
    if rec.ssh_reports_ready {
        wait_for_sshd(rec, quiet)?;
    }
    let keys = ensure_ssh_keys(&paths.data_dir.join("ssh"))?;
    let argv = ssh_argv(&keys, &rec.user, port, command);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    if let Some(f) = stdin {
        cmd.stdin(f);
    }
    let status = cmd
        .status()
        .map_err(|e| RunError::Spawn(argv[0].clone().into(), e))?;
    Ok(status.code().unwrap_or(255))
}

/// `mkt ps`: the running VMs, as a table or JSON.
pub fn ps(paths: &Paths, json: bool) -> anyhow::Result<i32> {
    let running = instance::list(&paths.runtime_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&running)?);
        return Ok(0);
    }
    println!(
        "{:<16} {:>8} {:>6} {:>8}  KERNEL / ROOTFS",
        "NAME", "PID", "SSH", "UP"
    );
    for r in &running {
        let up = crate::util::time::epoch_secs().saturating_sub(r.started);
        println!(
            "{:<16} {:>8} {:>6} {:>7}s  {} on {}",
            r.name,
            r.pid,
            r.ssh_port
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            up,
            r.kernel.display(),
            r.rootfs.display()
        );
    }
    Ok(0)
}

/// Waits until the run of `r` has ended (its mkt released the run's lock).
fn wait_gone(r: &instance::Record, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while instance::running(r) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// `mkt stop`: an ACPI power-off request through QMP, then (after
/// `timeout`, or at once with `force`) QMP quit, then signals to mkt. The
/// VM's own mkt does the cleanup, as for any other end of the run.
pub fn stop(
    paths: &Paths,
    name: Option<&str>,
    all: bool,
    force: bool,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let running = instance::list(&paths.runtime_dir)?;
    let targets: Vec<&instance::Record> = match (name, all) {
        (_, true) if running.is_empty() => {
            eprintln!("mkt: no VM is running; nothing to stop");
            return Ok(0);
        }
        (_, true) => running.iter().collect(),
        (Some(n), false) => vec![find_vm(&running, n)?],
        (None, false) => match running.as_slice() {
            [one] => vec![one],
            [] => anyhow::bail!("no VM is running"),
            _ => anyhow::bail!(
                "several VMs are running; name one or use --all: {}",
                names(&running)
            ),
        },
    };
    for r in targets {
        let qmp = r.qmp.as_deref();
        let mut stopped = false;
        if !force && let Some(q) = qmp {
            let _ = instance::qmp(q, "system_powerdown");
            stopped = wait_gone(r, timeout);
        }
        if !stopped && let Some(q) = qmp {
            let _ = instance::qmp(q, "quit");
            stopped = wait_gone(r, Duration::from_secs(5));
        }
        // Signals only to the process that holds this run's lock: the
        // recorded pid may have ended and been reused meanwhile.
        if !stopped && instance::running(r) {
            use nix::sys::signal::{Signal, kill};
            let pid = nix::unistd::Pid::from_raw(r.pid as i32);
            let _ = kill(pid, Signal::SIGTERM);
            if !wait_gone(r, Duration::from_secs(5)) && instance::running(r) {
                let _ = kill(pid, Signal::SIGKILL);
                wait_gone(r, Duration::from_secs(5));
                instance::clean_stale(&paths.runtime_dir)?;
            }
        }
        println!("stopped {}", r.name);
    }
    Ok(0)
}

fn names(r: &[instance::Record]) -> String {
    if r.is_empty() {
        return "none".into();
    }
    r.iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The size and mtime of every tree module at boot, for `mkt
/// modules-reload` in the guest (what the guest would see: same files).
fn modules_boot_record(links: &[(PathBuf, PathBuf)], release: &str) -> guest::GenFile {
    use std::os::unix::fs::MetadataExt;
    let kernel_dir = PathBuf::from("/lib/modules").join(release).join("kernel");
    let mut text = String::new();
    for (link, target) in links.iter().filter(|(l, _)| l.starts_with(&kernel_dir)) {
        if let Ok(m) = std::fs::metadata(target) {
            text += &format!(
                "{}\t{}\t{}\t{}\n",
                link.display(),
                m.size(),
                m.mtime(),
                m.mtime_nsec()
            );
        }
    }
    guest::GenFile {
        name: "modules.boot".into(),
        content: text.into_bytes(),
        dest: Some("/etc/mkt/modules.boot".into()),
        mode: 0o644,
    }
}

/// The files depmod makes; the rest of /lib/modules/REL is links to the tree.
const DEPMOD_OUTPUTS: &[&str] = &[
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.devname",
];

/// Indexes a tree's modules with the host's depmod (milliseconds) instead of
/// the guest's (seconds under TCG), cached by the modules' paths, sizes and
/// mtimes. None when the host has no depmod or it fails: the guest does it.
fn host_depmod(
    links: &[(PathBuf, PathBuf)],
    release: &str,
    cache: &Path,
    run_dir: &Path,
) -> Option<Vec<guest::GenFile>> {
    use std::hash::Hasher;
    let moddir = PathBuf::from("/lib/modules").join(release);
    let mine: Vec<&(PathBuf, PathBuf)> = links
        .iter()
        .filter(|(l, _)| l.starts_with(&moddir))
        .collect();
    // FNV-1a: stable across runs and Rust versions, unlike DefaultHasher.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100000001b3);
            }
        }
    }
    let mut h = Fnv(0xcbf29ce484222325);
    h.write(release.as_bytes());
    for (link, target) in &mine {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(target).ok()?;
        h.write(link.as_os_str().as_encoded_bytes());
        h.write(target.as_os_str().as_encoded_bytes());
        h.write(&m.size().to_le_bytes());
        h.write(&m.mtime_nsec().to_le_bytes());
        h.write(&m.mtime().to_le_bytes());
    }
    let key = cache.join(format!("{release}-{:016x}", h.finish()));
    if !key.join("modules.dep").exists() {
        let depmod = ["/sbin/depmod", "/usr/sbin/depmod"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| host::which("depmod"))?;
        let base = run_dir.join("depmod");
        for (link, target) in &mine {
            let at = base.join(link.strip_prefix("/").ok()?);
            std::fs::create_dir_all(at.parent()?).ok()?;
            std::os::unix::fs::symlink(target, &at).ok()?;
        }
        let ok = Command::new(depmod)
            .arg("-b")
            .arg(&base)
            .arg(release)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let out = base.join(moddir.strip_prefix("/").ok()?);
        let tmp = cache.join(format!(".tmp-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).ok()?;
        for name in DEPMOD_OUTPUTS {
            if let Ok(data) = std::fs::read(out.join(name)) {
                std::fs::write(tmp.join(name), data).ok()?;
            }
        }
        let _ = std::fs::remove_dir_all(&base);
        // Another mkt may have won the race: then its copy is as good.
        if std::fs::rename(&tmp, &key).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    Some(
        DEPMOD_OUTPUTS
            .iter()
            .filter_map(|name| {
                Some(guest::GenFile {
                    name: (*name).to_string(),
                    content: std::fs::read(key.join(name)).ok()?,
                    dest: Some(moddir.join(name).display().to_string()),
                    mode: 0o644,
                })
            })
            .collect(),
    )
}

/// `mkt test`: the setup's test script as the user, in the running VM of
/// the setup (over ssh) or in a fresh command-mode boot; TEST PASSED/FAILED.
pub fn test(
    config: &Config,
    paths: &Paths,
    setup: Option<String>,
    script: Option<PathBuf>,
    quiet: bool,
) -> anyhow::Result<i32> {
    let name = setup
        .or_else(|| config.defaults.setup.clone())
        .ok_or_else(|| {
            anyhow::anyhow!("no setup: name one, or set defaults.setup in the config")
        })?;
    let s = config
        .setups
        .get(&name)
        .ok_or_else(|| RunError::NoSetup(name.clone(), String::new()))?;
    let script = script.or_else(|| s.test.clone()).ok_or_else(|| {
        anyhow::anyhow!("setup {name:?} has no `test` script in the config (or pass --script FILE)")
    })?;
    check_boot_script(&script).map_err(|e| match e {
        RunError::BootScript(p, why) => anyhow::anyhow!("test script {}: {why}", p.display()),
        e => e.into(),
    })?;
    let script = std::fs::canonicalize(&script)?;
    let command = vec![script.display().to_string()];
    let running = instance::list(&paths.runtime_dir)?
        .into_iter()
        .any(|r| r.name == name && r.ssh_port.is_some());
    let code = if running {
        // The script's directory need not be shared with the running VM:
        // its content goes over ssh's stdin into a temp file there.
        let file = std::fs::File::open(&script)?;
        ssh_with_stdin(
            paths,
            Some(&name),
            &remote_script_command(&script),
            Some(file),
            quiet,
        )?
    } else {
        let opts = RunOptions {
            setup: Some(name.clone()),
            command,
            // The script must be visible in the guest at its host path.
            dirs: script.parent().map(Path::to_path_buf).into_iter().collect(),
            quiet,
            ..RunOptions::default()
        };
        run(&opts, config, paths)?
    };
    if code == 0 {
        println!("TEST PASSED ({name}: {})", script.display());
        Ok(0)
    } else {
        println!("TEST FAILED ({name}: {} exited {code})", script.display());
        Ok(1)
    }
}

/// The guest command that saves its stdin as the script (same file name)
/// in a temp dir, runs it with stdin from /dev/null, and exits with its status.
fn remote_script_command(script: &Path) -> Vec<String> {
    let name = script
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "test".into());
    let body = "d=$(mktemp -d) || exit 125; f=\"$d/$1\"; \
                if cat > \"$f\" && chmod 755 \"$f\"; then \"$f\" < /dev/null; s=$?; else s=125; fi; \
                rm -rf \"$d\"; exit $s";
    vec![
        "sh".into(),
        "-c".into(),
        body.into(),
        "mkt-test".into(),
        name,
    ]
}

/// The interactive mode: the one asked for, else mkt's shell (seconds to a
/// prompt and to SSH) when the tree has a shell, else its systemd.
fn interactive_mode(init: Option<&str>, rootfs: &Path) -> Mode {
    match init {
        Some("systemd") => Mode::Systemd,
        Some(_) => Mode::Shell,
        None if rootfs.join("bin/sh").exists() || rootfs.join("bin/bash").exists() => Mode::Shell,
        None if rootfs.join("lib/systemd/systemd").exists() => Mode::Systemd,
        None => Mode::Shell,
    }
}

nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, nix::pty::Winsize);

/// The terminal on stdin (QEMU's console): its TERM and size, for the
/// guest's console. None when stdin is no terminal.
fn host_terminal() -> Option<guest::Terminal> {
    let stdin = io::stdin();
    if !nix::unistd::isatty(&stdin).unwrap_or(false) {
        return None;
    }
    let mut ws = nix::pty::Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: fd 0 is open (a tty) and ws is a valid struct winsize.
    let _ = unsafe { tiocgwinsz(0, &mut ws) };
    Some(guest::Terminal {
        term: std::env::var("TERM").unwrap_or_default(),
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Where a command run's serial console goes: the run log dir, so it
/// (boot script output included) survives the run.
fn console_log(paths: &Paths, name: &str) -> PathBuf {
    let dir = paths.logs_dir.join("run");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!(
        "{name}-{}-{}.log",
        crate::util::time::epoch_secs(),
        std::process::id()
    ))
}

fn check_boot_script(script: &Path) -> Result<(), RunError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |why: &str| RunError::BootScript(script.into(), why.into());
    let meta = std::fs::metadata(script).map_err(|e| err(&e.to_string()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(err("not an executable file (chmod +x it)"));
    }
    let mut head = [0u8; 2];
    std::fs::File::open(script)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| err(&e.to_string()))?;
    if &head != b"#!" {
        return Err(err("has no #! line"));
    }
    Ok(())
}

/// Writes the generated files and the initramfs into the run directory.
fn write_run_files(p: &Prepared, run_dir: &Path) -> Result<(), RunError> {
    let share = run_dir.join("guest");
    let w = |path: PathBuf, data: &[u8]| {
        std::fs::write(&path, data).map_err(|e| RunError::Write(path.clone(), e))
    };
    std::fs::create_dir_all(&share).map_err(|e| RunError::Write(share.clone(), e))?;
    for f in &p.files.files {
        w(share.join(&f.name), &f.content)?;
    }
    w(run_dir.join("initrd"), &p.initrd)
}

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

/// The virtio-serial port that carries the host terminal's size.
const WINSIZE_PORT: &str = "mkt.winsize";

/// The virtio-serial port on which the guest says whether its sshd listens.
const READY_PORT: &str = "mkt.ready";

/// How long `mkt ssh` waits for a booting guest's sshd before trying anyway
/// (a systemd boot under TCG on a busy host takes ~20 s).
const SSHD_WAIT: Duration = Duration::from_secs(120);

/// Accepts QEMU's connection on `listener` and records each line the guest
/// sends about its sshd in the run directory, for `mkt ssh`. Detached.
fn relay_ready(listener: UnixListener, run_dir: PathBuf) {
    std::thread::spawn(move || {
        let Ok((s, _)) = listener.accept() else {
            return;
        };
        for line in io::BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if line.starts_with("sshd ")
                && let Err(e) = instance::set_ssh_state(&run_dir, &line)
            {
                tracing::warn!("cannot record the guest's sshd state: {e}");
            }
        }
    });
}

/// Waits until the guest of `rec` says its sshd listens: a connection made
/// before that sits in QEMU's NAT, whose SYN retries back off to seconds.
/// Gives up (and lets ssh try) after [`SSHD_WAIT`].
fn wait_for_sshd(rec: &instance::Record, quiet: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + SSHD_WAIT;
    let mut said = false;
    loop {
        match instance::ssh_state(rec) {
            instance::SshState::Ready => return Ok(()),
            instance::SshState::Failed(why) => anyhow::bail!(
                "the sshd of VM {:?} did not start: {why} (its console says more)",
                rec.name
            ),
            instance::SshState::Starting => {}
        }
        if !instance::running(rec) {
            anyhow::bail!("VM {:?} ended before its sshd listened", rec.name);
        }
        if Instant::now() > deadline {
            tracing::warn!(
                "VM {:?} has not said its sshd listens after {}s; trying anyway",
                rec.name,
                SSHD_WAIT.as_secs()
            );
            return Ok(());
        }
        if !said && !quiet && io::stderr().is_terminal() {
            eprintln!("mkt: waiting for {}'s sshd (booting)", rec.name);
            said = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Set by SIGWINCH: the host terminal was resized.
static RESIZED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_winch(_: i32) {
    RESIZED.store(true, Ordering::SeqCst);
}

/// Accepts QEMU's connection on `listener`, then sends the terminal's
/// `rows cols` after each resize until QEMU goes. Detached: it has nothing
/// to hand back.
fn relay_winsize(listener: UnixListener) {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        loop {
            if RESIZED.swap(false, Ordering::SeqCst)
                && let Some(t) = host_terminal().filter(|t| t.rows > 0 && t.cols > 0)
                && writeln!(s, "{} {}", t.rows, t.cols).is_err()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

extern "C" fn on_signal(sig: i32) {
    SIGNALLED.store(sig, Ordering::SeqCst);
    crate::interrupt::note(sig);
}

fn install_signal_handlers() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let _ = sigaction(s, &act);
        }
    }
    let winch = SigAction::new(
        SigHandler::Handler(on_winch),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: as above: the handler only stores to an atomic.
    unsafe {
        let _ = sigaction(Signal::SIGWINCH, &winch);
    }
}

/// Accepts QEMU's connection on `listener` and copies it to `sink`.
fn relay(listener: UnixListener, mut sink: impl Write + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let Ok((mut s, _)) = listener.accept() else {
            return kept;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = sink.flush();
                    if kept.len() < 4096 {
                        kept.extend_from_slice(&buf[..n]);
                    }
                }
            }
        }
        kept
    })
}

/// Kills QEMU if the relay threads are still blocked in accept after QEMU
/// died: connecting to each listener unblocks them.
fn unblock(sockets: &[PathBuf]) {
    for s in sockets {
        let _ = UnixStream::connect(s);
    }
}

/// Helper processes that must not outlive the run.
struct Daemons(Vec<Child>, Vec<nix::unistd::Pid>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in &self.1 {
            let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(*pid, None);
        }
    }
}

/// The virtiofsd arguments for one share (rootless: no sandbox needs root).
pub fn virtiofsd_args(share: &Share) -> Vec<String> {
    let FsKind::Virtiofs { socket } = &share.kind else {
        return Vec::new();
    };
    let mut a = vec![
        format!("--socket-path={}", socket.display()),
        format!("--shared-dir={}", share.path.display()),
        // Only the stored rootfs is never changed behind the guest's back;
        // home and the kernel tree must show the host's edits and rebuilds.
        format!(
            "--cache={}",
            if share.tag == "root" {
                "always"
            } else {
                "auto"
            }
        ),
        "--sandbox=none".to_string(),
        // Run as root, virtiofsd keeps a set of capabilities: not those to
        // make device nodes or set file capabilities for the guest (the
        // set-id modes it could still set are crate::confine's filter's job).
        "--modcaps=-mknod:-setfcap".to_string(),
    ];
    if share.readonly {
        a.push("--readonly".into());
    }
    a
}

/// A started virtiofsd whose socket may not exist yet.
struct Starting<'a> {
    share: &'a Share,
    socket: &'a Path,
    log: PathBuf,
    /// Spawned with a Command (an index into Daemons.0), else a mapped pid.
    proc: Result<usize, nix::unistd::Pid>,
}

/// Starts a virtiofsd per virtiofs share, all at once, then waits for all
/// their sockets (QEMU connects at start-up: they must exist first). One
/// after another, each waited for, cost ~7 ms per share.
fn start_virtiofsd(
    bin: &Path,
    shares: &[Share],
    run_dir: &Path,
    root_ids: Option<&crate::ns::Ids>,
    store: &Path,
) -> Result<Daemons, RunError> {
    let mut daemons = Daemons(Vec::new(), Vec::new());
    let mut started = Vec::new();
    for share in shares {
        let FsKind::Virtiofs { socket } = &share.kind else {
            continue;
        };
        let log = run_dir.join(format!("virtiofsd-{}.log", share.tag));
        let log_file = std::fs::File::create(&log).map_err(|e| RunError::Write(log.clone(), e))?;
        if let (Some(ids), "root") = (root_ids, share.tag.as_str()) {
            use std::os::fd::AsRawFd;
            let argv: Vec<std::ffi::OsString> = std::iter::once(bin.as_os_str().to_owned())
                .chain(virtiofsd_args(share).into_iter().map(Into::into))
                .collect();
            let pid = crate::ns::spawn_mapped(&argv, ids, &[], Some(log_file.as_raw_fd()))
                .map_err(|e| RunError::Virtiofsd(share.path.clone(), e.to_string()))?;
            daemons.1.push(pid);
            started.push(Starting {
                share,
                socket,
                log,
                proc: Err(pid),
            });
            continue;
        }
        let mut cmd = Command::new(bin);
        cmd.args(virtiofsd_args(share))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // The guest drives this virtiofsd's file operations: see crate::confine.
        let confine = crate::confine::Confinement::new(&[share.path.as_path()], Some(store));
        let die = die_with(std::process::id());
        // SAFETY: prctl, getppid, and confine's system calls on data
        // prepared before fork, are async-signal-safe; virtiofsd dies with mkt.
        unsafe {
            cmd.pre_exec(move || {
                die()?;
                confine.enter()
            });
        }
        let child = cmd.spawn().map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM | libc::EINVAL | libc::ENOSPC) => RunError::Virtiofsd(
                share.path.clone(),
                format!(
                    "cannot confine it (a private mount namespace, a user namespace when not root, keeps the rootfs store read-only): {e}"
                ),
            ),
            _ => RunError::Spawn(bin.into(), e),
        })?;
        daemons.0.push(child);
        started.push(Starting {
            share,
            socket,
            log,
            proc: Ok(daemons.0.len() - 1),
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in &started {
        while !s.socket.exists() {
            let exited = match s.proc {
                Ok(i) => daemons.0[i]
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|status| format!("{status}: ")),
                Err(pid) => {
                    match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                        Ok(
                            nix::sys::wait::WaitStatus::Exited(..)
                            | nix::sys::wait::WaitStatus::Signaled(..),
                        ) => {
                            // Reaped: Drop must not signal a pid that may be reused.
                            daemons.1.retain(|p| *p != pid);
                            Some(String::new())
                        }
                        _ => None,
                    }
                }
            };
            if let Some(status) = exited {
                let err = std::fs::read_to_string(&s.log).unwrap_or_default();
                return Err(RunError::Virtiofsd(
                    s.share.path.clone(),
                    format!("{status}{}", err.trim()),
                ));
            }
            if Instant::now() > deadline {
                return Err(RunError::Virtiofsd(
                    s.share.path.clone(),
                    "no socket after 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(daemons)
}

/// The sysfs VFIO works on: the host's, or (tests) $MKT_SYSFS_ROOT — never
/// for a set-id or file-capability mkt (AT_SECURE).
fn host_sysfs() -> crate::vfio::Sysfs {
    // SAFETY: getauxval only reads the auxiliary vector.
    let secure = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
    match std::env::var_os("MKT_SYSFS_ROOT") {
        Some(root) if !secure => crate::vfio::Sysfs::new(root),
        _ => crate::vfio::Sysfs::default(),
    }
}

/// Makes the sparse disk file `path` at least `mib` MiB (never shrinks it:
/// that would cut off data). A file it creates is removed again on failure.
fn ensure_disk(path: &Path, mib: u64) -> Result<(), RunError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| RunError::Write(dir.into(), e))?;
    }
    let (f, created) = match std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
    {
        Ok(f) => (f, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| RunError::Write(path.into(), e))?,
            false,
        ),
        Err(e) => return Err(RunError::Write(path.into(), e)),
    };
    let want = mib.saturating_mul(1 << 20);
    let grown = f.metadata().and_then(|m| {
        if m.len() < want {
            f.set_len(want)
        } else {
            Ok(())
        }
    });
    if let Err(e) = grown {
        if created {
            let _ = std::fs::remove_file(path);
        }
        return Err(RunError::Write(path.into(), e));
    }
    Ok(())
}

/// Waits for a child to exit without reaping it, at most a given time: a
/// pidfd wakes the caller the moment QEMU exits (a plain sleep between
/// polls cost up to its whole length at the end of every run).
struct ExitWatch(Option<std::os::fd::OwnedFd>);

impl ExitWatch {
    fn new(pid: u32) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd
        // (or -1 on kernels before 5.3: then the caller just sleeps).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        // SAFETY: a non-negative result is a new fd that nothing else owns.
        ExitWatch((fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
    }

    fn wait(&self, most: Duration) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        match &self.0 {
            Some(fd) => {
                let ms = u16::try_from(most.as_millis()).unwrap_or(u16::MAX);
                // A signal interrupts it (EINTR): the caller checks for that.
                let _ = poll(
                    &mut [PollFd::new(fd.as_fd(), PollFlags::POLLIN)],
                    PollTimeout::from(ms),
                );
            }
            None => std::thread::sleep(most),
        }
    }
}

/// `: ` and the last lines of QEMU's stderr, or nothing when it is empty.
fn stderr_tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.trim().lines().collect();
    match lines.len() {
        0 => String::new(),
        n => format!(": {}", lines[n.saturating_sub(20)..].join("\n")),
    }
}

/// For a child's pre_exec: SIGKILL when mkt (pid `parent`) dies. A kill
/// -9 of mkt between the fork and the prctl would never reach the child,
/// which would live on as an orphan: hence the parent check after it.
fn die_with(parent: u32) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
    move || {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(io::Error::from)?;
        if nix::unistd::getppid().as_raw() as u32 != parent {
            // SAFETY: _exit is async-signal-safe and skips the parent's
            // atexit handlers.
            unsafe { libc::_exit(1) }
        }
        Ok(())
    }
}

fn spawn_qemu(
    argv: &[String],
    exec: bool,
    keep_fd: Option<i32>,
    confine: crate::confine::Confinement,
) -> Result<Child, RunError> {
    let confined = !confine.is_empty();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    if exec {
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
    }
    cmd.stderr(Stdio::piped());
    // QEMU dies with mkt even on kill -9, and inherits the tap fd (`fd=N`
    // names it).
    let die = die_with(std::process::id());
    // SAFETY: prctl, getppid and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            die()?;
            if let Some(fd) = keep_fd
                && libc::fcntl(fd, libc::F_SETFD, 0) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // QEMU serves 9p shares itself (crate::confine says why).
            confine.enter()
        });
    }
    cmd.spawn().map_err(|e| match (e.raw_os_error(), confined) {
        (Some(libc::EPERM | libc::EINVAL | libc::ENOSPC), true) => RunError::Io(
            format!(
                "cannot start {} confined for its 9p shares (a private mount namespace, a user namespace when not root, keeps the rootfs store read-only)",
                argv[0]
            ),
            e,
        ),
        _ => RunError::Spawn(argv[0].clone().into(), e),
    })
}

/// Runs a guest; returns mkt's exit status (the command's in exec mode).
#[allow(clippy::too_many_lines)] // still to be split (the structure issue)
pub fn run(opts: &RunOptions, config: &Config, paths: &Paths) -> anyhow::Result<i32> {
    paths.ensure_runtime_dir()?;
    for stale in instance::clean_stale(&paths.runtime_dir)? {
        tracing::info!("removed stale run directory {}", stale.display());
    }
    // As MKT did: running a setup that already runs attaches to it.
    if let (Some(setup), false, false) = (&opts.setup, opts.new, opts.dry_run)
        && let Some(rec) = instance::list(&paths.runtime_dir)?
            .into_iter()
            .find(|r| &r.name == setup)
    {
        if rec.ssh_port.is_none() {
            anyhow::bail!(
                "{setup} is already running (pid {}) without SSH (a command run, --net none, or no sshd in its rootfs); use --new for another VM",
                rec.pid
            );
        }
        if !opts.quiet {
            eprintln!(
                "mkt: {setup} is already running (pid {}): attaching over ssh (--new starts another)",
                rec.pid
            );
        }
        return ssh(paths, Some(setup), &opts.command, opts.quiet);
    }
    // An unnamed VM is `run-N`, a setup's `SETUP` (`SETUP-N` with --new):
    // unique, so that ssh and stop never pick one of several.
    let mut run_dir = RunDir::create(
        &paths.runtime_dir,
        opts.setup.as_deref().unwrap_or("run"),
        opts.setup.is_none(),
    )
    .map_err(RunError::RunDir)?;
    let name = run_dir.name().to_string();
    let mut prepared = prepare(opts, config, paths, run_dir.path())?;
    if let (Some(port), false) = (prepared.spec.gdb_port, opts.quiet) {
        let kaslr = if qemu::cmdline(&prepared.spec)
            .split(' ')
            .any(|w| w == "nokaslr")
        {
            "with nokaslr, so vmlinux's symbols line up"
        } else {
            "with KASLR, as --append asked: vmlinux's symbols will not line up"
        };
        eprintln!(
            "mkt: gdb stub on 127.0.0.1:{port}; the kernel boots {kaslr} (gdb vmlinux -ex 'target remote :{port}')"
        );
    }
    let mut argv = qemu::command_line(&prepared.spec);
    if opts.dry_run {
        println!("{}", qemu::shell_quote(&argv));
        println!("# generated guest files (packed into the initramfs's /mkt):");
        for f in &prepared.files.files {
            println!(
                "#   {}{}",
                f.name,
                f.dest
                    .as_ref()
                    .map(|d| format!(" -> {d}"))
                    .unwrap_or_default()
            );
        }
        return Ok(0);
    }
    // Held for the VM's whole life: `rootfs rm` refuses a tree in use.
    let _tree_in_use = crate::rootfs::lock::in_use(paths, &prepared.rootfs)?;
    if let (Some(note), false) = (&prepared.accel_note, opts.quiet) {
        eprintln!("mkt: {note}");
    }
    write_run_files(&prepared, run_dir.path())?;
    if opts.keep {
        run_dir.keep();
        if !opts.quiet {
            eprintln!(
                "mkt: keeping the run directory {}",
                run_dir.path().display()
            );
        }
    }
    install_signal_handlers();
    let _pipe = crate::interrupt::KeepOnClosedPipe::new();

    // The privileged steps: checked up front, undone when the run ends
    // (these guards drop before run_dir), and after kill -9 by the next
    // run's sweep of stale run directories.
    let wants_tap = matches!(prepared.spec.net, Net::Tap { .. });
    if wants_tap {
        net::check_privilege(&prepared.net_mode)?;
    }
    let _vfio = if prepared.spec.pci.is_empty() {
        None
    } else {
        let sys = host_sysfs();
        let devices = sys.check(&prepared.spec.pci)?;
        sys.check_privilege(&devices)?;
        Some(sys.bind(&devices, &run_dir.path().join(crate::vfio::STATE_FILE))?)
    };
    if let (Some(n), Some(mib)) = (&prepared.spec.nvme, prepared.nvme_mib) {
        ensure_disk(&n.path, mib)?;
    }
    let tap = if let Net::Tap { mac, .. } = &prepared.spec.net {
        let bridge = match &prepared.net_mode {
            net::Mode::Bridge(b) => Some(b.as_str()),
            _ => None,
        };
        let tap = net::Tap::create(
            &format!("mkt{}", std::process::id()),
            bridge,
            run_dir.path(),
        )?;
        // The tap exists and QEMU gets its fd: nothing else needs the
        // capability (the kernel deletes the tap with the last fd).
        net::drop_net_admin();
        if !opts.quiet && !prepared.exec {
            eprintln!(
                "mkt: guest NIC {mac} on tap {}{}",
                tap.name,
                bridge
                    .map(|b| format!(" in bridge {b}"))
                    .unwrap_or_default()
            );
        }
        prepared.spec.net = Net::Tap {
            fd: Some(tap.fd()),
            mac: mac.clone(),
        };
        argv = qemu::command_line(&prepared.spec);
        Some(tap)
    } else {
        None
    };

    let mut relays = Vec::new();
    let sockets: Vec<PathBuf> = prepared
        .spec
        .ports
        .iter()
        .map(|p| p.socket.clone())
        .collect();
    for port in &prepared.spec.ports {
        let l = UnixListener::bind(&port.socket)
            .map_err(|e| RunError::Io(format!("cannot listen on {}", port.socket.display()), e))?;
        relays.push((port.name.clone(), l));
    }
    // The store exists before the file servers start, so they can show it
    // read-only (else a guest could make it, with trees of its own).
    std::fs::create_dir_all(&paths.rootfs_dir)
        .map_err(|e| RunError::Write(paths.rootfs_dir.clone(), e))?;
    let store = std::fs::canonicalize(&paths.rootfs_dir).unwrap_or(paths.rootfs_dir.clone());
    let _daemons = match &prepared.virtiofsd {
        Some(bin) => start_virtiofsd(
            bin,
            &prepared.spec.shares,
            run_dir.path(),
            prepared.root_ids.as_ref(),
            &store,
        )?,
        None => Daemons(Vec::new(), Vec::new()),
    };
    let nine_p: Vec<&Path> = prepared
        .spec
        .shares
        .iter()
        .filter(|s| matches!(s.kind, FsKind::NineP))
        .map(|s| s.path.as_path())
        .collect();
    let qemu_confine = if nine_p.is_empty() {
        crate::confine::Confinement::default()
    } else {
        // Not root, the store is hidden in a user namespace that maps only
        // the caller's ids: QEMU then serves the root tree too, and a tree
        // the caller does not own (root's, `--rootfs /`) would lose its
        // owners (no set-uid sudo): such a run goes without that.
        use std::os::unix::fs::MetadataExt;
        let uid = nix::unistd::geteuid();
        let foreign = !uid.is_root()
            && std::fs::metadata(&prepared.rootfs).is_ok_and(|m| m.uid() != uid.as_raw());
        if foreign {
            tracing::warn!(
                "9p as a normal user on {} (not yours): the rootfs store is not hidden from the guest (virtiofs hides it)",
                prepared.rootfs.display()
            );
        }
        let c = crate::confine::Confinement::new(&nine_p, (!foreign).then_some(store.as_path()));
        if matches!(prepared.spec.net, Net::BridgeHelper { .. }) {
            c.keeping_setid_exec()
        } else {
            c
        }
    };
    let started = Instant::now();
    let mut child = spawn_qemu(
        &argv,
        prepared.exec,
        tap.as_ref().map(|t| t.fd()),
        qemu_confine,
    )?;
    let ssh_port = match &prepared.spec.net {
        Net::User { ssh_port } => *ssh_port,
        _ => None,
    };
    run_dir.write_record(&instance::Record {
        name: name.clone(),
        pid: std::process::id(),
        ssh_port,
        user: prepared.user.clone(),
        kernel: prepared.spec.kernel.clone(),
        rootfs: prepared.rootfs.clone(),
        started: crate::util::time::epoch_secs(),
        qmp: Some(prepared.spec.qmp.clone()),
        ssh_reports_ready: prepared.ssh_reports_ready,
        dir: PathBuf::new(),
    })?;
    if let (Some(port), false) = (ssh_port, opts.quiet || prepared.exec) {
        eprintln!("mkt: ssh on 127.0.0.1:{port} (`mkt ssh {name}`)");
    }
    let mut qemu_err = child.stderr.take().expect("piped stderr");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = qemu_err.read_to_string(&mut s);
        s
    });
    let mut handles = Vec::new();
    for (name, l) in relays {
        if name == WINSIZE_PORT {
            relay_winsize(l);
            continue;
        }
        if name == READY_PORT {
            relay_ready(l, run_dir.path().to_path_buf());
            continue;
        }
        let h = match name.as_str() {
            "mkt.stdout" => relay(l, io::stdout()),
            "mkt.stderr" => relay(l, io::stderr()),
            _ => relay(l, io::sink()),
        };
        handles.push((name, h));
    }

    let exited = ExitWatch::new(child.id());
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .map_err(|e| RunError::Io("waiting for QEMU".into(), e))?
        {
            break s;
        }
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            let _ = child.kill();
            let _ = child.wait();
            unblock(&sockets);
            return Err(RunError::Interrupted(sig).into());
        }
        exited.wait(Duration::from_millis(20));
    };
    tracing::info!("QEMU ran {:.2?} and exited {status}", started.elapsed());
    unblock(&sockets);
    let mut exit_line = String::new();
    for (name, h) in handles {
        let kept = h.join().unwrap_or_default();
        if name == "mkt.status" {
            exit_line = String::from_utf8_lossy(&kept).into_owned();
        }
    }
    let qemu_stderr = err_thread.join().unwrap_or_default();
    if !prepared.exec {
        if status.success() {
            return Ok(0);
        }
        // QEMU's own error (a bad --qemu-arg, a device it lacks): its
        // stderr was piped away from the console, so say it here.
        return Err(RunError::Qemu(format!("QEMU {status}{}", stderr_tail(&qemu_stderr))).into());
    }
    let log = match &prepared.spec.console {
        Console::Log(p) => p.clone(),
        Console::Interactive => PathBuf::new(),
    };
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    // A failing boot script is reported, not left for the log to hide.
    if let Some(line) = console
        .lines()
        .find(|l| l.contains("mkt-init: boot script") && l.contains("FAILED"))
    {
        eprintln!(
            "mkt: warning: {} (console log: {})",
            line.trim_start_matches("mkt-init: "),
            log.display()
        );
    }
    if let Some(guest::plan::Exit(code)) = guest::plan::Exit::decode(&exit_line) {
        return Ok(code);
    }
    let qemu_desc = format!("QEMU {status}{}", stderr_tail(&qemu_stderr));
    Err(RunError::NoStatus {
        qemu: qemu_desc,
        console,
        log,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interactive_default_is_the_shell_when_the_tree_has_one() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("lib/systemd")).unwrap();
        std::fs::write(r.join("lib/systemd/systemd"), "").unwrap();
        // systemd only: the tree's init.
        assert_eq!(interactive_mode(None, r), Mode::Systemd);
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::write(r.join("bin/sh"), "").unwrap();
        assert_eq!(interactive_mode(None, r), Mode::Shell);
        assert_eq!(interactive_mode(Some("systemd"), r), Mode::Systemd);
        assert_eq!(interactive_mode(Some("shell"), r), Mode::Shell);
    }

    #[test]
    fn boot_modules_are_only_the_chosen_file_systems_and_bus() {
        use qemu::Bus;
        for bus in [Bus::Pci, Bus::Mmio] {
            let v = boot_module_names(GFs::Virtiofs, bus);
            let p = boot_module_names(GFs::NineP, bus);
            for m in ["virtio_pci", "virtio_console", "virtio_net", "overlay"] {
                assert!(v.contains(&m) && p.contains(&m), "{m}");
            }
            assert!(v.contains(&"virtiofs"));
            assert!(!v.contains(&"9p") && !v.contains(&"9pnet_virtio"), "{v:?}");
            assert!(p.contains(&"9p") && p.contains(&"9pnet_virtio"));
            assert!(!p.contains(&"virtiofs"), "{p:?}");
            // microvm's devices are virtio-mmio; q35's are all PCI.
            assert_eq!(v.contains(&"virtio_mmio"), bus == Bus::Mmio, "{bus:?}");
            assert_eq!(p.contains(&"virtio_mmio"), bus == Bus::Mmio, "{bus:?}");
        }
    }

    #[test]
    fn generated_paths_go_through_the_trees_relative_first_link() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/lib/modules")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        std::os::unix::fs::symlink("/usr/bin", r.join("bin")).unwrap();
        std::os::unix::fs::symlink("../x", r.join("up")).unwrap();
        let f = |p: &str| through_tree_link(r, Path::new(p));
        assert_eq!(
            f("/lib/modules/6.1/kernel/a.ko"),
            Path::new("/usr/lib/modules/6.1/kernel/a.ko")
        );
        assert_eq!(f("/lib"), Path::new("/usr/lib"));
        // Real directories, absolute or upward links, missing names: as given.
        assert_eq!(f("/etc/passwd"), Path::new("/etc/passwd"));
        assert_eq!(f("/bin/x"), Path::new("/bin/x"));
        assert_eq!(f("/up/x"), Path::new("/up/x"));
        assert_eq!(f("/nope/x"), Path::new("/nope/x"));
        assert_eq!(f("relative/x"), Path::new("relative/x"));
    }

    #[test]
    fn a_disk_image_that_cannot_be_made_is_not_left_behind() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("nvme/run.img");
        // 2^44 MiB is more than any file can be.
        let e = ensure_disk(&img, 1 << 44).unwrap_err().to_string();
        assert!(e.contains("run.img"), "{e}");
        assert!(!img.exists(), "an empty image was left");
        // An existing image is never removed, even when growing it fails.
        ensure_disk(&img, 1).unwrap();
        assert!(ensure_disk(&img, 1 << 44).is_err());
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    }

    #[test]
    fn microvm_under_tcg_gets_the_host_tsc_frequency() {
        use crate::host::kvm::Accel;
        let load = |n: &str| Profile::load(n, None).unwrap();
        let w = |ws: &[&str]| ws.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (profile, accelerator, --append, host TSC kHz, word mkt adds)
        type Case = (
            &'static str,
            Accel,
            &'static [&'static str],
            Option<u64>,
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            (
                "microvm",
                Accel::Tcg,
                &[],
                Some(2596000),
                Some("tsc_early_khz=2596000"),
            ),
            // KVM has kvmclock; other machines have HPET and the PM timer.
            ("microvm", Accel::Kvm, &[], Some(2596000), None),
            ("default", Accel::Tcg, &[], Some(2596000), None),
            ("iommu", Accel::Tcg, &[], Some(2596000), None),
            // The user's own value wins; one after `--` is init's, not the kernel's.
            (
                "microvm",
                Accel::Tcg,
                &["tsc_early_khz=1"],
                Some(2596000),
                None,
            ),
            (
                "microvm",
                Accel::Tcg,
                &["--", "tsc_early_khz=1"],
                Some(7),
                Some("tsc_early_khz=7"),
            ),
            // Not measurable: nothing added (the kernel calibrates as it can).
            ("microvm", Accel::Tcg, &[], None, None),
        ];
        for (name, accel, append, host, want) in cases {
            let got = tsc_word(&load(name), accel, &w(append), || *host);
            assert_eq!(got.as_deref(), *want, "{name} {accel:?} {append:?}");
        }
    }

    #[test]
    fn gdb_adds_nokaslr_before_init_words_unless_asked_otherwise() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["console=ttyS0"], &["console=ttyS0", "nokaslr"]),
            (&["a", "--", "x"], &["a", "nokaslr", "--", "x"]),
            (&["kaslr"], &["kaslr"]),
            (&["nokaslr", "b"], &["nokaslr", "b"]),
            // After `--` it is init's word, not the kernel's.
            (&["--", "kaslr"], &["nokaslr", "--", "kaslr"]),
        ];
        for (given, want) in cases {
            let mut a: Vec<String> = given.iter().map(|s| s.to_string()).collect();
            gdb_nokaslr(&mut a);
            assert_eq!(a, *want, "{given:?}");
        }
    }

    #[test]
    fn bzimage_release_reads_the_header() {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = b"6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        img[0x500..0x500 + v.len()].copy_from_slice(v);
        assert_eq!(
            bzimage_release(&img).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        img[0x202] = b'X';
        assert_eq!(bzimage_release(&img), None);
    }

    #[test]
    fn kernel_resolution_order() {
        let rootfs = tempfile::tempdir().unwrap();
        let cwd = tempfile::tempdir().unwrap();
        // Nothing anywhere: the error says where mkt looked.
        let e = resolve_kernel(None, None, cwd.path(), rootfs.path()).unwrap_err();
        assert!(matches!(e, RunError::NoKernel(_)));
        // The rootfs's newest vmlinuz, with its modules dir.
        std::fs::create_dir_all(rootfs.path().join("boot")).unwrap();
        std::fs::create_dir_all(rootfs.path().join("lib/modules/6.1.0-9")).unwrap();
        for v in ["6.1.0-1", "6.1.0-9"] {
            std::fs::write(rootfs.path().join(format!("boot/vmlinuz-{v}")), b"x").unwrap();
        }
        let k = resolve_kernel(None, None, cwd.path(), rootfs.path()).unwrap();
        assert_eq!(
            k,
            Kernel::Image {
                image: rootfs.path().join("boot/vmlinuz-6.1.0-9"),
                release: "6.1.0-9".into(),
                modules: Some(rootfs.path().join("lib/modules/6.1.0-9")),
            }
        );
        // A --kernel that is neither a tree nor a file.
        let e = resolve_kernel(Some(cwd.path()), None, cwd.path(), rootfs.path()).unwrap_err();
        assert!(e.to_string().contains("neither a built kernel tree"), "{e}");
    }

    #[test]
    fn boot_script_must_be_executable_with_shebang() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("boot.sh");
        std::fs::write(&s, "echo hi\n").unwrap();
        let e = check_boot_script(&s).unwrap_err().to_string();
        assert!(e.contains("not an executable"), "{e}");
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_boot_script(&s).unwrap_err().to_string();
        assert!(e.contains("#!"), "{e}");
        std::fs::write(&s, "#!/bin/sh\necho hi\n").unwrap();
        check_boot_script(&s).unwrap();
    }

    #[test]
    fn last_lines_quotes_the_panic() {
        let console = "a\nb\nKernel panic - not syncing: No init found\nc\n";
        let s = last_lines(console);
        assert!(
            s.starts_with("\nKernel panic - not syncing: No init found"),
            "{s}"
        );
        assert!(s.contains("last console lines:\na\nb"));
    }
}
