//! The ACPI power button (`mkt stop`), heard over generic netlink.

use crate::sys::{kill, log, poweroff, setsockopt, socket};
use std::fs::File;
use std::io::{self, Read, Write};

/// Netlink attributes (type, payload) of `b`, in order.
pub fn nl_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        v.push((ty, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    v
}

/// A generic netlink socket subscribed to the kernel's ACPI events
/// (family `acpi_event`, group `acpi_mc_group`): the power button's
/// press arrives there even without evdev or acpid.
pub fn acpi_events() -> io::Result<File> {
    use std::os::unix::io::{AsRawFd, FromRawFd};
    // AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC.
    // SAFETY: a plain syscall; the fd is owned by the File below.
    let fd = unsafe { socket(16, 3 | 0o2000000, 16) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let mut sock = unsafe { File::from_raw_fd(fd) };
    // CTRL_CMD_GETFAMILY (3) to GENL_ID_CTRL (16), CTRL_ATTR_FAMILY_NAME (2).
    let name = b"acpi_event\0";
    let attr_len = 4 + name.len();
    let len = 16 + 4 + ((attr_len + 3) & !3);
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&16u16.to_ne_bytes());
    req.extend_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
    req.extend_from_slice(&[0; 8]); // seq, pid
    req.extend_from_slice(&[3, 1, 0, 0]); // cmd, version, reserved
    req.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    req.extend_from_slice(&2u16.to_ne_bytes());
    req.extend_from_slice(name);
    req.resize(len, 0);
    sock.write_all(&req)?;
    let mut buf = vec![0u8; 8192];
    let n = sock.read(&mut buf)?;
    let msg = &buf[..n];
    let no_group = || io::Error::new(io::ErrorKind::NotFound, "no ACPI event group");
    if msg.len() < 20 || u16::from_ne_bytes([msg[4], msg[5]]) == 2 {
        // NLMSG_ERROR: no such family (a kernel without ACPI).
        return Err(no_group());
    }
    let mut group = None;
    for (ty, val) in nl_attrs(&msg[20..]) {
        // CTRL_ATTR_MCAST_GROUPS: nested groups of NAME (1) and ID (2).
        if ty == 7 {
            for (_, g) in nl_attrs(val) {
                let a = nl_attrs(g);
                let named = a
                    .iter()
                    .any(|(t, v)| *t == 1 && v.starts_with(b"acpi_mc_group"));
                let id = a.iter().find(|(t, v)| *t == 2 && v.len() == 4);
                if let (true, Some((_, v))) = (named, id) {
                    group = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
                }
            }
        }
    }
    let group = group.ok_or_else(no_group)?.to_ne_bytes();
    // SOL_NETLINK (270), NETLINK_ADD_MEMBERSHIP (1).
    // SAFETY: group points to 4 readable bytes.
    if unsafe { setsockopt(sock.as_raw_fd(), 270, 1, group.as_ptr(), 4) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// The shell's session (its pid), for the power button.
pub static SESSION: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// `mkt stop` asks for an ACPI power-off. Nothing else in an mkt guest
/// (no acpid, no logind, maybe no evdev) would act on the power button, so
/// the init does: SIGTERM to every process (the command ends, or its trap
/// runs, and its status is reported as usual), SIGHUP to the shell's
/// session (an interactive shell ignores SIGTERM), then, if something is
/// still running after a grace period, sync and power off.
pub fn watch_power_button() {
    let mut sock = match acpi_events() {
        Ok(s) => s,
        Err(e) => {
            log(&format!(
                "no ACPI power button events (mkt stop will force the VM off): {e}"
            ));
            return;
        }
    };
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match sock.read(&mut buf) {
            Ok(n) => n,
            // ENOBUFS: events were lost; keep listening.
            Err(e) if e.raw_os_error() == Some(105) => continue,
            Err(e) => {
                log(&format!("ACPI events: {e}"));
                return;
            }
        };
        let msg = &buf[..n];
        // nlmsghdr (16) + genlmsghdr (4), then ACPI_GENL_ATTR_EVENT (1):
        // device_class[20], bus_id[15], type, data.
        let power = msg.len() > 20
            && nl_attrs(&msg[20..])
                .iter()
                .any(|(t, v)| *t == 1 && v.starts_with(b"button/power"));
        if power {
            break;
        }
    }
    log("ACPI power button: stopping");
    // SAFETY: plain syscalls; -1 is every process but init.
    unsafe {
        kill(-1, 15);
        let session = SESSION.load(std::sync::atomic::Ordering::SeqCst);
        if session > 0 {
            kill(-session, 1);
        }
    }
    // The main thread powers off as soon as the command or shell ends.
    std::thread::sleep(std::time::Duration::from_secs(5));
    log("ACPI power button: still running after 5 s; powering off");
    poweroff()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    #[test]
    fn netlink_attributes_are_read_in_order_past_their_padding() {
        let mut b = attr(1, b"button/power");
        b.extend(attr(0x8000 | 7, &attr(2, &[1, 0, 0, 0])));
        b.extend(attr(3, b"x"));
        let a = nl_attrs(&b);
        assert_eq!(a.len(), 3);
        assert_eq!(a[0], (1, &b"button/power"[..]));
        // NLA_F_NESTED is masked off; the nested attributes read the same way.
        assert_eq!(a[1].0, 7);
        assert_eq!(nl_attrs(a[1].1), [(2, &[1u8, 0, 0, 0][..])]);
        // The last one's padding may be missing.
        assert_eq!(a[2], (3, &b"x"[..]));
        assert_eq!(nl_attrs(&b[..b.len() - 3]).len(), 3);
    }

    #[test]
    fn broken_netlink_attributes_end_the_list() {
        let mut b = attr(1, b"ok");
        b.extend_from_slice(&[200, 0, 2, 0, 1, 2]); // longer than what is left
        assert_eq!(nl_attrs(&b), [(1, &b"ok"[..])]);
        assert!(nl_attrs(&[2, 0, 1, 0]).is_empty(), "a length under 4");
        assert!(nl_attrs(&[8, 0]).is_empty());
    }
}
