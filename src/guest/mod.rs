//! The guest side of `mkt run`, as generated files: the plan mkt's guest
//! init carries out (src/guest/init/; the format is [`plan`]'s), the /etc
//! files that make the invoking user exist in the guest, and the setup
//! script. Everything here is pure: inputs in, file contents out; the
//! caller packs them into the initramfs (and keeps a copy in the run
//! directory for --keep/--dry-run).

pub mod cpio;
pub mod initramfs;
pub mod modules;
pub mod plan;

use plan::Op;
pub use plan::{FsKind, Terminal};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The host user, recreated in the guest with the same name, ids and home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub group: String,
    pub home: PathBuf,
    pub shell: String,
}

impl GuestUser {
    /// The host user, with `/bin/sh` until the caller knows the tree's shell.
    pub fn of(u: crate::host::user::User) -> Self {
        GuestUser {
            name: u.name,
            uid: u.uid,
            gid: u.gid,
            group: u.group,
            home: u.home,
            shell: "/bin/sh".into(),
        }
    }
}

/// What PID 1 does once the root is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Run one command as the user, output on virtio-serial ports.
    Exec(Vec<String>),
    /// A login shell of the user on the console, no init system.
    Shell,
    /// The rootfs's systemd, with autologin on the serial console.
    Systemd,
}

/// A host directory mounted in the guest at `guest_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuestMount {
    pub tag: String,
    pub guest_path: PathBuf,
    pub readonly: bool,
    pub kind: FsKind,
}

/// What mkt knows about the rootfs's /etc, read on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RootfsEtc {
    pub passwd: String,
    pub group: String,
    /// None when the host user cannot read it (a root-owned tree).
    pub shadow: Option<String>,
    /// Whether the host user can read /etc/sudoers (and so can QEMU's 9p).
    pub sudoers_readable: bool,
    pub has_sudo: bool,
    pub has_sshd: bool,
}

/// The SSH access mkt injects: the user's key and a host key of mkt's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SshSetup {
    pub authorized_key: String,
    pub host_key: String,
}

/// Everything the plan depends on.
#[derive(Debug, Clone)]
pub(crate) struct PlanInput {
    pub mode: Mode,
    pub user: GuestUser,
    pub hostname: String,
    pub root: GuestMount,
    pub mounts: Vec<GuestMount>,
    pub cwd: Option<PathBuf>,
    /// Symlinks to create: (link in the guest, target).
    pub links: Vec<(PathBuf, PathBuf)>,
    /// Kernel release whose /lib/modules needs a depmod run in the guest
    /// (when the host could not index the modules itself).
    pub depmod_release: Option<String>,
    /// More files for the guest, e.g. the modules index depmod made on the host.
    pub extra_files: Vec<GenFile>,
    pub etc: RootfsEtc,
    pub ssh: Option<SshSetup>,
    pub net: bool,
    /// The network is a real one (bridge, tap): eth0 gets its address by
    /// DHCP instead of QEMU NAT's fixed one, giving up after this many seconds.
    pub dhcp: Option<u32>,
    /// SR-IOV: virtual functions to create in the guest after boot.
    pub sriov: Option<Sriov>,
    /// Soft RDMA devices to make after boot (`--virt`).
    pub virt: Vec<SoftRdma>,
    /// The boot script's content, run as the user once booted.
    pub boot_script: Option<Vec<u8>>,
    /// The host terminal, copied to the guest's console (interactive modes).
    pub term: Option<Terminal>,
}

/// `num_of_vfs` of a setup: VFs to create on the passed-through functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sriov {
    pub num_vfs: u32,
    /// `(vendor, device)` of the passed functions as sysfs shows them
    /// (`0x15b3`); empty: every SR-IOV capable function of the guest.
    pub ids: Vec<(String, String)>,
}

/// A soft RDMA device over a guest netdev: `rxe` (soft-RoCE) or `siw`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoftRdma {
    pub kind: &'static str,
    pub netdev: String,
}

/// The run's generated guest files, packed into the initramfs's /mkt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generated {
    pub files: Vec<GenFile>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenFile {
    /// File name in the initramfs's /mkt.
    pub name: String,
    pub content: Vec<u8>,
    /// Where the guest init copies it (None: read in place, like the plan).
    pub dest: Option<String>,
    pub mode: u32,
}

impl Generated {
    pub fn get(&self, name: &str) -> Option<&GenFile> {
        self.files.iter().find(|f| f.name == name)
    }

    pub fn text(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|f| String::from_utf8_lossy(&f.content).into_owned())
    }
}

/// Where mkt installs its guest tool (the init binary) in every guest.
pub(crate) const GUEST_TOOL: &str = "/usr/local/bin/mkt";

/// `path` as a systemd unit setting's value: `%` starts a specifier.
fn unit_path(path: &str) -> String {
    path.replace('%', "%%")
}

/// The tree's sshd, which shell mode starts itself.
pub(crate) const SSHD: &str = "/usr/sbin/sshd";

/// Where the boot script is put in the guest.
const BOOT_SCRIPT: &str = "/etc/mkt/boot-script";

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// /etc/passwd with the user's line replacing any entry of the same name or uid.
pub(crate) fn passwd_with_user(passwd: &str, u: &GuestUser) -> String {
    let mut out = String::new();
    for line in passwd.lines() {
        let mut f = line.split(':');
        let (name, uid) = (f.next().unwrap_or(""), f.nth(1).unwrap_or(""));
        if name == u.name || uid == u.uid.to_string() {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{}:x:{}:{}:{}:{}:{}",
        u.name,
        u.uid,
        u.gid,
        u.name,
        u.home.display(),
        u.shell
    );
    out
}

/// /etc/group with the user's primary group (same name and gid as on the host).
pub(crate) fn group_with_user(group: &str, u: &GuestUser) -> String {
    let mut out = String::new();
    for line in group.lines() {
        let mut f = line.split(':');
        let (name, gid) = (f.next().unwrap_or(""), f.nth(1).unwrap_or(""));
        if name == u.group || gid == u.gid.to_string() {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    let _ = writeln!(out, "{}:x:{}:", u.group, u.gid);
    out
}

/// The gid of group `name` in an /etc/group text.
pub(crate) fn group_gid(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
    })
}

/// /etc/shadow with a password-less-login entry for the user (`*`: no
/// password login; console autologin and SSH keys still work). Without a
/// readable shadow, one is made from passwd so PAM finds every account.
pub(crate) fn shadow_with_user(shadow: Option<&str>, passwd: &str, u: &GuestUser) -> String {
    let base = match shadow {
        Some(s) => s.to_string(),
        None => passwd
            .lines()
            .filter_map(|l| l.split(':').next())
            .filter(|n| !n.is_empty())
            .map(|n| format!("{n}:*:19000:0:99999:7:::\n"))
            .collect(),
    };
    let mut out: String = base
        .lines()
        .filter(|l| l.split(':').next() != Some(u.name.as_str()))
        .map(|l| format!("{l}\n"))
        .collect();
    let _ = writeln!(out, "{}:*:19000:0:99999:7:::", u.name);
    out
}

/// The script the init runs as root in the new root before the mode starts,
/// when there is work only the guest can do: indexing modules when the host
/// could not run depmod. None otherwise: every exec costs ~0.2 s under TCG.
pub(crate) fn setup_script(input: &PlanInput) -> Option<String> {
    let mut body = String::new();
    if let Some(rel) = &input.depmod_release {
        body += &format!("command -v depmod >/dev/null && depmod -a {rel} 2>/dev/null\n");
    }
    if let Some(s) = &input.sriov {
        body += &sriov_script(s);
    }
    for v in &input.virt {
        body += &soft_rdma_script(v);
    }
    if body.is_empty() {
        return None;
    }
    Some(format!(
        "#!/bin/sh\n# Generated by mkt for this run; runs as root before the command.\n{body}exit 0\n"
    ))
}

/// Creates `num_vfs` VFs on each passed-through PF. The guest's PCI
/// addresses differ from the host's, so PFs are found by vendor:device;
/// their driver (which creates the VFs) is loaded first, as no udev ran yet.
fn sriov_script(s: &Sriov) -> String {
    let filter = if s.ids.is_empty() {
        String::new()
    } else {
        let ids: Vec<String> = s.ids.iter().map(|(v, d)| format!("{v}:{d}")).collect();
        format!(
            "  case \"$(cat $d/vendor):$(cat $d/device)\" in {}) ;; *) continue ;; esac\n",
            ids.join("|")
        )
    };
    format!(
        "# SR-IOV (num_of_vfs = {n})\n\
         for d in /sys/bus/pci/devices/*; do\n\
         \x20 [ -e $d/sriov_totalvfs ] || continue\n\
         {filter}\
         \x20 [ -e $d/driver ] || modprobe -q \"$(cat $d/modalias)\" 2>/dev/null\n\
         \x20 echo {n} > $d/sriov_numvfs && echo \"mkt: {n} VFs on ${{d##*/}}\" >&2 \
         || echo \"mkt: cannot create {n} VFs on ${{d##*/}}\" >&2\n\
         done\n",
        n = s.num_vfs
    )
}

/// Makes a soft RDMA device over a netdev with iproute2's `rdma` (the
/// modules' old `add` parameter is gone since Linux 5.x), as MKT's "virt"
/// devices did, naming it `rxe_eth0` / `siw_eth0`.
fn soft_rdma_script(v: &SoftRdma) -> String {
    let (k, n) = (v.kind, &v.netdev);
    let module = if k == "rxe" { "rdma_rxe" } else { "siw" };
    format!(
        "# --virt {k}-{n}\n\
         modprobe -q {module} 2>/dev/null\n\
         if ! command -v rdma >/dev/null; then \
         echo \"mkt: --virt {k}-{n}: no rdma tool (iproute2) in the rootfs\" >&2\n\
         elif rdma link add {k}_{n} type {k} netdev {n}; then echo \"mkt: {k}_{n} over {n}\" >&2\n\
         else echo \"mkt: --virt {k}-{n}: cannot add the link\" >&2; fi\n"
    )
}

/// QEMU's user-mode network: fixed addresses, no DHCP wait.
pub(crate) const NAT_GUEST: (&str, &str, &str) = ("10.0.2.15", "255.255.255.0", "10.0.2.2");

/// Generates the plan and every file it refers to.
pub(crate) fn generate(input: &PlanInput) -> Generated {
    let mut files = etc_files(input);
    files.extend(sudoers_file(input));
    files.extend(ssh_files(input));
    if input.mode == Mode::Systemd {
        files.extend(console_files(input));
    }
    files.extend(ssh_ready_unit(input));
    files.extend(boot_script_files(input));
    if let Some(script) = setup_script(input) {
        files.push(file("setup.sh", script, Some("/run/mkt/setup.sh"), 0o755));
    }
    if input.net && input.dhcp.is_none() {
        files.push(file(
            "resolv.conf",
            "nameserver 10.0.2.3\n",
            Some("/etc/resolv.conf"),
            0o644,
        ));
    }
    files.extend(input.extra_files.iter().cloned());
    let plan = plan_ops(input, &files);
    files.push(file("plan", plan::encode(&plan), None, 0o644));
    Generated { files }
}

fn file(name: &str, content: impl Into<Vec<u8>>, dest: Option<&str>, mode: u32) -> GenFile {
    GenFile {
        name: name.to_string(),
        content: content.into(),
        dest: dest.map(str::to_string),
        mode,
    }
}

/// The user's accounts and the machine's names in /etc.
fn etc_files(input: &PlanInput) -> Vec<GenFile> {
    let (u, etc) = (&input.user, &input.etc);
    let h = &input.hostname;
    vec![
        file(
            "passwd",
            passwd_with_user(&etc.passwd, u),
            Some("/etc/passwd"),
            0o644,
        ),
        file(
            "group",
            group_with_user(&etc.group, u),
            Some("/etc/group"),
            0o644,
        ),
        file(
            "shadow",
            shadow_with_user(etc.shadow.as_deref(), &etc.passwd, u),
            Some("/etc/shadow"),
            0o640,
        ),
        file("hostname", format!("{h}\n"), Some("/etc/hostname"), 0o644),
        file(
            "hosts",
            format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{h}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            ),
            Some("/etc/hosts"),
            0o644,
        ),
    ]
}

/// sudo's PATH in Debian's and Fedora's sudoers.
const SECURE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Password-less sudo for the user, when the tree has sudo.
fn sudoers_file(input: &PlanInput) -> Option<GenFile> {
    let etc = &input.etc;
    if !etc.has_sudo {
        return None;
    }
    let rule = format!("{} ALL=(ALL:ALL) NOPASSWD: ALL\n", input.user.name);
    Some(if etc.sudoers_readable {
        file("sudoers-mkt", rule, Some("/etc/sudoers.d/mkt"), 0o440)
    } else {
        // The tree's sudoers (and its includes) are unreadable through
        // the share, so sudo would refuse to run: give it a whole one, with
        // the distributions' secure_path (`sudo modprobe` from an ssh
        // session, whose PATH has no sbin).
        file(
            "sudoers",
            format!(
                "Defaults env_reset\nDefaults secure_path=\"{SECURE_PATH}\"\nroot ALL=(ALL:ALL) ALL\n{rule}"
            ),
            Some("/etc/sudoers"),
            0o440,
        )
    })
}

/// mkt's keys and the sshd drop-in that uses them.
fn ssh_files(input: &PlanInput) -> Vec<GenFile> {
    let Some(ssh) = &input.ssh else {
        return vec![];
    };
    vec![
        file(
            "authorized_keys",
            ssh.authorized_key.clone(),
            Some("/etc/mkt/authorized_keys"),
            0o644,
        ),
        file(
            "ssh_host_ed25519_key",
            ssh.host_key.clone(),
            Some("/etc/mkt/ssh_host_ed25519_key"),
            0o600,
        ),
        file(
            "sshd-mkt.conf",
            "# Generated by mkt: its host key, its key for the user.\n\
             HostKey /etc/mkt/ssh_host_ed25519_key\n\
             AuthorizedKeysFile .ssh/authorized_keys /etc/mkt/authorized_keys\n\
             PasswordAuthentication no\n\
             UseDNS no\n\
             # sntrup761's key exchange costs ~0.4 s per connection under TCG.\n\
             KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org\n",
            Some("/etc/ssh/sshd_config.d/mkt.conf"),
            0o644,
        ),
    ]
}

/// Systemd mode's autologin on the serial console.
fn console_files(input: &PlanInput) -> Vec<GenFile> {
    // Its own console unit rather than serial-getty@ttyS0: that one waits
    // for dev-ttyS0.device, which never appears in trees without udev.
    let mut files = vec![file(
        "mkt-console.service",
        format!(
            "[Unit]\nDescription=mkt console: {u} logged in on ttyS0\nAfter=systemd-user-sessions.service\n\n\
             [Service]\nExecStart=-/sbin/agetty --autologin {u} --noclear --keep-baud 115200,57600,38400,9600 ttyS0 {term}\n\
             Type=idle\nRestart=always\nUtmpIdentifier=ttyS0\nTTYPath=/dev/ttyS0\nTTYReset=yes\nTTYVHangup=yes\n\
             IgnoreSIGPIPE=no\nSendSIGHUP=yes\n\n[Install]\nWantedBy=multi-user.target\n",
            u = input.user.name,
            // The host terminal's TERM (agetty passes it to login), else systemd's.
            term = input
                .term
                .as_ref()
                .map(|t| t.term.clone())
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
                .unwrap_or_else(|| "$TERM".into()),
        ),
        Some("/etc/systemd/system/mkt-console.service"),
        0o644,
    )];
    // The serial line cannot carry a size and agetty resets none: the
    // login shell on ttyS0 sets the host terminal's from /etc/profile.
    if let Some(t) = input.term.as_ref().filter(|t| t.rows > 0 && t.cols > 0) {
        files.push(file(
            "mkt-console.sh",
            format!(
                "# Generated by mkt: the host terminal's size on the serial console.\n\
                 [ \"$(tty 2>/dev/null)\" = /dev/ttyS0 ] && stty rows {} cols {} 2>/dev/null\n",
                t.rows, t.cols
            ),
            Some("/etc/profile.d/mkt-console.sh"),
            0o644,
        ));
    }
    files
}

/// Whether systemd mode gets the unit that reports sshd's start.
fn wants_ssh_ready(input: &PlanInput) -> bool {
    input.mode == Mode::Systemd && input.ssh.is_some() && input.etc.has_sshd
}

fn ssh_ready_unit(input: &PlanInput) -> Option<GenFile> {
    // The host's `mkt ssh` waits for this word rather than knocking on a
    // port nothing listens on yet (QEMU's NAT then retries for seconds).
    // Debian calls the unit ssh, Fedora sshd; After= on a missing unit
    // is a no-op.
    wants_ssh_ready(input).then(|| {
        file(
            "mkt-ssh-ready.service",
            format!(
                "[Unit]\nDescription=mkt: tell the host that sshd listens\nAfter=ssh.service sshd.service\n\n\
                 [Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart={GUEST_TOOL} ssh-ready\n\n\
                 [Install]\nWantedBy=multi-user.target\n"
            ),
            Some("/etc/systemd/system/mkt-ssh-ready.service"),
            0o644,
        )
    })
}

/// The boot script, and in systemd mode the unit that runs it.
fn boot_script_files(input: &PlanInput) -> Vec<GenFile> {
    let Some(script) = &input.boot_script else {
        return vec![];
    };
    // Under /etc, not /run: systemd mounts a fresh /run at boot.
    let mut files = vec![file(
        "boot-script",
        script.clone(),
        Some(BOOT_SCRIPT),
        0o755,
    )];
    if input.mode == Mode::Systemd {
        let u = &input.user;
        files.push(file(
            "mkt-boot-script.service",
            format!(
                "[Unit]\nDescription=mkt boot script\nAfter=multi-user.target\n\n\
                 [Service]\nType=oneshot\nUser={u}\nWorkingDirectory={home}\nEnvironment=\"HOME={home_env}\"\n\
                 ExecStart={BOOT_SCRIPT}\n\
                 StandardOutput=journal+console\nStandardError=journal+console\n\n\
                 [Install]\nWantedBy=multi-user.target\n",
                u = u.name,
                // Not `~`: systemd takes root's home to be /root, while
                // mkt gives root the host's home, as in shell mode.
                home = unit_path(&u.home.to_string_lossy()),
                home_env = unit_path(&u.home.to_string_lossy())
                    .replace('\\', "\\\\")
                    .replace('"', "\\\""),
            ),
            Some("/etc/systemd/system/mkt-boot-script.service"),
            0o644,
        ));
    }
    files
}

fn symlink(target: String, link: String) -> Op {
    Op::Symlink { target, link }
}

/// The plan: what the init does, in order, with `files` (the generated
/// files but the plan itself) in place.
fn plan_ops(input: &PlanInput, files: &[GenFile]) -> Vec<Op> {
    let u = &input.user;
    let mut plan = vec![
        Op::Mode(match &input.mode {
            Mode::Exec(_) => plan::Mode::Exec,
            Mode::Shell => plan::Mode::Shell,
            Mode::Systemd => plan::Mode::Systemd,
        }),
        Op::Root {
            kind: input.root.kind,
            tag: input.root.tag.clone(),
        },
        Op::User(plan::User {
            name: u.name.clone(),
            uid: u.uid,
            gid: u.gid,
            home: p(&u.home),
        }),
        Op::Hostname(input.hostname.clone()),
    ];
    plan.extend(input.mounts.iter().map(|m| Op::Share {
        tag: m.tag.clone(),
        path: p(&m.guest_path),
        readonly: m.readonly,
        kind: m.kind,
    }));
    plan.extend(input.links.iter().map(|(l, t)| symlink(p(t), p(l))));
    plan.extend(file_ops(input, files));
    if input.mode == Mode::Systemd {
        plan.extend(systemd_links(input));
    }
    if input.boot_script.is_some() {
        plan.push(Op::Boot(BOOT_SCRIPT.into()));
    }
    if let (Mode::Shell, Some(t)) = (&input.mode, &input.term) {
        plan.push(Op::Term(t.clone()));
    }
    // `mkt modules-reload` and friends inside the guest.
    plan.push(Op::InstallSelf(GUEST_TOOL.into()));
    if let Some(cwd) = &input.cwd {
        plan.push(Op::Cwd(p(cwd)));
    }
    // Shell mode has no init system to start the tree's sshd: the init
    // does, with mkt's host key, so the advertised SSH port answers.
    if let (Mode::Shell, Some(_), true) = (&input.mode, &input.ssh, input.etc.has_sshd) {
        plan.push(Op::Sshd(SSHD.into()));
    }
    plan.extend(net_op(input));
    if files.iter().any(|f| f.name == "setup.sh") {
        plan.push(Op::Setup("/run/mkt/setup.sh".into()));
    }
    if let Mode::Exec(argv) = &input.mode {
        plan.push(Op::Exec(argv.clone()));
    }
    plan
}

/// Copies of the files that have a place in the guest.
fn file_ops(input: &PlanInput, files: &[GenFile]) -> Vec<Op> {
    // /etc/shadow is root:shadow 0640, as the tree's own (unix_chkpwd and
    // other shadow-group readers need it); everything else root:root.
    let shadow_gid = group_gid(&input.etc.group, "shadow").unwrap_or(0);
    files
        .iter()
        .filter_map(|f| {
            Some(Op::File {
                name: f.name.clone(),
                dest: f.dest.clone()?,
                mode: f.mode,
                uid: 0,
                gid: if f.name == "shadow" { shadow_gid } else { 0 },
            })
        })
        .collect()
}

/// Systemd mode's units enabled, and masked, in this run's overlay.
fn systemd_links(input: &PlanInput) -> Vec<Op> {
    let etc = "/etc/systemd/system";
    let wanted = |unit: &str| {
        symlink(
            format!("{etc}/{unit}"),
            format!("{etc}/multi-user.target.wants/{unit}"),
        )
    };
    let mut ops = vec![wanted("mkt-console.service")];
    // Masked: the getty mkt's console replaces; the getty on hvc0 every
    // shipped recipe enables (QEMU has no hvc0, so systemd would wait 90 s
    // for dev-hvc0.device); per-boot host key generation (Fedora's
    // sshd-keygen@: mkt brings its host key).
    for unit in [
        "serial-getty@ttyS0.service",
        "serial-getty@hvc0.service",
        "sshd-keygen@.service",
    ] {
        ops.push(symlink("/dev/null".into(), format!("{etc}/{unit}")));
    }
    if wants_ssh_ready(input) {
        ops.push(wanted("mkt-ssh-ready.service"));
    }
    if input.boot_script.is_some() {
        ops.push(wanted("mkt-boot-script.service"));
    }
    ops
}

/// eth0's address: the init's DHCP client on a real network (it writes
/// resolv.conf from the lease), QEMU NAT's fixed one otherwise.
fn net_op(input: &PlanInput) -> Option<Op> {
    if !input.net {
        return None;
    }
    Some(match input.dhcp {
        Some(timeout) => Op::Dhcp {
            dev: "eth0".into(),
            host: input.hostname.clone(),
            timeout,
        },
        None => {
            let (addr, mask, gw) = NAT_GUEST;
            Op::Net {
                dev: "eth0".into(),
                addr: addr.into(),
                mask: mask.into(),
                gateway: gw.into(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> GuestUser {
        GuestUser {
            name: "dev".into(),
            uid: 1000,
            gid: 1000,
            group: "dev".into(),
            home: "/home/dev".into(),
            shell: "/bin/bash".into(),
        }
    }

    fn input(mode: Mode) -> PlanInput {
        PlanInput {
            mode,
            user: user(),
            hostname: "cx5".into(),
            root: GuestMount {
                tag: "root".into(),
                guest_path: "/".into(),
                readonly: true,
                kind: FsKind::NineP,
            },
            mounts: vec![GuestMount {
                tag: "m0".into(),
                guest_path: "/home/dev".into(),
                readonly: false,
                kind: FsKind::NineP,
            }],
            cwd: Some("/home/dev/linux".into()),
            links: vec![(
                "/lib/modules/6.1.0/kernel/drivers/net/dummy.ko".into(),
                "/home/dev/linux/drivers/net/dummy.ko".into(),
            )],
            depmod_release: Some("6.1.0".into()),
            extra_files: vec![GenFile {
                name: "modules.dep".into(),
                content: b"kernel/drivers/net/dummy.ko:\n".to_vec(),
                dest: Some("/lib/modules/6.1.0/modules.dep".into()),
                mode: 0o644,
            }],
            etc: RootfsEtc {
                passwd: "root:x:0:0:root:/root:/bin/bash\nold:x:1000:1000::/home/old:/bin/sh\n"
                    .into(),
                group: "root:x:0:\nold:x:1000:\n".into(),
                shadow: None,
                sudoers_readable: false,
                has_sudo: true,
                has_sshd: true,
            },
            ssh: Some(SshSetup {
                authorized_key: "ssh-ed25519 AAAA mkt\n".into(),
                host_key: "-----BEGIN OPENSSH PRIVATE KEY-----\n".into(),
            }),
            net: true,
            dhcp: None,
            sriov: None,
            virt: vec![],
            boot_script: None,
            term: Some(Terminal {
                term: "xterm-256color".into(),
                rows: 50,
                cols: 132,
            }),
        }
    }

    #[test]
    fn dhcp_replaces_the_fixed_address() {
        let mut i = input(Mode::Exec(vec!["true".into()]));
        i.dhcp = Some(30);
        let g = generate(&i);
        let plan = g.text("plan").unwrap();
        assert!(plan.contains("dhcp\teth0\tcx5\t30\n"), "{plan}");
        assert!(!plan.contains("net\t") && g.get("resolv.conf").is_none());
    }

    /// `sh -n` accepts the script.
    fn assert_valid_sh(s: &str) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), s).unwrap();
        let ok = std::process::Command::new("sh")
            .arg("-n")
            .arg(f.path())
            .status()
            .unwrap();
        assert!(ok.success(), "{s}");
    }

    #[test]
    fn soft_rdma_devices_are_made_with_the_rdma_tool() {
        let mut i = input(Mode::Shell);
        i.depmod_release = None;
        i.virt = vec![
            SoftRdma {
                kind: "rxe",
                netdev: "eth0".into(),
            },
            SoftRdma {
                kind: "siw",
                netdev: "eth1".into(),
            },
        ];
        let s = setup_script(&i).unwrap();
        // Each device loads its own module.
        assert!(
            s.contains("# --virt rxe-eth0\nmodprobe -q rdma_rxe "),
            "{s}"
        );
        assert!(s.contains("# --virt siw-eth1\nmodprobe -q siw "), "{s}");
        assert!(
            s.contains("rdma link add rxe_eth0 type rxe netdev eth0"),
            "{s}"
        );
        assert!(s.contains("modprobe -q siw"), "{s}");
        assert!(
            s.contains("rdma link add siw_eth1 type siw netdev eth1"),
            "{s}"
        );
        assert_valid_sh(&s);
    }

    #[test]
    fn sriov_creates_vfs_on_the_passed_functions() {
        let mut i = input(Mode::Shell);
        i.depmod_release = None;
        assert!(setup_script(&i).is_none());
        i.sriov = Some(Sriov {
            num_vfs: 3,
            ids: vec![
                ("0x15b3".into(), "0x1017".into()),
                ("0x8086".into(), "0x1572".into()),
            ],
        });
        let s = setup_script(&i).unwrap();
        assert!(s.contains("echo 3 > $d/sriov_numvfs"), "{s}");
        assert!(s.contains("in 0x15b3:0x1017|0x8086:0x1572) ;;"), "{s}");
        assert!(s.contains("modprobe -q \"$(cat $d/modalias)\""), "{s}");
        let plan = generate(&i).text("plan").unwrap();
        assert!(plan.contains("setup\t/run/mkt/setup.sh\n"));
        // The script is valid sh.
        assert_valid_sh(&s);
        // Without ids: every SR-IOV capable function.
        i.sriov.as_mut().unwrap().ids.clear();
        assert!(!setup_script(&i).unwrap().contains("case"));
    }

    #[test]
    fn passwd_replaces_entries_with_same_name_or_uid() {
        let out = passwd_with_user(
            "root:x:0:0:root:/root:/bin/bash\nold:x:1000:1000::/home/old:/bin/sh\ndev:x:5:5::/:/bin/sh\n",
            &user(),
        );
        assert_eq!(
            out,
            "root:x:0:0:root:/root:/bin/bash\ndev:x:1000:1000:dev:/home/dev:/bin/bash\n"
        );
    }

    #[test]
    fn group_and_shadow_get_the_user() {
        assert_eq!(
            group_with_user("root:x:0:\nold:x:1000:\n", &user()),
            "root:x:0:\ndev:x:1000:\n"
        );
        let sh = shadow_with_user(None, "root:x:0:0::/root:/bin/sh\n", &user());
        assert_eq!(sh, "root:*:19000:0:99999:7:::\ndev:*:19000:0:99999:7:::\n");
        let sh = shadow_with_user(
            Some("root:$6$x:1:0:99999:7:::\ndev:old:1::::::\n"),
            "",
            &user(),
        );
        assert_eq!(sh, "root:$6$x:1:0:99999:7:::\ndev:*:19000:0:99999:7:::\n");
    }

    #[test]
    fn plan_lists_every_operation_in_order() {
        let g = generate(&input(Mode::Exec(vec![
            "sh".into(),
            "-c".into(),
            "echo a\tb".into(),
        ])));
        let plan = g.text("plan").unwrap();
        let lines: Vec<&str> = plan.lines().skip(1).collect();
        assert_eq!(lines[0], "mode\texec");
        assert_eq!(lines[1], "root\t9p\troot");
        assert_eq!(lines[2], "user\tdev\t1000\t1000\t/home/dev");
        assert_eq!(lines[3], "hostname\tcx5");
        assert_eq!(lines[4], "share\tm0\t/home/dev\trw\t9p");
        assert_eq!(
            lines[5],
            "symlink\t/home/dev/linux/drivers/net/dummy.ko\t/lib/modules/6.1.0/kernel/drivers/net/dummy.ko"
        );
        assert!(plan.contains("file\tpasswd\t/etc/passwd\t644\t0\t0\n"));
        assert!(plan.contains("file\tsudoers\t/etc/sudoers\t440\t0\t0\n"));
        assert!(
            plan.contains("file\tssh_host_ed25519_key\t/etc/mkt/ssh_host_ed25519_key\t600\t0\t0\n")
        );
        assert!(plan.contains("cwd\t/home/dev/linux\n"));
        assert!(plan.contains("setup\t/run/mkt/setup.sh\n"));
        // The tab inside the argument is escaped, so argv survives intact.
        assert!(plan.ends_with("exec\tsh\t-c\techo a\\tb\n"), "{plan}");
    }

    #[test]
    fn sudoers_drop_in_only_when_the_trees_sudoers_is_readable() {
        let mut i = input(Mode::Shell);
        i.etc.sudoers_readable = true;
        let g = generate(&i);
        assert!(g.get("sudoers").is_none());
        let f = g.get("sudoers-mkt").unwrap();
        assert_eq!(f.dest.as_deref(), Some("/etc/sudoers.d/mkt"));
        assert_eq!(f.mode, 0o440);
        assert_eq!(
            g.text("sudoers-mkt").unwrap(),
            "dev ALL=(ALL:ALL) NOPASSWD: ALL\n"
        );
        // Unreadable through the share: a whole one, with secure_path so
        // `sudo modprobe` works from an ssh session (PATH without sbin).
        i.etc.sudoers_readable = false;
        assert_eq!(
            generate(&i).text("sudoers").unwrap(),
            "Defaults env_reset\nDefaults secure_path=\"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"\nroot ALL=(ALL:ALL) ALL\ndev ALL=(ALL:ALL) NOPASSWD: ALL\n"
        );
        i.etc.has_sudo = false;
        let g = generate(&i);
        assert!(g.get("sudoers").is_none() && g.get("sudoers-mkt").is_none());
    }

    #[test]
    fn systemd_mode_gets_autologin_on_the_serial_console() {
        let g = generate(&input(Mode::Systemd));
        let f = g.get("mkt-console.service").unwrap();
        assert_eq!(
            f.dest.as_deref(),
            Some("/etc/systemd/system/mkt-console.service")
        );
        let unit = g.text("mkt-console.service").unwrap();
        assert!(unit.contains("--autologin dev "), "{unit}");
        assert!(unit.contains("WantedBy=multi-user.target"));
        let plan = g.text("plan").unwrap();
        assert!(plan.contains(
            "symlink\t/etc/systemd/system/mkt-console.service\t/etc/systemd/system/multi-user.target.wants/mkt-console.service\n"
        ));
        assert!(
            plan.contains("symlink\t/dev/null\t/etc/systemd/system/serial-getty@ttyS0.service\n")
        );
        assert!(
            generate(&input(Mode::Shell))
                .get("mkt-console.service")
                .is_none()
        );
    }

    #[test]
    fn network_and_modules_index_without_a_shell_when_possible() {
        let g = generate(&input(Mode::Shell));
        let plan = g.text("plan").unwrap();
        assert!(
            plan.contains("net\teth0\t10.0.2.15\t255.255.255.0\t10.0.2.2\n"),
            "{plan}"
        );
        assert_eq!(g.text("resolv.conf").unwrap(), "nameserver 10.0.2.3\n");
        assert!(plan.contains("file\tmodules.dep\t/lib/modules/6.1.0/modules.dep\t644\t0\t0\n"));
        // depmod in the guest only as a fallback.
        assert!(g.text("setup.sh").unwrap().contains("depmod -a 6.1.0"));
        assert!(plan.contains("setup\t/run/mkt/setup.sh\n"));
        let mut i = input(Mode::Shell);
        i.net = false;
        i.depmod_release = None;
        let g = generate(&i);
        let plan = g.text("plan").unwrap();
        assert!(g.get("setup.sh").is_none() && !plan.contains("setup\t"));
        assert!(!plan.contains("net\t") && g.get("resolv.conf").is_none());
    }

    #[test]
    fn sshd_drop_in_uses_mkts_keys() {
        let g = generate(&input(Mode::Systemd));
        let conf = g.text("sshd-mkt.conf").unwrap();
        assert!(conf.contains("HostKey /etc/mkt/ssh_host_ed25519_key"));
        assert!(conf.contains("AuthorizedKeysFile .ssh/authorized_keys /etc/mkt/authorized_keys"));
        assert!(
            conf.contains("\nKexAlgorithms curve25519-sha256,"),
            "{conf}"
        );
    }

    #[test]
    fn boot_script_runs_from_the_init_or_a_systemd_unit() {
        let mut i = input(Mode::Shell);
        i.boot_script = Some(b"#!/bin/sh\necho hi\n".to_vec());
        let g = generate(&i);
        assert_eq!(
            g.get("boot-script").unwrap().dest.as_deref(),
            Some(BOOT_SCRIPT)
        );
        assert_eq!(g.get("boot-script").unwrap().mode, 0o755);
        assert!(
            g.text("plan")
                .unwrap()
                .contains("boot\t/etc/mkt/boot-script\n")
        );
        assert!(g.get("mkt-boot-script.service").is_none());
        i.mode = Mode::Systemd;
        let g = generate(&i);
        let unit = g.text("mkt-boot-script.service").unwrap();
        assert!(unit.contains("User=dev\n") && unit.contains("ExecStart=/etc/mkt/boot-script\n"));
        // The user's home as mkt gives it (systemd's `~` is /root for root).
        assert!(
            unit.contains("WorkingDirectory=/home/dev\nEnvironment=\"HOME=/home/dev\"\n"),
            "{unit}"
        );
        i.user.home = "/h/50% \"x\"".into();
        let unit = generate(&i).text("mkt-boot-script.service").unwrap();
        assert!(
            unit.contains(
                "WorkingDirectory=/h/50%% \"x\"\nEnvironment=\"HOME=/h/50%% \\\"x\\\"\"\n"
            ),
            "{unit}"
        );
        assert!(
            g.text("plan")
                .unwrap()
                .contains("multi-user.target.wants/mkt-boot-script.service")
        );
    }

    #[test]
    fn shadow_is_root_shadow_and_shell_mode_starts_sshd() {
        let mut i = input(Mode::Shell);
        i.etc.group = "root:x:0:\nshadow:x:42:\n".into();
        let plan = generate(&i).text("plan").unwrap();
        assert!(
            plan.contains("file\tshadow\t/etc/shadow\t640\t0\t42\n"),
            "{plan}"
        );
        assert!(plan.contains("file\tpasswd\t/etc/passwd\t644\t0\t0\n"));
        assert!(plan.contains("sshd\t/usr/sbin/sshd\n"), "{plan}");
        // No sshd in the tree, no SSH set up, or another mode: none started.
        i.etc.has_sshd = false;
        assert!(!generate(&i).text("plan").unwrap().contains("sshd\t"));
        let mut i = input(Mode::Systemd);
        assert!(!generate(&i).text("plan").unwrap().contains("sshd\t"));
        i.mode = Mode::Shell;
        i.ssh = None;
        assert!(!generate(&i).text("plan").unwrap().contains("sshd\t"));
        assert_eq!(group_gid("a:x:1:\nshadow:x:42:u\n", "shadow"), Some(42));
        assert_eq!(group_gid("a:x:1:\n", "shadow"), None);
    }

    #[test]
    fn systemd_mode_tells_the_host_when_sshd_listens() {
        let g = generate(&input(Mode::Systemd));
        let unit = g.text("mkt-ssh-ready.service").unwrap();
        assert!(unit.contains("After=ssh.service sshd.service\n"), "{unit}");
        assert!(
            unit.contains("ExecStart=/usr/local/bin/mkt ssh-ready\n"),
            "{unit}"
        );
        assert!(g.text("plan").unwrap().contains(
            "symlink\t/etc/systemd/system/mkt-ssh-ready.service\t/etc/systemd/system/multi-user.target.wants/mkt-ssh-ready.service\n"
        ));
        // Shell mode's init reports itself; no sshd or no SSH: nothing to report.
        assert!(
            generate(&input(Mode::Shell))
                .get("mkt-ssh-ready.service")
                .is_none()
        );
        let mut i = input(Mode::Systemd);
        i.etc.has_sshd = false;
        let g = generate(&i);
        assert!(g.get("mkt-ssh-ready.service").is_none());
        assert!(!g.text("plan").unwrap().contains("mkt-ssh-ready"));
        let mut i = input(Mode::Systemd);
        i.ssh = None;
        assert!(generate(&i).get("mkt-ssh-ready.service").is_none());
    }

    #[test]
    fn the_host_terminal_reaches_the_console_in_both_modes() {
        let plan = generate(&input(Mode::Shell)).text("plan").unwrap();
        assert!(plan.contains("term\txterm-256color\t50\t132\n"), "{plan}");
        let g = generate(&input(Mode::Systemd));
        assert!(!g.text("plan").unwrap().contains("term\t"));
        let unit = g.text("mkt-console.service").unwrap();
        assert!(unit.contains(" ttyS0 xterm-256color\n"), "{unit}");
        let sh = g.text("mkt-console.sh").unwrap();
        assert!(sh.contains("stty rows 50 cols 132"), "{sh}");
        assert_valid_sh(&sh);
        // No terminal (stdin not a tty): systemd's own TERM, no stty.
        let mut i = input(Mode::Systemd);
        i.term = None;
        let g = generate(&i);
        assert!(
            g.text("mkt-console.service")
                .unwrap()
                .contains(" ttyS0 $TERM\n")
        );
        assert!(g.get("mkt-console.sh").is_none());
        // A terminal that reports no size (0 rows or 0 columns): no stty.
        for (rows, cols) in [(0, 132), (50, 0)] {
            let mut i = input(Mode::Systemd);
            let t = i.term.as_mut().unwrap();
            (t.rows, t.cols) = (rows, cols);
            assert!(
                generate(&i).get("mkt-console.sh").is_none(),
                "{rows}x{cols}"
            );
        }
    }

    #[test]
    fn systemd_mode_masks_what_would_make_it_wait() {
        let plan = generate(&input(Mode::Systemd)).text("plan").unwrap();
        for unit in ["serial-getty@hvc0.service", "sshd-keygen@.service"] {
            assert!(
                plan.contains(&format!("symlink\t/dev/null\t/etc/systemd/system/{unit}\n")),
                "{plan}"
            );
        }
        assert!(
            !generate(&input(Mode::Shell))
                .text("plan")
                .unwrap()
                .contains("/dev/null")
        );
    }
}
