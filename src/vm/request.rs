//! What the user asked for: `--flags` over the setup over the config's
//! defaults, each value checked here, before anything is prepared.

use super::error::RunError;
use super::script::check_boot_script;
use crate::config::{Config, InitMode, MemSize, NetMode, Paths, PciAddr, Setup, SoftRdma};
use crate::guest::FsKind;
use crate::host;
use crate::host::kvm;
use crate::kernel::{Kernel, kernel_has, kernel_option};
use crate::vm::qemu::{self, Profile};
use std::path::{Path, PathBuf};

/// What `mkt run` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub setup: Option<String>,
    pub rootfs: Option<String>,
    pub kernel: Option<PathBuf>,
    pub modules: Option<PathBuf>,
    pub command: Vec<String>,
    pub fs: Option<FsKind>,
    pub accel: Option<kvm::Accel>,
    pub cpus: Option<u32>,
    pub mem: Option<MemSize>,
    pub append: Vec<String>,
    pub qemu_args: Vec<String>,
    pub dirs: Vec<PathBuf>,
    pub gdb_port: Option<u16>,
    pub ssh_port: Option<u16>,
    pub net_none: bool,
    /// `--net`: nat, none, tap, bridge, bridge=BR [default: the setup's, nat].
    pub net: Option<NetMode>,
    /// Host PCI functions to pass through, added to the setup's.
    pub pci: Vec<PciAddr>,
    /// Size of the NVMe scratch disk.
    pub nvme: Option<MemSize>,
    /// `--virt`: soft RDMA devices, added to the setup's.
    pub virt: Vec<SoftRdma>,
    pub profile: Option<String>,
    pub boot_script: Option<PathBuf>,
    pub init: Option<InitMode>,
    pub keep: bool,
    /// Start another VM even when the setup is already running.
    pub new: bool,
    /// Reload the changed modules of a running SETUP before the command.
    pub reload: bool,
    pub dry_run: bool,
    pub quiet: bool,
    pub verbose: bool,
}

/// The rootfs tree (`--rootfs`, the setup's, the default), built or pulled
/// on first use.
pub(crate) fn find_rootfs(
    opts: &RunOptions,
    setup: &Setup,
    config: &Config,
    paths: &Paths,
) -> Result<PathBuf, RunError> {
    let wanted = crate::rootfs::resolve::wanted(opts.rootfs.as_deref(), Some(setup), config);
    let first_use = crate::rootfs::resolve::FirstUse {
        dry_run: opts.dry_run,
        quiet: opts.quiet,
        verbose: opts.verbose,
    };
    Ok(crate::rootfs::resolve::resolve(paths, &wanted, first_use)?.path(paths))
}

/// The boot script's bytes, checked first (`--boot-script`, else the setup's).
pub(crate) fn read_boot_script(
    opts: &RunOptions,
    setup: &Setup,
) -> Result<Option<Vec<u8>>, RunError> {
    let Some(script) = opts.boot_script.as_ref().or(setup.boot_script.as_ref()) else {
        return Ok(None);
    };
    check_boot_script(script)?;
    std::fs::read(script)
        .map(Some)
        .map_err(|e| RunError::BootScript(script.clone(), e.to_string()))
}

/// `--net-none`, `--net`, the setup's net, else NAT.
pub(crate) fn net_mode(opts: &RunOptions, setup: &Setup) -> NetMode {
    if opts.net_none {
        return NetMode::None;
    }
    opts.net
        .clone()
        .or(setup.net.clone())
        .unwrap_or(NetMode::Nat)
}

/// The setup named by `--setup` or the config's default (else an empty one).
pub(crate) fn find_setup(
    opts: &RunOptions,
    config: &Config,
) -> Result<(Option<String>, Setup), RunError> {
    let setup_name = opts.setup.clone().or_else(|| config.defaults.setup.clone());
    let Some(n) = &setup_name else {
        return Ok((None, Setup::default()));
    };
    let setup = config.setups.get(n).cloned().ok_or_else(|| {
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
    })?;
    Ok((setup_name, setup))
}

/// A tree whose owners are shifted by the user's subordinate ids is served
/// from a user namespace with the same map, so the guest sees its real
/// owners (root's files as root's, setuid sudo working).
pub(crate) fn served_ids(
    paths: &Paths,
    rootfs: &Path,
) -> Result<Option<crate::sandbox::Ids>, RunError> {
    match rootfs
        .parent()
        .filter(|p| *p == paths.rootfs_dir)
        .and_then(|_| rootfs.file_name())
        .and_then(|n| crate::rootfs::meta(paths, &n.to_string_lossy()))
        .map(|m| m.owners)
    {
        Some(crate::rootfs::Owners::Mapped) if !nix::unistd::geteuid().is_root() => Ok(Some(
            crate::sandbox::Ids::for_owners()
                .map_err(|e| RunError::Owners(rootfs.to_path_buf(), e))?,
        )),
        _ => Ok(None),
    }
}

/// The machine's devices and profile, checked against each other.
pub(crate) struct Machine {
    pub(crate) pci: Vec<PciAddr>,
    pub(crate) num_vfs: Option<u32>,
    pub(crate) profile_name: String,
    pub(crate) profile: Profile,
    pub(crate) nvme_mib: Option<u64>,
}

impl Machine {
    /// Without the virtio-mmio transport the guest finds no root device and
    /// hangs; say so before booting.
    pub(crate) fn check_kernel(&self, kernel: &Kernel, rootfs: &Path) -> Result<(), RunError> {
        if self.profile.bus == qemu::Bus::Mmio
            && kernel_option(kernel, rootfs, "CONFIG_VIRTIO_MMIO") == Some(false)
        {
            return Err(RunError::Invalid(
                format!("--profile {}", self.profile_name),
                format!(
                    "the kernel {} lacks CONFIG_VIRTIO_MMIO, which microvm's devices need (build it with CONFIG_VIRTIO_MMIO=y, or use the default profile)",
                    kernel.image().display()
                ),
            ));
        }
        Ok(())
    }
}

pub(crate) fn machine(
    opts: &RunOptions,
    setup: &Setup,
    paths: &Paths,
) -> Result<Machine, RunError> {
    // Passed through: --pci, the setup's pci, and the functions its guest
    // hands on to a nested guest (they must reach that guest first).
    let mut pci: Vec<PciAddr> = Vec::new();
    for a in opts.pci.iter().chain(&setup.pci).chain(&setup.nested_pci) {
        if !pci.contains(a) {
            pci.push(a.clone());
        }
    }
    let num_vfs = setup.num_of_vfs.filter(|&n| n > 0 && !pci.is_empty());
    // Nested passthrough needs the guest's own IOMMU; SR-IOV needs PCIe
    // (the capability sits in extended config space): both get q35.
    let wants_iommu = !setup.nested_pci.is_empty() || num_vfs.is_some();
    let profile_name = opts
        .profile
        .clone()
        .or(setup.profile.clone())
        .unwrap_or_else(|| {
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
    let nvme_mib = opts.nvme.or(setup.nvme).map(MemSize::mib);
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
    Ok(Machine {
        pci,
        num_vfs,
        profile_name,
        profile,
        nvme_mib,
    })
}

/// The file system that shares the root (`--fs`, else virtiofs when it can
/// serve, else 9p when the kernel has it), and virtiofsd when it is virtiofs.
pub(crate) fn choose_fs(
    asked: Option<FsKind>,
    mapped_owners: bool,
    rootfs: &Path,
    kernel: &Kernel,
) -> Result<(FsKind, Option<PathBuf>), RunError> {
    let have_virtiofsd = host::probe::find_program("virtiofsd").is_some();
    let fs = match asked {
        Some(FsKind::Virtiofs) => FsKind::Virtiofs,
        Some(FsKind::NineP) => {
            if mapped_owners {
                tracing::warn!(
                    "9p shows {} with host ids (your subordinate ids), not its real owners; virtiofs shows them",
                    rootfs.display()
                );
            }
            FsKind::NineP
        }
        _ if mapped_owners && have_virtiofsd => FsKind::Virtiofs,
        // Both boot equally fast; virtiofs is ~1.8x faster on file-heavy
        // work (docs/run.md, BENCHMARKS), so it is the default when it can be.
        _ if have_virtiofsd && kernel_has(kernel, FsKind::Virtiofs) => FsKind::Virtiofs,
        _ if kernel_has(kernel, FsKind::NineP) => FsKind::NineP,
        _ => FsKind::Virtiofs,
    };
    let virtiofsd =
        match fs {
            FsKind::Virtiofs => Some(host::probe::find_program("virtiofsd").ok_or_else(|| {
                RunError::NoVirtiofsd {
                    nine_p: kernel_has(kernel, FsKind::NineP),
                }
            })?),
            FsKind::NineP => None,
        };
    Ok((fs, virtiofsd))
}

/// `--mem`, else the setup's mem (1 GiB by default) grown for passed
/// devices: they pin DMA memory (MKT's rule); an explicit --mem is taken as is.
pub(crate) fn guest_mem(opts: &RunOptions, setup: &Setup, passthrough_devices: usize) -> u64 {
    if let Some(m) = opts.mem {
        return m.mib();
    }
    let mem_mib = setup.mem.map_or(1024, MemSize::mib);
    qemu::mem_for_devices(mem_mib, passthrough_devices)
}
