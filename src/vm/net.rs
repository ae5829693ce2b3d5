//! Host side of real guest networks (`--net bridge[=BR]|tap`): a tap device
//! made with TUNSETIFF, attached to the bridge and brought up over rtnetlink
//! (no `ip`/`brctl` processes), whose fd QEMU inherits.
//!
//! The tap is not persistent: the kernel deletes it when the last fd (mkt's
//! and QEMU's) closes, so it goes with the VM however the VM ends, kill -9
//! included. Its name is still recorded in the run directory (`net.json`)
//! so the next run's sweep of stale run directories deletes it should it
//! have survived (a QEMU that outlived mkt).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// The state file in a run directory.
pub(crate) const STATE_FILE: &str = "net.json";

pub use crate::config::NetMode as Mode;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "--net {mode} needs CAP_NET_ADMIN, to create a tap device{} and bring it up: run mkt \
         as root, or give it the capability (sudo setcap cap_net_admin+ep {exe}){}",
        .bridge.as_ref().map(|b| format!(" and attach it to bridge {b}")).unwrap_or_default(),
        .bridge.as_ref().map(|b| format!(", or allow {b} in /etc/qemu/bridge.conf for qemu-bridge-helper")).unwrap_or_default()
    )]
    NoCapability {
        mode: String,
        bridge: Option<String>,
        exe: String,
    },
    #[error(
        "{0} is not a bridge on this host (no {1}); create it or name another with --net bridge=BR"
    )]
    NoBridge(String, PathBuf),
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    #[error("cannot create tap device {0}")]
    CreateTap(String, #[source] io::Error),
    #[error("netlink: cannot {0}")]
    Netlink(String, #[source] io::Error),
    #[error("cannot write {0}")]
    State(PathBuf, #[source] io::Error),
}

/// A stable, locally administered unicast MAC for `name`, so a DHCP server
/// gives the same guest the same address each run.
pub(crate) fn mac_for(name: &str) -> String {
    let b = crate::util::hash::fnv(name.as_bytes()).to_be_bytes();
    // Bit 1 of the first octet: locally administered; bit 0 clear: unicast.
    let first = (b[0] & 0xfc) | 0x02;
    format!(
        "{first:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[1], b[2], b[3], b[4], b[5]
    )
}

/// Whether this process may create taps and change links.
pub(crate) fn has_net_admin() -> bool {
    caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_NET_ADMIN,
    )
    .unwrap_or(false)
}

/// The error when `mode` needs CAP_NET_ADMIN and this process lacks it.
pub(crate) fn check_privilege(mode: &Mode) -> Result<(), NetError> {
    if has_net_admin() {
        return Ok(());
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "mkt".into());
    let (mode, bridge) = match mode {
        Mode::Bridge(b) => (format!("bridge={b}"), Some(b.clone())),
        _ => ("tap".to_string(), None),
    };
    Err(NetError::NoCapability { mode, bridge, exe })
}

/// Drops CAP_NET_ADMIN for good (bounding set too, so QEMU, exec'd as
/// root, does not get it back) once the tap exists; best effort.
pub(crate) fn drop_net_admin() {
    use caps::{CapSet, Capability::CAP_NET_ADMIN};
    for set in [CapSet::Bounding, CapSet::Effective, CapSet::Permitted] {
        if let Err(e) = caps::drop(None, set, CAP_NET_ADMIN) {
            tracing::debug!("cannot drop CAP_NET_ADMIN from {set:?}: {e}");
        }
    }
}

/// qemu-bridge-helper when it is installed setuid and `bridge` is allowed
/// (or its config cannot be read by us, so the helper decides).
pub(crate) fn bridge_helper(bridge: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let helper = [
        "/usr/lib/qemu/qemu-bridge-helper",
        "/usr/libexec/qemu-bridge-helper",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| {
        fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o4000 != 0 && m.uid_is_root())
    })?;
    let conf = Path::new("/etc/qemu/bridge.conf");
    let allowed = match fs::read_to_string(conf) {
        Ok(text) => text.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some("allow") && matches!(w.next(), Some(b) if b == bridge || b == "all")
        }),
        Err(e) => e.kind() == io::ErrorKind::PermissionDenied,
    };
    allowed.then_some(helper)
}

trait UidIsRoot {
    fn uid_is_root(&self) -> bool;
}

impl UidIsRoot for fs::Metadata {
    fn uid_is_root(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.uid() == 0
    }
}

/// `/sys/class/net/NAME`.
fn class_net(name: &str) -> PathBuf {
    Path::new("/sys/class/net").join(name)
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// A tap device for one VM; deleted when dropped (and QEMU's fd is closed).
#[derive(Debug)]
pub(crate) struct Tap {
    fd: OwnedFd,
    pub name: String,
    record: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    tap: String,
}

impl Tap {
    /// Creates tap `name`, attaches it to `bridge` when given, brings it up,
    /// and records it in `run_dir`.
    pub fn create(name: &str, bridge: Option<&str>, run_dir: &Path) -> Result<Tap, NetError> {
        let bridge_index = match bridge {
            Some(b) => {
                let marker = class_net(b).join("bridge");
                if !marker.exists() {
                    return Err(NetError::NoBridge(b.into(), marker));
                }
                Some(ifindex(b).ok_or_else(|| NetError::NoBridge(b.into(), marker))?)
            }
            None => None,
        };
        let record = run_dir.join(STATE_FILE);
        let text = serde_json::to_vec(&Record { tap: name.into() }).expect("serialisable");
        fs::write(&record, text).map_err(|e| NetError::State(record.clone(), e))?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let fd: OwnedFd = file.into();
        // struct ifreq: the name, then ifr_flags.
        let mut req = [0u8; 40];
        let n = name.len().min(15);
        req[..n].copy_from_slice(&name.as_bytes()[..n]);
        // IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL (fail rather than reuse a
        // leftover of the same name).
        let flags: i16 = 0x0002 | 0x1000 | 0x8000u16 as i16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        const TUNSETIFF: libc::c_ulong = 0x400454ca;
        // SAFETY: req is an ifreq-sized buffer the ioctl reads and writes.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) } < 0 {
            let _ = fs::remove_file(&record);
            return Err(NetError::CreateTap(name.into(), io::Error::last_os_error()));
        }
        let tap = Tap {
            fd,
            name: name.into(),
            record,
        };
        let index = ifindex(name).ok_or_else(|| {
            NetError::Netlink(format!("find {name}"), io::ErrorKind::NotFound.into())
        })?;
        rtnl::set_link(index, bridge_index, true).map_err(|e| {
            let what = match bridge {
                Some(b) => format!("attach {name} to {b} and bring it up"),
                None => format!("bring {name} up"),
            };
            NetError::Netlink(what, e)
        })?;
        Ok(tap)
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Deleted by the kernel once QEMU's copy of the fd is closed too;
        // deleting it here as well covers a QEMU that is somehow still up.
        if let Some(i) = ifindex(&self.name) {
            let _ = rtnl::del_link(i);
        }
        let _ = fs::remove_file(&self.record);
    }
}

/// Deletes the tap a dead run recorded in `run_dir`, if it still exists.
pub(crate) fn recover(run_dir: &Path) -> io::Result<()> {
    let path = run_dir.join(STATE_FILE);
    let rec: Record = match fs::read(&path) {
        Ok(t) => serde_json::from_slice(&t).map_err(io::Error::other)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // Only a tun/tap device: never delete an unrelated link of that name.
    if class_net(&rec.tap).join("tun_flags").exists()
        && let Some(i) = ifindex(&rec.tap)
    {
        rtnl::del_link(i)?;
    }
    fs::remove_file(&path)
}

/// Just enough rtnetlink: RTM_NEWLINK to set master and IFF_UP, RTM_DELLINK.
mod rtnl {
    use std::io;

    const RTM_NEWLINK: u16 = 16;
    const RTM_DELLINK: u16 = 17;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLMSG_ERROR: u16 = 2;
    const IFLA_MASTER: u16 = 10;
    const IFF_UP: u32 = 1;

    /// nlmsghdr + ifinfomsg (+ attributes), each 4-byte aligned.
    fn message(kind: u16, index: u32, flags: u32, change: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut m = vec![0u8; 16];
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        m[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // ifinfomsg: family, pad, type, index, flags, change.
        m.extend_from_slice(&[0u8; 4]);
        m.extend_from_slice(&(index as i32).to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&change.to_ne_bytes());
        for (ty, data) in attrs {
            let len = 4 + data.len();
            m.extend_from_slice(&(len as u16).to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(data);
            m.resize(m.len().next_multiple_of(4), 0);
        }
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(msg: &[u8]) -> io::Result<()> {
        // SAFETY: plain syscalls on a socket this function owns and closes.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let result = (|| {
                let mut sa: libc::sockaddr_nl = std::mem::zeroed();
                sa.nl_family = libc::AF_NETLINK as u16;
                let sent = libc::sendto(
                    fd,
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as u32,
                );
                if sent < 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut buf = [0u8; 4096];
                loop {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let n = n as usize;
                    if n < 20 {
                        return Err(io::Error::other("short netlink answer"));
                    }
                    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
                    if kind == NLMSG_ERROR {
                        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                        return if err == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-err))
                        };
                    }
                }
            })();
            libc::close(fd);
            result
        }
    }

    /// Sets the link's master (a bridge) when given and brings it up.
    pub fn set_link(index: u32, master: Option<u32>, up: bool) -> io::Result<()> {
        let m = master.map(u32::to_ne_bytes);
        let attrs: Vec<(u16, &[u8])> = m.iter().map(|b| (IFLA_MASTER, &b[..])).collect();
        let flags = if up { IFF_UP } else { 0 };
        request(&message(RTM_NEWLINK, index, flags, IFF_UP, &attrs))
    }

    pub fn del_link(index: u32) -> io::Result<()> {
        request(&message(RTM_DELLINK, index, 0, 0, &[]))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn message_layout() {
            let m = super::message(16, 7, 1, 1, &[(10, &3u32.to_ne_bytes())]);
            assert_eq!(m.len(), 16 + 16 + 8);
            assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
            assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
            assert_eq!(u16::from_ne_bytes(m[34..36].try_into().unwrap()), 10);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_local_unicast_and_differ_by_name() {
        let a = mac_for("cx5-ib");
        assert_eq!(a, mac_for("cx5-ib"));
        assert_ne!(a, mac_for("cx5-eth"));
        let first = u8::from_str_radix(&a[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "{a}");
        assert_eq!(a.len(), 17);
    }

    #[test]
    fn privilege_message_names_the_capability_and_the_ways_out() {
        let e = NetError::NoCapability {
            mode: "bridge=br0".into(),
            bridge: Some("br0".into()),
            exe: "/usr/bin/mkt".into(),
        }
        .to_string();
        assert!(e.starts_with("--net bridge=br0 needs CAP_NET_ADMIN"), "{e}");
        assert!(e.contains("attach it to bridge br0"), "{e}");
        assert!(e.contains("setcap cap_net_admin+ep /usr/bin/mkt"), "{e}");
        assert!(e.contains("/etc/qemu/bridge.conf"), "{e}");
    }
}
