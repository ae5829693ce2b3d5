//! The individual capability probes. Each is a real test of the capability
//! (a syscall, a program's version), not a guess from a file's presence.

use super::{Check, Status, kvm, which};
use crate::arch::HOST;
use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where distributions put the Rust virtiofsd outside `$PATH`. (QEMU's
/// old C virtiofsd in /usr/lib/qemu needs root and other flags: not used.)
const VIRTIOFSD_PLACES: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/virtiofsd"];

/// Finds a program mkt uses: `$PATH` first, then the places distributions
/// (or `cargo install`) put it. `MKT_QEMU` / `MKT_VIRTIOFSD` override.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let override_var = match program {
        p if p == crate::arch::HOST.qemu => Some("MKT_QEMU"),
        "virtiofsd" => Some("MKT_VIRTIOFSD"),
        _ => None,
    };
    if let Some(p) = override_var.and_then(std::env::var_os) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = which(program) {
        return Some(p);
    }
    if program == "virtiofsd" {
        let cargo_bin = std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".cargo/bin/virtiofsd"))
            .into_iter();
        return cargo_bin
            .chain(VIRTIOFSD_PLACES.iter().map(PathBuf::from))
            .find(|p| p.is_file());
    }
    None
}

/// The first line a program prints for `--version`.
fn version_line(program: &Path) -> Result<String, String> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if !out.status.success() || line.is_empty() {
        return Err(format!(
            "{} --version failed ({})",
            program.display(),
            out.status
        ));
    }
    Ok(line)
}

fn program_check(name: &'static str, program: &str, why_needed: &str, fix: &str) -> Check {
    match find_program(program) {
        None => Check::bad(
            name,
            Status::Missing,
            format!("{program} not found ({why_needed})"),
            fix,
        ),
        Some(p) => match version_line(&p) {
            Ok(v) => Check::ok(name, format!("{v} ({})", p.display())),
            Err(e) => Check::bad(name, Status::Unusable, e, fix),
        },
    }
}

pub fn qemu() -> Check {
    program_check(
        "qemu",
        HOST.qemu,
        "needed to boot kernels",
        &format!(
            "Debian/Ubuntu: {}; Fedora: {}",
            HOST.qemu_debian, HOST.qemu_fedora
        ),
    )
    .required()
}

/// The accelerator `mkt run` will use, from the real KVM probe.
pub fn accel() -> Check {
    let probe = kvm::probe();
    if probe.usable {
        return Check::ok("accel", "KVM usable");
    }
    let (_, line) = kvm::choose(None, || probe.clone());
    Check {
        name: "accel",
        status: Status::Unusable,
        detail: line.unwrap_or_else(|| format!("KVM unusable ({}), using TCG", probe.reason)),
        fix: probe.fix,
        required: false,
    }
}

/// Runs `/bin/true` in a child that first calls `setup` (between fork and
/// exec); the spawn error is the setup's error.
fn child_probe(
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> std::io::Result<()> {
    let mut cmd = Command::new("/bin/true");
    // SAFETY: the closure only makes raw syscalls (unshare, open, write,
    // mount) on data prepared before the fork; it allocates nothing, so it
    // is safe in the forked child of a multi-threaded process.
    unsafe { cmd.pre_exec(setup) };
    let status = cmd.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("probe child: {status}")))
    }
}

/// Can this user create a user namespace (everything rootless rests on it)?
pub fn userns() -> Check {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone")
        .ok()
        .map(|s| s.trim().to_string());
    match child_probe(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).map_err(std::io::Error::from)
    }) {
        Ok(()) => Check::ok("userns", "unprivileged user namespaces work").required(),
        Err(e) => {
            let fix = if sysctl.as_deref() == Some("0") {
                "sudo sysctl -w kernel.unprivileged_userns_clone=1"
            } else {
                "sudo sysctl -w user.max_user_namespaces=15000 (and, on Ubuntu 24.04+, kernel.apparmor_restrict_unprivileged_userns=0)"
            };
            Check::bad(
                "userns",
                Status::Unusable,
                format!("cannot create a user namespace: {e}"),
                fix,
            )
            .required()
        }
    }
}

/// Parses `/etc/subuid`-style text: the ranges given to `user` (by name or uid).
pub fn subid_ranges(text: &str, user: &str, uid: u32) -> Vec<(u64, u64)> {
    let uid = uid.to_string();
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (who, start, count) = (f.next()?, f.next()?, f.next()?);
            if who != user && who != uid {
                return None;
            }
            Some((start.parse().ok()?, count.parse().ok()?))
        })
        .collect()
}

/// How many subordinate ids a user gets (what useradd gives, and enough for
/// every id a distribution's tree uses).
pub(crate) const SUBID_COUNT: u64 = 65536;

/// The lowest start (from 100000, shadow's SUB_UID_MIN) of `count` ids that
/// overlaps no range of any user in the given `/etc/subuid`-style texts.
pub(crate) fn free_subid_start(texts: &[&str], count: u64) -> u64 {
    let mut taken: Vec<(u64, u64)> = texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (_, start, n) = (f.next()?, f.next()?, f.next()?);
            let (start, n): (u64, u64) = (start.parse().ok()?, n.parse().ok()?);
            Some((start, start.saturating_add(n)))
        })
        .collect();
    taken.sort();
    let mut start: u64 = 100_000;
    // Sorted by start: each range that overlaps the candidate pushes it past
    // that range's end, and no earlier range can overlap it again.
    for (s, e) in taken {
        if s < start.saturating_add(count) && e > start {
            start = e;
        }
    }
    start
}

/// `START-END` (inclusive, as `usermod --add-subuids` takes it) of a free
/// range of [`SUBID_COUNT`] ids in both files' texts.
pub(crate) fn free_subid_range(subuid: &str, subgid: &str) -> String {
    let start = free_subid_start(&[subuid, subgid], SUBID_COUNT);
    format!("{start}-{}", start + SUBID_COUNT - 1)
}

/// [`free_subid_range`] of this host's /etc/subuid and /etc/subgid.
pub fn suggested_subid_range() -> String {
    let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
    free_subid_range(&read("/etc/subuid"), &read("/etc/subgid"))
}

/// The user's subordinate uid/gid ranges and the setuid helpers that map them.
pub fn subids(user: &str, uid: u32) -> Check {
    let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
    subids_in(user, uid, &read("/etc/subuid"), &read("/etc/subgid"), |p| {
        which(p).is_some()
    })
}

/// [`subids`] on the given file contents; `have` tells whether a program is
/// on `$PATH`. The fix names only what is missing, and a range that is free
/// in both files.
pub(crate) fn subids_in(
    user: &str,
    uid: u32,
    subuid: &str,
    subgid: &str,
    have: impl Fn(&str) -> bool,
) -> Check {
    let uids = subid_ranges(subuid, user, uid);
    let gids = subid_ranges(subgid, user, uid);
    let helpers: Vec<_> = ["newuidmap", "newgidmap"]
        .into_iter()
        .filter(|p| !have(p))
        .collect();
    let fmt = |r: &[(u64, u64)]| {
        r.iter()
            .map(|(s, c)| format!("{s}+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let install_helpers = "install newuidmap/newgidmap: Debian/Ubuntu sudo apt-get install -y uidmap, Fedora sudo dnf install -y shadow-utils";
    if uids.is_empty() || gids.is_empty() {
        let range = free_subid_range(subuid, subgid);
        let mut flags = Vec::new();
        let mut files = Vec::new();
        if uids.is_empty() {
            flags.push(format!("--add-subuids {range}"));
            files.push("/etc/subuid");
        }
        if gids.is_empty() {
            flags.push(format!("--add-subgids {range}"));
            files.push("/etc/subgid");
        }
        let mut fix = format!(
            "sudo usermod {} {user} (a range no other user has)",
            flags.join(" ")
        );
        if !helpers.is_empty() {
            fix = format!("{fix}; and {install_helpers}");
        }
        return Check::bad(
            "subids",
            Status::Missing,
            format!("no range for {user} in {}", files.join(" and ")),
            fix,
        );
    }
    if !helpers.is_empty() {
        return Check::bad(
            "subids",
            Status::Unusable,
            format!("{} not found", helpers.join(" and ")),
            install_helpers,
        );
    }
    Check::ok(
        "subids",
        format!(
            "subuid {} subgid {} with newuidmap/newgidmap",
            fmt(&uids),
            fmt(&gids)
        ),
    )
}

/// Can an overlay be mounted inside a user namespace (Linux >= 5.11)? This is
/// what keeps a run's writes out of the stored rootfs without root.
pub(crate) fn overlay_in_userns() -> Check {
    let fix =
        "use a kernel >= 5.11 with CONFIG_OVERLAY_FS (mkt falls back to a guest-side overlay)";
    let result = (|| -> std::io::Result<()> {
        let dir = tempfile::Builder::new().prefix("mkt-probe-").tempdir()?;
        for d in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir(dir.path().join(d))?;
        }
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)
        };
        let merged = c(&dir.path().join("merged"))?;
        let opts = CString::new(format!(
            "lowerdir={},upperdir={},workdir={}",
            dir.path().join("lower").display(),
            dir.path().join("upper").display(),
            dir.path().join("work").display()
        ))
        .map_err(std::io::Error::other)?;
        let uid_map = format!("0 {} 1", nix::unistd::getuid()).into_bytes();
        let gid_map = format!("0 {} 1", nix::unistd::getgid()).into_bytes();
        let work_work = dir.path().join("work/work");
        let r = child_probe(move || {
            use nix::sched::{CloneFlags, unshare};
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)?;
            write_proc(c"/proc/self/setgroups", b"deny")?;
            write_proc(c"/proc/self/uid_map", &uid_map)?;
            write_proc(c"/proc/self/gid_map", &gid_map)?;
            nix::mount::mount(
                Some(c"overlay"),
                merged.as_c_str(),
                Some(c"overlay"),
                nix::mount::MsFlags::empty(),
                Some(opts.as_c_str()),
            )?;
            Ok(())
        });
        // The kernel made work/work mode 000: open it up, or the temp dir
        // cannot be removed by a normal user.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&work_work, std::fs::Permissions::from_mode(0o700));
        r
    })();
    match result {
        Ok(()) => Check::ok("overlay", "overlayfs mounts inside a user namespace"),
        Err(e) => Check::bad(
            "overlay",
            Status::Unusable,
            format!("overlayfs in a user namespace failed: {e}"),
            fix,
        ),
    }
}

/// Writes `data` to a /proc file with raw syscalls (safe after fork).
fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> std::io::Result<()> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    let fd = open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    nix::unistd::write(&fd, data)?;
    Ok(())
}

/// Required: the default rootfs's kernel (Debian's cloud kernel) has no 9p,
/// so virtiofs is the only way `mkt run` can share that rootfs.
pub fn virtiofsd() -> Check {
    program_check(
        "virtiofsd",
        "virtiofsd",
        "the default rootfs's kernel has no 9p: `mkt run` needs virtiofs",
        VIRTIOFSD_FIX,
    )
    .required()
}

/// How to get the Rust virtiofsd (Debian 12 has no package of it).
pub(crate) const VIRTIOFSD_FIX: &str = "./install.sh installs it; or: sudo apt-get install -y gcc pkg-config libcap-ng-dev libseccomp-dev && cargo install --locked virtiofsd (Fedora: sudo dnf install -y virtiofsd)";

pub fn ccache() -> Check {
    program_check(
        "ccache",
        "ccache",
        "builds are not cached",
        "Debian/Ubuntu: sudo apt-get install -y ccache; Fedora: sudo dnf install -y ccache",
    )
}

/// IOMMU groups exist when the host booted with an IOMMU enabled; VFIO needs them.
pub(crate) fn iommu_in(sys: &Path) -> Check {
    let groups = sys.join("kernel/iommu_groups");
    let n = std::fs::read_dir(&groups).map(|d| d.count()).unwrap_or(0);
    if n > 0 {
        Check::ok("iommu", format!("{n} IOMMU groups"))
    } else {
        let flag = if std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .contains("AuthenticAMD")
        {
            "amd_iommu=on iommu=pt"
        } else {
            "intel_iommu=on iommu=pt"
        };
        Check::bad(
            "iommu",
            Status::Missing,
            format!(
                "no IOMMU groups in {} (needed only for --pci)",
                groups.display()
            ),
            format!("add `{flag}` to the host kernel command line and reboot"),
        )
    }
}

/// The vfio-pci driver: bound-ready (loaded), loadable, or absent.
pub(crate) fn vfio_pci_in(sys: &Path, modules: &Path) -> Check {
    if sys.join("bus/pci/drivers/vfio-pci").is_dir() {
        return Check::ok("vfio-pci", "driver loaded");
    }
    let builtin = std::fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let dep = std::fs::read_to_string(modules.join("modules.dep")).unwrap_or_default();
    if builtin.contains("vfio-pci.ko") || dep.contains("vfio-pci.ko") {
        return Check::bad(
            "vfio-pci",
            Status::Unusable,
            "available but not loaded (needed only for --pci)",
            "sudo modprobe vfio-pci",
        );
    }
    Check::bad(
        "vfio-pci",
        Status::Missing,
        format!(
            "no vfio-pci module in {} (needed only for --pci)",
            modules.display()
        ),
        "use a host kernel with CONFIG_VFIO_PCI",
    )
}

/// A bridge for `--net bridge` (MKT's br0 by default).
pub(crate) fn bridge_in(sys: &Path, name: &str) -> Check {
    if sys.join("class/net").join(name).join("bridge").is_dir() {
        Check::ok("bridge", format!("{name} exists"))
    } else {
        Check::bad(
            "bridge",
            Status::Missing,
            format!("no bridge {name} (needed only for --net bridge; NAT is the default)"),
            format!(
                "sudo ip link add {name} type bridge && sudo ip link set {name} up (then add the uplink)"
            ),
        )
    }
}

/// Every probe, in the order `mkt doctor` prints them.
pub fn all(user: &str, uid: u32) -> Vec<Check> {
    let sys = Path::new("/sys");
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let modules = Path::new("/lib/modules").join(release);
    let userns = userns();
    let overlay = if userns.is_ok() {
        overlay_in_userns()
    } else {
        Check::bad(
            "overlay",
            Status::Unusable,
            "not tried: user namespaces do not work",
            "fix userns first",
        )
    };
    vec![
        qemu(),
        accel(),
        userns,
        subids(user, uid),
        overlay,
        virtiofsd(),
        ccache(),
        iommu_in(sys),
        vfio_pci_in(sys, &modules),
        bridge_in(sys, "br0"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subid_ranges_match_name_or_uid() {
        let text = "alice:100000:65536\n1001:200000:1000\nbob:300000:65536\nbroken\n";
        assert_eq!(subid_ranges(text, "alice", 1000), vec![(100000, 65536)]);
        assert_eq!(subid_ranges(text, "carol", 1001), vec![(200000, 1000)]);
        assert!(subid_ranges(text, "dave", 1002).is_empty());
    }

    #[test]
    fn subid_advice_suggests_a_range_no_one_has() {
        // 100000-165535 belongs to another user: the advice must not reuse it.
        let subuid = "mkt-ci:100000:65536\nbob:165536:1000\n";
        let subgid = "mkt-ci:100000:65536\ncarol:300000:65536\n";
        assert_eq!(free_subid_start(&[subuid, subgid], SUBID_COUNT), 166536);
        let c = subids_in("alice", 1000, subuid, subgid, |_| true);
        assert_eq!(c.status, Status::Missing);
        let fix = c.fix.unwrap();
        assert!(
            fix.contains("--add-subuids 166536-232071 --add-subgids 166536-232071 alice"),
            "{fix}"
        );
        assert!(!fix.contains("newuidmap"), "helpers are there: {fix}");
        // A gap big enough between ranges is used; an empty file starts at 100000.
        assert_eq!(
            free_subid_start(&["a:100000:65536\nb:300000:65536\n"], SUBID_COUNT),
            165536
        );
        assert_eq!(free_subid_start(&["", "bad line\n"], SUBID_COUNT), 100000);
        // Only the missing file is named; helpers missing only: no range advice.
        let c = subids_in("alice", 1000, "alice:400000:65536\n", "", |_| true);
        assert_eq!(c.detail, "no range for alice in /etc/subgid");
        assert!(!c.fix.as_ref().unwrap().contains("--add-subuids"), "{c:?}");
        let c = subids_in("alice", 1000, "alice:1:2\n", "alice:1:2\n", |p| {
            p != "newgidmap"
        });
        assert_eq!(c.status, Status::Unusable);
        assert!(!c.fix.as_ref().unwrap().contains("usermod"), "{c:?}");
    }

    #[test]
    fn sysfs_probes_read_the_given_tree() {
        let sys = tempfile::tempdir().unwrap();
        let modules = tempfile::tempdir().unwrap();
        assert_eq!(iommu_in(sys.path()).status, Status::Missing);
        assert!(iommu_in(sys.path()).fix.unwrap().contains("iommu=on"));
        std::fs::create_dir_all(sys.path().join("kernel/iommu_groups/0")).unwrap();
        assert!(iommu_in(sys.path()).is_ok());

        assert_eq!(
            vfio_pci_in(sys.path(), modules.path()).status,
            Status::Missing
        );
        std::fs::write(
            modules.path().join("modules.dep"),
            "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/vfio.ko\n",
        )
        .unwrap();
        let c = vfio_pci_in(sys.path(), modules.path());
        assert_eq!(c.status, Status::Unusable);
        assert_eq!(c.fix.as_deref(), Some("sudo modprobe vfio-pci"));
        std::fs::create_dir_all(sys.path().join("bus/pci/drivers/vfio-pci")).unwrap();
        assert!(vfio_pci_in(sys.path(), modules.path()).is_ok());

        assert_eq!(bridge_in(sys.path(), "br0").status, Status::Missing);
        std::fs::create_dir_all(sys.path().join("class/net/br0/bridge")).unwrap();
        assert!(bridge_in(sys.path(), "br0").is_ok());
    }

    #[test]
    fn userns_probe_works_here() {
        // Every test machine of this project has user namespaces; if this
        // fails, everything rootless fails too.
        let c = userns();
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn missing_program_is_reported_with_fix() {
        let c = program_check("x", "mkt-no-such-program", "for tests", "install it");
        assert_eq!(c.status, Status::Missing);
        assert!(c.detail.contains("mkt-no-such-program not found"));
        assert_eq!(c.fix.as_deref(), Some("install it"));
    }
}
