//! The QEMU command line as data: a [`VmSpec`] and one pure builder per
//! concern, each returning the arguments it contributes.
//!
//! Paths are converted with `to_string_lossy`: QEMU options are text, and a
//! non-UTF-8 path could not be passed through its option parser anyway.

use std::path::{Path, PathBuf};

use super::profile::{Bus, Profile};
use crate::config::PciAddr;
use crate::host::kvm::Accel;

/// A host directory shared with the guest under a mount tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub path: PathBuf,
    /// Enforced by QEMU for 9p; for virtiofs virtiofsd must enforce it.
    pub readonly: bool,
    /// virtiofs (vhost-user-fs): where the already running virtiofsd
    /// listens. None: 9p, QEMU's built-in server (no helper, slower).
    pub virtiofsd: Option<PathBuf>,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// The terminal, multiplexed with the monitor: Ctrl-A X quits, Ctrl-A C
    /// toggles the monitor, Ctrl-C reaches the guest.
    Interactive,
    /// A log file (non-interactive runs).
    Log(PathBuf),
}

/// A virtio-serial port; QEMU connects as a client to `socket`, so mkt
/// must be listening there before QEMU starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The guest sees `/dev/virtio-ports/<name>`.
    pub name: String,
    pub socket: PathBuf,
}

/// Guest networking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Net {
    None,
    /// Slirp user networking; `ssh_port` forwards 127.0.0.1:PORT to guest port 22.
    User {
        ssh_port: Option<u16>,
    },
    /// A tap device mkt opened (and attached to a bridge); QEMU inherits
    /// `fd`. `None` until the tap exists (dry runs show a placeholder).
    Tap {
        fd: Option<i32>,
        mac: String,
    },
    /// qemu-bridge-helper (setuid, configured in /etc/qemu/bridge.conf)
    /// creates the tap: the unprivileged path to a bridge.
    BridgeHelper {
        bridge: String,
        helper: PathBuf,
        mac: String,
    },
}

/// A raw file attached as an NVMe controller with one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nvme {
    pub path: PathBuf,
    /// The controller's serial number, shown in the guest's sysfs.
    pub serial: String,
}

/// Everything needed to start one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The QEMU binary, argv[0].
    pub qemu: PathBuf,
    pub profile: Profile,
    pub accel: Accel,
    pub cpus: u32,
    pub mem_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command-line words, before the profile's. The caller supplies
    /// `console=ttyS0` (and root=, init=) here.
    pub append: Vec<String>,
    pub shares: Vec<Share>,
    pub console: Console,
    pub ports: Vec<Port>,
    /// The QMP socket QEMU listens on.
    pub qmp: PathBuf,
    pub net: Net,
    /// Host PCI functions (`DDDD:BB:DD.F`) passed through with VFIO.
    pub pci: Vec<PciAddr>,
    pub nvme: Option<Nvme>,
    /// Serves the gdb stub on 127.0.0.1:PORT.
    pub gdb_port: Option<u16>,
    /// Raw QEMU arguments, last so they can add to anything above.
    pub extra: Vec<String>,
}

/// The full argv, `spec.qemu` first. The order is fixed so that dry runs and
/// golden tests are stable.
pub fn command_line(spec: &VmSpec) -> Vec<String> {
    let bus = spec.profile.bus;
    let needs_shared_mem = spec.shares.iter().any(|s| s.virtiofsd.is_some());
    let mut argv = vec![lossy(&spec.qemu)];
    argv.extend(base_args());
    argv.extend(machine_args(&spec.profile, &spec.accel));
    // Profile args right after the machine: platform devices such as
    // intel-iommu must be created before the PCI devices below.
    argv.extend(spec.profile.args.iter().cloned());
    argv.extend(cpu_mem_args(spec.cpus, spec.mem_mib, needs_shared_mem));
    argv.extend(kernel_args(
        &spec.kernel,
        spec.initrd.as_deref(),
        &spec.append,
        &spec.profile,
    ));
    argv.extend(console_args(&spec.console));
    argv.extend(qmp_args(&spec.qmp));
    argv.extend(rng_args(bus));
    for (i, share) in spec.shares.iter().enumerate() {
        argv.extend(share_args(i, share, bus));
    }
    argv.extend(ports_args(&spec.ports, bus));
    argv.extend(net_args(&spec.net, bus));
    argv.extend(pci_args(&spec.pci, is_pcie(&spec.profile)));
    if let Some(nvme) = &spec.nvme {
        argv.extend(nvme_args(nvme));
    }
    if let Some(port) = spec.gdb_port {
        argv.extend(gdb_args(port));
    }
    argv.extend(spec.extra.iter().cloned());
    argv
}

/// Arguments every guest gets: no default devices, no host config files, no
/// window, and a guest reboot (or panic with `panic=-1`) ends QEMU.
pub fn base_args() -> Vec<String> {
    words(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
}

/// `-machine`, `-accel` and `-cpu`. KVM always uses the host CPU model; TCG
/// uses the profile's.
pub fn machine_args(profile: &Profile, accel: &Accel) -> Vec<String> {
    let cpu = match accel {
        Accel::Kvm => "host",
        Accel::Tcg => profile.cpu.as_str(),
    };
    vec![
        "-machine".into(),
        profile.machine.clone(),
        "-accel".into(),
        accel.qemu_arg().into(),
        "-cpu".into(),
        cpu.into(),
    ]
}

/// `-smp` and `-m`. vhost-user-fs needs guest RAM that virtiofsd can map,
/// hence a shared memfd backend when any share is virtiofs.
pub fn cpu_mem_args(cpus: u32, mem_mib: u64, needs_shared_mem: bool) -> Vec<String> {
    let mut args = vec![
        "-smp".into(),
        cpus.to_string(),
        "-m".into(),
        format!("{mem_mib}M"),
    ];
    if needs_shared_mem {
        args.extend([
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
        ]);
    }
    args
}

/// `-kernel`, `-initrd` and `-append`: `append` words, then the profile's.
/// `-append` is omitted when there are no words.
pub fn kernel_args(
    kernel: &Path,
    initrd: Option<&Path>,
    append: &[String],
    profile: &Profile,
) -> Vec<String> {
    // -kernel/-initrd/-append take their value verbatim: no comma escaping.
    let mut args = vec!["-kernel".into(), lossy(kernel)];
    if let Some(initrd) = initrd {
        args.extend(["-initrd".into(), lossy(initrd)]);
    }
    let cmdline = kernel_cmdline(append, &profile.append);
    if !cmdline.is_empty() {
        args.extend(["-append".into(), cmdline]);
    }
    args
}

/// x86's COMMAND_LINE_SIZE: the kernel keeps at most this many bytes of
/// its command line, the terminating NUL included.
pub(crate) const COMMAND_LINE_SIZE: usize = 2048;

/// The longest command line (bytes, without the NUL) the kernel whose image
/// starts with `head` takes: the bzImage header's `cmdline_size` (at 0x238,
/// boot protocol 2.06 and later), else COMMAND_LINE_SIZE - 1.
pub fn cmdline_limit(head: &[u8]) -> usize {
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    match (head.get(0x202..0x206), u16_at(0x206), u32_at(0x238)) {
        (Some(b"HdrS"), Some(v), Some(size)) if v >= 0x0206 && size > 0 => size as usize,
        _ => COMMAND_LINE_SIZE - 1,
    }
}

/// The kernel command line QEMU gets for `spec` (what `-append` says).
pub fn cmdline(spec: &VmSpec) -> String {
    kernel_cmdline(&spec.append, &spec.profile.append)
}

/// Joins `words` then `profile_words`, except that the profile's words go
/// before a `--` in `words`: everything after `--` is passed to init.
fn kernel_cmdline(words: &[String], profile_words: &[String]) -> String {
    let split = words.iter().position(|w| w == "--").unwrap_or(words.len());
    let (kernel, init) = words.split_at(split);
    kernel
        .iter()
        .chain(profile_words)
        .chain(init)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One shared directory; `index` makes the fsdev/chardev ids unique.
pub fn share_args(index: usize, share: &Share, bus: Bus) -> Vec<String> {
    let tag = qemu_escape(&share.tag);
    match &share.virtiofsd {
        None => {
            let ro = if share.readonly { ",readonly=on" } else { "" };
            vec![
                "-fsdev".into(),
                format!(
                    "local,id=fs{index},path={},security_model=none{ro},multidevs=remap",
                    escape_path(&share.path)
                ),
                "-device".into(),
                format!(
                    "{},fsdev=fs{index},mount_tag={tag}",
                    bus.virtio("virtio-9p")
                ),
            ]
        }
        Some(socket) => vec![
            "-chardev".into(),
            format!("socket,id=vfs{index},path={}", escape_path(socket)),
            "-device".into(),
            format!(
                "{},chardev=vfs{index},tag={tag}",
                bus.virtio("vhost-user-fs")
            ),
        ],
    }
}

/// The serial console. `-nodefaults` removed the default serial and monitor.
pub fn console_args(console: &Console) -> Vec<String> {
    match console {
        // signal=off: Ctrl-C goes to the guest instead of killing QEMU.
        Console::Interactive => words(&[
            "-chardev",
            "stdio,id=con,mux=on,signal=off",
            "-serial",
            "chardev:con",
            "-mon",
            "chardev=con,mode=readline",
        ]),
        // `file:` takes the rest of the value verbatim: no comma escaping.
        Console::Log(path) => vec!["-serial".into(), format!("file:{}", lossy(path))],
    }
}

/// A virtio-serial controller with one port per entry; nothing when empty.
pub fn ports_args(ports: &[Port], bus: Bus) -> Vec<String> {
    if ports.is_empty() {
        return Vec::new();
    }
    let mut args = vec![
        "-device".into(),
        format!("{},id=vser0", bus.virtio("virtio-serial")),
    ];
    for (i, port) in ports.iter().enumerate() {
        args.extend([
            "-chardev".into(),
            // No server=on: QEMU connects to mkt's listening socket.
            format!("socket,id=port{i},path={}", escape_path(&port.socket)),
            "-device".into(),
            format!(
                "virtserialport,bus=vser0.0,chardev=port{i},name={}",
                qemu_escape(&port.name)
            ),
        ]);
    }
    args
}

/// QMP on a unix socket; `wait=off` so QEMU boots without a client.
pub fn qmp_args(path: &Path) -> Vec<String> {
    vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", escape_path(path)),
    ]
}

/// The network card. `Net::None` adds nothing: `-nodefaults` already
/// removed the default NIC.
pub fn net_args(net: &Net, bus: Bus) -> Vec<String> {
    match net {
        Net::None => Vec::new(),
        Net::User { ssh_port } => {
            let mut netdev = "user,id=net0".to_owned();
            if let Some(port) = ssh_port {
                // Loopback only: the guest's sshd must not face the network.
                netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{port}-:22"));
            }
            vec![
                "-netdev".into(),
                netdev,
                "-device".into(),
                format!("{},netdev=net0", bus.virtio("virtio-net")),
            ]
        }
        Net::Tap { fd, mac } => {
            // The fd is the tap mkt opened and QEMU inherited; a dry run
            // shows where it goes.
            let fd = fd.map_or_else(|| "TAP_FD".to_owned(), |f| f.to_string());
            vec![
                "-netdev".into(),
                format!("tap,id=net0,fd={fd}"),
                "-device".into(),
                format!("{},netdev=net0,mac={mac}", bus.virtio("virtio-net")),
            ]
        }
        Net::BridgeHelper {
            bridge,
            helper,
            mac,
        } => vec![
            "-netdev".into(),
            format!(
                "bridge,id=net0,br={},helper={}",
                qemu_escape(bridge),
                escape_path(helper)
            ),
            "-device".into(),
            format!("{},netdev=net0,mac={mac}", bus.virtio("virtio-net")),
        ],
    }
}

/// Whether the machine is PCI Express (q35): passed-through devices then go
/// behind their own root port, where their extended config space (SR-IOV,
/// ATS, ACS capabilities) is visible to the guest.
pub fn is_pcie(profile: &Profile) -> bool {
    profile
        .machine
        .split(',')
        .next()
        .is_some_and(|m| m.starts_with("q35"))
}

/// VFIO passthrough of host PCI functions; on PCIe machines one
/// pcie-root-port each.
pub fn pci_args(devices: &[PciAddr], pcie: bool) -> Vec<String> {
    let mut args = Vec::new();
    for (i, bdf) in devices.iter().enumerate() {
        if pcie {
            args.extend([
                "-device".into(),
                format!("pcie-root-port,id=vfio-rp{i},chassis={}", i + 1),
                "-device".into(),
                format!("vfio-pci,host={bdf},bus=vfio-rp{i}"),
            ]);
        } else {
            args.extend(["-device".into(), format!("vfio-pci,host={bdf}")]);
        }
    }
    args
}

/// An NVMe controller backed by a raw file.
pub fn nvme_args(nvme: &Nvme) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={},if=none,id=nvm,format=raw", escape_path(&nvme.path)),
        "-device".into(),
        format!("nvme,serial={},drive=nvm", qemu_escape(&nvme.serial)),
    ]
}

/// The gdb stub, on loopback only.
pub fn gdb_args(port: u16) -> Vec<String> {
    vec!["-gdb".into(), format!("tcp:127.0.0.1:{port}")]
}

/// A virtio RNG: the guest's entropy pool fills at once, so boot does not
/// stall waiting for randomness.
pub fn rng_args(bus: Bus) -> Vec<String> {
    vec!["-device".into(), bus.virtio("virtio-rng")]
}

/// Escapes a value for a comma-separated QEMU option (`a=b,c=d`): a literal
/// comma is written `,,`.
pub fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// Memory for a guest with `passthrough_devices` host devices: each may pin
/// DMA buffers, so each gets 2 GiB on top of `base_mib`.
pub fn mem_for_devices(base_mib: u64, passthrough_devices: usize) -> u64 {
    let per_device = 2048u64.saturating_mul(passthrough_devices as u64);
    base_mib.saturating_add(per_device)
}

fn lossy(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn escape_path(path: &Path) -> String {
    qemu_escape(&path.to_string_lossy())
}

fn words(ws: &[&str]) -> Vec<String> {
    ws.iter().map(|w| (*w).to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(name: &str) -> Profile {
        Profile::load(name, None).unwrap()
    }

    /// Splits on spaces: none of the expected arguments below contain one.
    fn split(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn base_args_are_fixed() {
        assert_eq!(
            base_args(),
            split("-nodefaults -no-user-config -display none -no-reboot")
        );
    }

    #[test]
    fn machine_args_table() {
        let cases = [
            ("default", Accel::Kvm, "-machine q35 -accel kvm -cpu host"),
            ("default", Accel::Tcg, "-machine q35 -accel tcg -cpu max"),
            ("debug", Accel::Tcg, "-machine q35 -accel tcg -cpu max"),
            (
                "microvm",
                Accel::Kvm,
                "-machine microvm,isa-serial=on,rtc=on -accel kvm -cpu host",
            ),
            (
                "iommu",
                Accel::Tcg,
                "-machine q35,kernel-irqchip=split -accel tcg -cpu max",
            ),
        ];
        for (name, accel, want) in cases {
            assert_eq!(
                machine_args(&profile(name), &accel),
                split(want),
                "{name} {accel:?}"
            );
        }
        let mut p = profile("default");
        p.cpu = "Skylake-Client".into();
        assert_eq!(machine_args(&p, &Accel::Tcg)[5], "Skylake-Client");
        assert_eq!(machine_args(&p, &Accel::Kvm)[5], "host");
    }

    #[test]
    fn cpu_mem_args_table() {
        let cases = [
            (1, 512, false, "-smp 1 -m 512M"),
            (
                4,
                3072,
                true,
                "-smp 4 -m 3072M -object memory-backend-memfd,id=mem,size=3072M,share=on \
                 -numa node,memdev=mem",
            ),
        ];
        for (cpus, mem, shared, want) in cases {
            assert_eq!(cpu_mem_args(cpus, mem, shared), split(want));
        }
    }

    #[test]
    fn kernel_args_table() {
        let s = |ws: &[&str]| words(ws);
        let mut p = profile("default");
        let cases = [
            // Spec words first, then the profile's.
            (
                None,
                s(&["console=ttyS0", "quiet"]),
                s(&["i8042.noaux"]),
                s(&[
                    "-kernel",
                    "/k/bzImage",
                    "-append",
                    "console=ttyS0 quiet i8042.noaux",
                ]),
            ),
            (
                Some("/k/initrd,1.img"),
                s(&["console=ttyS0"]),
                vec![],
                s(&[
                    "-kernel",
                    "/k/bzImage",
                    "-initrd",
                    "/k/initrd,1.img",
                    "-append",
                    "console=ttyS0",
                ]),
            ),
            // Init's arguments after `--` stay last.
            (
                None,
                s(&["console=ttyS0", "--", "-x"]),
                s(&["i8042.noaux"]),
                s(&[
                    "-kernel",
                    "/k/bzImage",
                    "-append",
                    "console=ttyS0 i8042.noaux -- -x",
                ]),
            ),
            (None, vec![], vec![], s(&["-kernel", "/k/bzImage"])),
        ];
        for (initrd, append, profile_append, want) in cases {
            p.append = profile_append;
            let got = kernel_args(Path::new("/k/bzImage"), initrd.map(Path::new), &append, &p);
            assert_eq!(got, want, "{append:?}");
        }
    }

    #[test]
    fn share_args_table() {
        let share = |readonly, virtiofsd| Share {
            tag: "root".into(),
            path: PathBuf::from("/srv/a,b"),
            readonly,
            virtiofsd,
        };
        let vfs = || Some(PathBuf::from("/run/vfs,0.sock"));
        let cases = [
            (
                0,
                share(false, None),
                Bus::Pci,
                "-fsdev local,id=fs0,path=/srv/a,,b,security_model=none,multidevs=remap \
                 -device virtio-9p-pci,fsdev=fs0,mount_tag=root",
            ),
            (
                2,
                share(true, None),
                Bus::Mmio,
                "-fsdev local,id=fs2,path=/srv/a,,b,security_model=none,readonly=on,multidevs=remap \
                 -device virtio-9p-device,fsdev=fs2,mount_tag=root",
            ),
            (
                1,
                share(false, vfs()),
                Bus::Pci,
                "-chardev socket,id=vfs1,path=/run/vfs,,0.sock \
                 -device vhost-user-fs-pci,chardev=vfs1,tag=root",
            ),
            (
                0,
                share(true, vfs()),
                Bus::Mmio,
                "-chardev socket,id=vfs0,path=/run/vfs,,0.sock \
                 -device vhost-user-fs-device,chardev=vfs0,tag=root",
            ),
        ];
        for (i, sh, bus, want) in cases {
            assert_eq!(share_args(i, &sh, bus), split(want), "{sh:?} {bus:?}");
        }
    }

    #[test]
    fn console_args_table() {
        let cases = [
            (
                Console::Interactive,
                "-chardev stdio,id=con,mux=on,signal=off -serial chardev:con \
                 -mon chardev=con,mode=readline",
            ),
            // `file:` is not comma-separated: the path stays verbatim.
            (
                Console::Log("/tmp/a,b.log".into()),
                "-serial file:/tmp/a,b.log",
            ),
        ];
        for (console, want) in cases {
            assert_eq!(console_args(&console), split(want), "{console:?}");
        }
    }

    #[test]
    fn ports_args_table() {
        let ports = vec![
            Port {
                name: "mkt.ctl".into(),
                socket: "/run/ctl.sock".into(),
            },
            Port {
                name: "mkt.log".into(),
                socket: "/run/l,og.sock".into(),
            },
        ];
        let cases = [
            (vec![], Bus::Pci, ""),
            (
                ports[..1].to_vec(),
                Bus::Pci,
                "-device virtio-serial-pci,id=vser0 \
                 -chardev socket,id=port0,path=/run/ctl.sock \
                 -device virtserialport,bus=vser0.0,chardev=port0,name=mkt.ctl",
            ),
            (
                ports.clone(),
                Bus::Mmio,
                "-device virtio-serial-device,id=vser0 \
                 -chardev socket,id=port0,path=/run/ctl.sock \
                 -device virtserialport,bus=vser0.0,chardev=port0,name=mkt.ctl \
                 -chardev socket,id=port1,path=/run/l,,og.sock \
                 -device virtserialport,bus=vser0.0,chardev=port1,name=mkt.log",
            ),
        ];
        for (ports, bus, want) in cases {
            assert_eq!(ports_args(&ports, bus), split(want), "{ports:?} {bus:?}");
        }
    }

    #[test]
    fn net_args_table() {
        let cases = [
            (Net::None, Bus::Pci, ""),
            (
                Net::User { ssh_port: None },
                Bus::Pci,
                "-netdev user,id=net0 -device virtio-net-pci,netdev=net0",
            ),
            (
                Net::User {
                    ssh_port: Some(2222),
                },
                Bus::Mmio,
                "-netdev user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22 \
                 -device virtio-net-device,netdev=net0",
            ),
        ];
        for (net, bus, want) in cases {
            assert_eq!(net_args(&net, bus), split(want), "{net:?} {bus:?}");
        }
    }

    #[test]
    fn net_args_tap_and_bridge_helper() {
        let mac = "0a:6d:6b:01:02:03".to_string();
        let cases = [
            (
                Net::Tap {
                    fd: Some(5),
                    mac: mac.clone(),
                },
                "-netdev tap,id=net0,fd=5 -device virtio-net-pci,netdev=net0,mac=0a:6d:6b:01:02:03",
            ),
            (
                Net::Tap {
                    fd: None,
                    mac: mac.clone(),
                },
                "-netdev tap,id=net0,fd=TAP_FD -device virtio-net-pci,netdev=net0,mac=0a:6d:6b:01:02:03",
            ),
            (
                Net::BridgeHelper {
                    bridge: "br0".into(),
                    helper: "/usr/lib/qemu/qemu-bridge-helper".into(),
                    mac,
                },
                "-netdev bridge,id=net0,br=br0,helper=/usr/lib/qemu/qemu-bridge-helper \
                 -device virtio-net-pci,netdev=net0,mac=0a:6d:6b:01:02:03",
            ),
        ];
        for (net, want) in cases {
            assert_eq!(net_args(&net, Bus::Pci), split(want), "{net:?}");
        }
    }

    #[test]
    fn pci_args_table() {
        let two: Vec<PciAddr> = vec![
            "0000:05:00.0".parse().unwrap(),
            "0000:05:00.1".parse().unwrap(),
        ];
        let cases = [
            (vec![], true, ""),
            (
                two.clone(),
                false,
                "-device vfio-pci,host=0000:05:00.0 -device vfio-pci,host=0000:05:00.1",
            ),
            (
                two,
                true,
                "-device pcie-root-port,id=vfio-rp0,chassis=1 \
                 -device vfio-pci,host=0000:05:00.0,bus=vfio-rp0 \
                 -device pcie-root-port,id=vfio-rp1,chassis=2 \
                 -device vfio-pci,host=0000:05:00.1,bus=vfio-rp1",
            ),
        ];
        for (devs, pcie, want) in cases {
            assert_eq!(pci_args(&devs, pcie), split(want), "{devs:?} {pcie}");
        }
        let pcie: Vec<(&str, bool)> = ["default", "debug", "microvm", "iommu"]
            .iter()
            .map(|n| (*n, is_pcie(&profile(n))))
            .collect();
        assert_eq!(
            pcie,
            [
                ("default", true),
                ("debug", true),
                ("microvm", false),
                ("iommu", true)
            ]
        );
    }

    #[test]
    fn nvme_args_escape_the_path() {
        let n = Nvme {
            path: "/d/a,b.img".into(),
            serial: "mkt-x".into(),
        };
        assert_eq!(
            nvme_args(&n),
            split(
                "-drive file=/d/a,,b.img,if=none,id=nvm,format=raw -device nvme,serial=mkt-x,drive=nvm"
            )
        );
    }

    #[test]
    fn small_builders() {
        assert_eq!(
            qmp_args(Path::new("/run/q,mp.sock")),
            split("-qmp unix:/run/q,,mp.sock,server=on,wait=off")
        );
        assert_eq!(gdb_args(1234), split("-gdb tcp:127.0.0.1:1234"));
        assert_eq!(rng_args(Bus::Pci), split("-device virtio-rng-pci"));
        assert_eq!(rng_args(Bus::Mmio), split("-device virtio-rng-device"));
    }

    #[test]
    fn qemu_escape_table() {
        let cases = [
            ("", ""),
            ("/plain/path", "/plain/path"),
            ("a,b", "a,,b"),
            (",,", ",,,,"),
            ("x=y,z", "x=y,,z"),
        ];
        for (input, want) in cases {
            assert_eq!(qemu_escape(input), want, "{input:?}");
        }
    }

    #[test]
    fn mem_for_devices_table() {
        let cases = [
            (1024, 0, 1024),
            (1024, 1, 3072),
            (1024, 3, 7168),
            (u64::MAX, 1, u64::MAX),
        ];
        for (base, n, want) in cases {
            assert_eq!(mem_for_devices(base, n), want, "{base} {n}");
        }
    }

    #[test]
    fn command_line_golden() {
        let spec = VmSpec {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            profile: profile("iommu"),
            accel: Accel::Kvm,
            cpus: 2,
            mem_mib: 2048,
            kernel: "/b/arch/x86/boot/bzImage".into(),
            initrd: None,
            append: words(&["console=ttyS0", "rootfstype=virtiofs", "root=root"]),
            shares: vec![
                Share {
                    tag: "root".into(),
                    path: "/r".into(),
                    readonly: false,
                    virtiofsd: Some("/run/mkt/vfs.sock".into()),
                },
                Share {
                    tag: "src".into(),
                    path: "/home/u/linux".into(),
                    readonly: true,
                    virtiofsd: None,
                },
            ],
            console: Console::Log("/run/mkt/console.log".into()),
            ports: vec![Port {
                name: "mkt.ctl".into(),
                socket: "/run/mkt/ctl.sock".into(),
            }],
            qmp: "/run/mkt/qmp.sock".into(),
            net: Net::User {
                ssh_port: Some(10022),
            },
            pci: vec!["0000:05:00.0".parse().unwrap()],
            nvme: Some(Nvme {
                path: "/d/nvme/cx5.img".into(),
                serial: "mkt-cx5".into(),
            }),
            gdb_port: Some(1234),
            extra: words(&["-s"]),
        };
        let want = words(&[
            "/usr/bin/qemu-system-x86_64",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-machine",
            "q35,kernel-irqchip=split",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-device",
            "intel-iommu,intremap=on,caching-mode=on",
            "-smp",
            "2",
            "-m",
            "2048M",
            "-object",
            "memory-backend-memfd,id=mem,size=2048M,share=on",
            "-numa",
            "node,memdev=mem",
            "-kernel",
            "/b/arch/x86/boot/bzImage",
            "-append",
            "console=ttyS0 rootfstype=virtiofs root=root intel_iommu=on iommu=pt",
            "-serial",
            "file:/run/mkt/console.log",
            "-qmp",
            "unix:/run/mkt/qmp.sock,server=on,wait=off",
            "-device",
            "virtio-rng-pci",
            "-chardev",
            "socket,id=vfs0,path=/run/mkt/vfs.sock",
            "-device",
            "vhost-user-fs-pci,chardev=vfs0,tag=root",
            "-fsdev",
            "local,id=fs1,path=/home/u/linux,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=fs1,mount_tag=src",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            "socket,id=port0,path=/run/mkt/ctl.sock",
            "-device",
            "virtserialport,bus=vser0.0,chardev=port0,name=mkt.ctl",
            "-netdev",
            "user,id=net0,hostfwd=tcp:127.0.0.1:10022-:22",
            "-device",
            "virtio-net-pci,netdev=net0",
            "-device",
            "pcie-root-port,id=vfio-rp0,chassis=1",
            "-device",
            "vfio-pci,host=0000:05:00.0,bus=vfio-rp0",
            "-drive",
            "file=/d/nvme/cx5.img,if=none,id=nvm,format=raw",
            "-device",
            "nvme,serial=mkt-cx5,drive=nvm",
            "-gdb",
            "tcp:127.0.0.1:1234",
            "-s",
        ]);
        assert_eq!(command_line(&spec), want);
    }

    #[test]
    fn command_line_minimal_microvm() {
        let spec = VmSpec {
            qemu: "qemu-system-x86_64".into(),
            profile: profile("microvm"),
            accel: Accel::Tcg,
            cpus: 1,
            mem_mib: 512,
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            append: words(&["console=ttyS0"]),
            shares: vec![],
            console: Console::Interactive,
            ports: vec![],
            qmp: "/q".into(),
            net: Net::None,
            pci: vec![],
            nvme: None,
            gdb_port: None,
            extra: vec![],
        };
        let want = split(
            "qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot \
             -machine microvm,isa-serial=on,rtc=on -accel tcg -cpu max \
             -smp 1 -m 512M -kernel /k -initrd /i -append",
        )
        .into_iter()
        .chain(["console=ttyS0 i8042.noaux".to_owned()])
        .chain(split(
            "-chardev stdio,id=con,mux=on,signal=off -serial chardev:con \
             -mon chardev=con,mode=readline -qmp unix:/q,server=on,wait=off \
             -device virtio-rng-device",
        ))
        .collect::<Vec<_>>();
        assert_eq!(command_line(&spec), want);
        // What the kernel gets is what -append says.
        assert_eq!(cmdline(&spec), "console=ttyS0 i8042.noaux");
    }

    #[test]
    fn cmdline_limit_comes_from_the_bzimage_header() {
        let mut head = vec![0u8; 0x240];
        // No header: x86's default.
        assert_eq!(cmdline_limit(&head), 2047);
        assert_eq!(cmdline_limit(&[]), 2047);
        head[0x202..0x206].copy_from_slice(b"HdrS");
        head[0x238..0x23c].copy_from_slice(&4095u32.to_le_bytes());
        // Protocol 2.05 has no cmdline_size field.
        head[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
        assert_eq!(cmdline_limit(&head), 2047);
        head[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        assert_eq!(cmdline_limit(&head), 4095);
        // A header that says 0 says nothing.
        head[0x238..0x23c].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(cmdline_limit(&head), 2047);
    }
}
