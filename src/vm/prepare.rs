//! Everything `mkt run` decides before QEMU starts: the kernel, the rootfs,
//! the guest's files and initramfs, the QEMU command line.

use super::cmdline::{check_cmdline, kernel_words};
use super::error::RunError;
use super::request::RunOptions;
use super::request::{
    choose_fs, find_rootfs, find_setup, guest_mem, machine, net_mode, read_boot_script, served_ids,
};
use super::ssh::ensure_ssh_keys;
use super::supervise::host_terminal;
use crate::config::{Config, InitMode, Paths, Setup};
use crate::guest::plan::{READY_PORT, WINSIZE_PORT};
use crate::guest::{self, FsKind, GuestMount, GuestUser, Mode, PlanInput, RootfsEtc};
use crate::host::{self, kvm};
use crate::kernel::depmod::{host_depmod, modules_boot_record};
use crate::kernel::{Kernel, kernel_option, resolve_kernel};
use crate::vm::net;
use crate::vm::qemu::{self, Console, Net, Port, Share, VmSpec};
use std::io;
use std::path::{Path, PathBuf};

/// Modules a distro kernel needs before it can mount the root and talk to mkt.
/// virtio_mmio is the transport on microvm (`--profile microvm`); `button`
/// (the ACPI power button) lets the init act on `mkt stop`'s power-off.
pub(crate) const BOOT_MODULES: &[&str] = &[
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
pub(crate) fn boot_module_names(fs: FsKind, bus: qemu::Bus) -> Vec<&'static str> {
    let other = fs_modules(match fs {
        FsKind::NineP => FsKind::Virtiofs,
        FsKind::Virtiofs => FsKind::NineP,
    });
    BOOT_MODULES
        .iter()
        .copied()
        .filter(|m| !other.contains(m))
        .filter(|m| *m != "virtio_mmio" || bus == qemu::Bus::Mmio)
        .collect()
}

/// The modules a root file system over `fs` needs.
fn fs_modules(fs: FsKind) -> &'static [&'static str] {
    match fs {
        FsKind::NineP => &["9p", "9pnet_virtio"],
        FsKind::Virtiofs => &["virtiofs"],
    }
}

/// The modules to pack into the initramfs, decompressed.
pub(crate) fn boot_modules(
    kernel: &Kernel,
    fs: FsKind,
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
    for &must in fs_modules(fs).iter().chain(&["overlay", "virtio_console"]) {
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
pub(crate) fn through_tree_link(tree: &Path, guest: &Path) -> PathBuf {
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
pub(crate) fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn read_etc(rootfs: &Path) -> RootfsEtc {
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
pub(crate) struct Prepared {
    pub spec: VmSpec,
    pub files: guest::Generated,
    pub initrd: Vec<u8>,
    pub accel_note: Option<String>,
    pub exec: bool,
    /// The virtiofsd binary when shares go over virtiofs.
    pub virtiofsd: Option<PathBuf>,
    /// The id map the root share's virtiofsd runs under (a tree with
    /// subordinate-id owners), else the caller's own ids.
    pub root_ids: Option<crate::sandbox::Ids>,
    pub user: String,
    pub rootfs: PathBuf,
    pub net_mode: net::Mode,
    /// The NVMe disk's size, when there is one (the file is made at run).
    pub nvme_mib: Option<u64>,
    /// The guest says on a port when its sshd listens.
    pub ssh_reports_ready: bool,
}

/// Resolves and generates everything. Its side effects are the caches it
/// fills on the way (a rootfs built on first use, ssh keys, depmod's files).
pub fn prepare(
    opts: &RunOptions,
    config: &Config,
    paths: &Paths,
    run_dir: &Path,
) -> Result<Prepared, RunError> {
    let (setup_name, setup) = find_setup(opts, config)?;
    let rootfs = find_rootfs(opts, &setup, config, paths)?;
    let root_ids = served_ids(paths, &rootfs)?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let kernel_arg =
        (opts.kernel.as_ref().or(setup.kernel.as_ref())).or(config.defaults.kernel.as_ref());
    let kernel = resolve_kernel(
        kernel_arg.map(|p| p.as_path()),
        opts.modules.as_deref(),
        &cwd,
        &rootfs,
    )?;
    let boot_script = read_boot_script(opts, &setup)?;
    let (accel, accel_note) = kvm::choose(opts.accel.clone(), kvm::probe);
    let machine = machine(opts, &setup, paths)?;
    let net_mode = net_mode(opts, &setup);
    let qemu_bin = host::probe::find_program(crate::arch::HOST.qemu).ok_or(RunError::NoQemu)?;
    let (fs, virtiofsd) = choose_fs(opts.fs, root_ids.is_some(), &rootfs, &kernel)?;
    let mut user = GuestUser::of(crate::host::user::current());
    user.shell = ["/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|s| rootfs.join(&s[1..]).exists())
        .unwrap_or("/bin/sh")
        .into();
    let host = host_shares(
        opts, &setup, config, paths, run_dir, &user, &kernel, &rootfs,
    )?;
    let mounts = host.mounts(fs);
    let cwd_in_guest = host
        .shared
        .iter()
        .any(|(s, _)| cwd.starts_with(s))
        .then(|| cwd.clone());

    let exec = !opts.command.is_empty();
    let mode = if exec {
        Mode::Exec(opts.command.clone())
    } else {
        interactive_mode(opts.init, &rootfs)
    };
    let net = net_mode != net::Mode::None;
    let sriov = machine.num_vfs.map(|n| sriov(opts, &setup, n));
    let virt = soft_rdma(opts, &setup, &kernel, &rootfs)?;
    machine.check_kernel(&kernel, &rootfs)?;
    let ssh_keys = (!exec && net && rootfs.join("usr/sbin/sshd").exists())
        .then(|| ensure_ssh_keys(&paths.data_dir.join("ssh")))
        .transpose()?;
    let hostname = setup_name.clone().unwrap_or_else(|| "mkt".into());
    let term = if exec { None } else { host_terminal() };
    let relay_size = mode == Mode::Shell && term.is_some();
    let host = host.through_tree_links(&rootfs);
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
        links: host.links,
        depmod_release: host.depmod_release,
        extra_files: host.extra_files,
        etc: read_etc(&rootfs),
        ssh: ssh_keys.as_ref().map(|k| guest::SshSetup {
            authorized_key: k.client_pub.clone(),
            host_key: k.host_private.clone(),
        }),
        net,
        // A bridge normally has a DHCP server; a bare tap may never get one,
        // so the guest waits less before booting on without an address.
        dhcp: match net_mode {
            net::Mode::Bridge(_) => Some(30),
            net::Mode::Tap => Some(5),
            _ => None,
        },
        sriov,
        virt,
        boot_script,
        term,
    };
    let files = guest::generate(&input);
    let initrd = guest::initramfs::build(&files, &boot_modules(&kernel, fs, machine.profile.bus)?)
        .map_err(RunError::Initramfs)?;

    let shares = qemu_shares(fs, run_dir, &rootfs, &mounts);
    let mut ports = qemu_ports(exec, relay_size, run_dir);
    let net = qemu_net(
        opts,
        &setup,
        setup_name.as_deref(),
        &net_mode,
        net,
        exec,
        ssh_keys.is_some(),
    )?;
    // The guest says when its sshd listens (mkt's init, or a unit in
    // systemd mode), so `mkt ssh` waits for that rather than connecting early.
    let ssh_reports_ready = ssh_keys.is_some() && matches!(net, Net::User { ssh_port: Some(_) });
    if ssh_reports_ready {
        ports.push(Port {
            name: READY_PORT.into(),
            socket: run_dir.join("ready.sock"),
        });
    }
    let nvme_name = setup_name.as_deref().unwrap_or("run");
    let spec = VmSpec {
        qemu: qemu_bin,
        cpus: opts
            .cpus
            .or(setup.cpus.map(crate::config::Cpus::get))
            .unwrap_or_else(crate::host::user::available_cpus),
        mem_mib: guest_mem(opts, &setup, machine.pci.len()),
        kernel: kernel.image(),
        initrd: Some(run_dir.join("initrd")),
        append: kernel_words(opts, exec, &machine.profile, &accel),
        profile: machine.profile,
        accel,
        shares,
        console: if exec {
            Console::Log(console_log(paths, setup_name.as_deref().unwrap_or("run")))
        } else {
            Console::Interactive
        },
        ports,
        qmp: run_dir.join("qmp.sock"),
        net,
        pci: machine.pci,
        nvme: machine.nvme_mib.map(|_| qemu::Nvme {
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
        root_ids: root_ids.filter(|_| fs == FsKind::Virtiofs),
        user: input.user.name.clone(),
        rootfs,
        net_mode,
        nvme_mib: machine.nvme_mib,
        ssh_reports_ready,
    })
}

/// The root and the host directories as QEMU shares.
fn qemu_shares(fs: FsKind, run_dir: &Path, rootfs: &Path, mounts: &[GuestMount]) -> Vec<Share> {
    let qfs = |tag: &str, path: &Path, ro: bool| Share {
        tag: tag.into(),
        path: path.into(),
        readonly: ro,
        virtiofsd: (fs == FsKind::Virtiofs).then(|| run_dir.join(format!("vfs-{tag}.sock"))),
    };
    let mut shares = vec![qfs("root", rootfs, true)];
    shares.extend(
        mounts
            .iter()
            .map(|m| qfs(&m.tag, &m.guest_path, m.readonly)),
    );
    shares
}

/// The virtio-serial ports: the command's output and status (exec mode),
/// else the terminal's size after a resize (SIGWINCH), for the init to set
/// on the console: a serial line carries none.
fn qemu_ports(exec: bool, relay_size: bool, run_dir: &Path) -> Vec<Port> {
    if exec {
        ["stdout", "stderr", "status"]
            .iter()
            .map(|n| Port {
                name: format!("mkt.{n}"),
                socket: run_dir.join(format!("{n}.sock")),
            })
            .collect()
    } else if relay_size {
        vec![Port {
            name: WINSIZE_PORT.into(),
            socket: run_dir.join("winsize.sock"),
        }]
    } else {
        Vec::new()
    }
}

/// Host directories the guest sees at the same path, and the kernel's
/// modules linked into the guest's /lib/modules.
struct HostShares {
    /// (directory, read-only).
    shared: Vec<(PathBuf, bool)>,
    /// (guest path, host target) links for the kernel's modules.
    links: Vec<(PathBuf, PathBuf)>,
    depmod_release: Option<String>,
    extra_files: Vec<guest::GenFile>,
}

/// Home (rw), --dir and config dirs, the kernel tree or modules dir (ro)
/// unless already inside one of them.
#[allow(clippy::too_many_arguments)]
fn host_shares(
    opts: &RunOptions,
    setup: &Setup,
    config: &Config,
    paths: &Paths,
    run_dir: &Path,
    user: &GuestUser,
    kernel: &Kernel,
    rootfs: &Path,
) -> Result<HostShares, RunError> {
    let mut shared: Vec<(PathBuf, bool)> = vec![(user.home.clone(), false)];
    for d in opts
        .dirs
        .iter()
        .chain(&setup.dirs)
        .chain(&config.defaults.dirs)
    {
        let d = std::fs::canonicalize(d).map_err(|e| RunError::Dir(d.clone(), e))?;
        if !shared.iter().any(|(s, _)| d.starts_with(s)) {
            shared.push((d, false));
        }
    }
    let mut links = Vec::new();
    let mut depmod_release = None;
    let mut extra_files = Vec::new();
    match kernel {
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
    Ok(HostShares {
        shared,
        links,
        depmod_release,
        extra_files,
    })
}

impl HostShares {
    /// The shared directories as the guest mounts them.
    fn mounts(&self, fs: FsKind) -> Vec<GuestMount> {
        self.shared
            .iter()
            .enumerate()
            .map(|(i, (path, ro))| GuestMount {
                tag: format!("m{i}"),
                guest_path: path.clone(),
                readonly: *ro,
                kind: fs,
            })
            .collect()
    }

    /// Written through the tree's own links (merged /usr: /lib -> usr/lib).
    fn through_tree_links(mut self, rootfs: &Path) -> HostShares {
        self.links = self
            .links
            .into_iter()
            .map(|(l, t)| (through_tree_link(rootfs, &l), t))
            .collect();
        for f in &mut self.extra_files {
            if let Some(d) = &f.dest {
                f.dest = Some(
                    through_tree_link(rootfs, Path::new(d))
                        .display()
                        .to_string(),
                );
            }
        }
        self
    }
}

/// SR-IOV: how many VFs, and the vendor/device ids of the functions that
/// make them.
fn sriov(opts: &RunOptions, setup: &Setup, num_vfs: u32) -> guest::Sriov {
    let sys = host_sysfs();
    let ids: Option<Vec<_>> = opts
        .pci
        .iter()
        .chain(&setup.pci)
        .map(|b| sys.ids(b.as_str()))
        .collect();
    guest::Sriov {
        num_vfs,
        ids: ids.unwrap_or_default(),
    }
}

/// The soft RDMA devices asked for, each checked against the kernel's config.
fn soft_rdma(
    opts: &RunOptions,
    setup: &Setup,
    kernel: &Kernel,
    rootfs: &Path,
) -> Result<Vec<guest::SoftRdma>, RunError> {
    let virt: Vec<guest::SoftRdma> = opts.virt.iter().chain(&setup.virt).cloned().collect();
    for v in &virt {
        let option = if v.kind == "rxe" {
            "CONFIG_RDMA_RXE"
        } else {
            "CONFIG_RDMA_SIW"
        };
        if let Some(false) = kernel_option(kernel, rootfs, option) {
            return Err(RunError::NoSoftRdma {
                virt: v.to_string(),
                option,
            });
        }
    }
    Ok(virt)
}

/// The guest's network device, with the forwarded ssh port in NAT mode.
fn qemu_net(
    opts: &RunOptions,
    setup: &Setup,
    setup_name: Option<&str>,
    net_mode: &net::Mode,
    net: bool,
    exec: bool,
    has_keys: bool,
) -> Result<Net, RunError> {
    let mac = setup.mac.as_ref().map_or_else(
        || net::mac_for(setup_name.unwrap_or("mkt")),
        ToString::to_string,
    );
    Ok(match net_mode {
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
            ssh_port: if exec || (!has_keys && opts.ssh_port.is_none()) {
                None
            } else {
                Some(
                    opts.ssh_port
                        .map_or_else(free_port, Ok)
                        .map_err(RunError::FreePort)?,
                )
            },
        },
        _ => Net::None,
    })
}

/// The interactive mode: the one asked for, else mkt's shell (seconds to a
/// prompt and to SSH) when the tree has a shell, else its systemd.
pub(crate) fn interactive_mode(init: Option<InitMode>, rootfs: &Path) -> Mode {
    match init {
        Some(InitMode::Systemd) => Mode::Systemd,
        Some(InitMode::Shell) => Mode::Shell,
        None if rootfs.join("bin/sh").exists() || rootfs.join("bin/bash").exists() => Mode::Shell,
        None if rootfs.join("lib/systemd/systemd").exists() => Mode::Systemd,
        None => Mode::Shell,
    }
}

/// Where a command run's serial console goes: the run log dir, so it
/// (boot script output included) survives the run.
pub(crate) fn console_log(paths: &Paths, name: &str) -> PathBuf {
    let dir = paths.logs_dir.join("run");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!(
        "{name}-{}-{}.log",
        crate::util::time::epoch_secs(),
        std::process::id()
    ))
}

/// Writes the generated files and the initramfs into the run directory.
pub(crate) fn write_run_files(p: &Prepared, run_dir: &Path) -> Result<(), RunError> {
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

/// The sysfs VFIO works on: the host's, or (tests) $MKT_SYSFS_ROOT — never
/// for a set-id or file-capability mkt (AT_SECURE).
pub(crate) fn host_sysfs() -> crate::vm::vfio::Sysfs {
    // SAFETY: getauxval only reads the auxiliary vector.
    let secure = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
    match std::env::var_os("MKT_SYSFS_ROOT") {
        Some(root) if !secure => crate::vm::vfio::Sysfs::new(root),
        _ => crate::vm::vfio::Sysfs::default(),
    }
}

/// Makes the sparse disk file `path` at least `mib` MiB (never shrinks it:
/// that would cut off data). A file it creates is removed again on failure.
pub(crate) fn ensure_disk(path: &Path, mib: u64) -> Result<(), RunError> {
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
