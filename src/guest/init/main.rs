//! mkt's guest init: PID 1 of every `mkt run` guest, packed as /init into
//! the initramfs mkt generates. Built by build.rs as a static binary with
//! rustc alone (std, no crates), because it must run before any root file
//! system (and its libc) is mounted.
//!
//! It does the fixed steps itself: mount /proc, /sys, /dev; load the modules
//! packed in /modules (distro kernels); read the run's plan and files from
//! /mkt (also packed into the initramfs); mount the rootfs share read-only under a tmpfs overlay (the
//! stored tree is never written); carry out the plan (shares, links, files);
//! switch root; then run the command (exec mode), systemd, or a shell.
//! Everything run-specific comes from the plan, which the host generates
//! and tests as a file.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

unsafe extern "C" {
    fn mount(
        src: *const i8,
        target: *const i8,
        fstype: *const i8,
        flags: u64,
        data: *const i8,
    ) -> i32;
    fn chroot(path: *const i8) -> i32;
    fn sethostname(name: *const u8, len: usize) -> i32;
    fn reboot(cmd: i32) -> i32;
    fn sync();
    fn syscall(n: i64, ...) -> i64;
    fn setsid() -> i32;
    fn ioctl(fd: i32, req: u64, ...) -> i32;
    fn chown(path: *const i8, uid: u32, gid: u32) -> i32;
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn close(fd: i32) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, val: *const u8, len: u32) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
}

const MS_RDONLY: u64 = 1;
const MS_MOVE: u64 = 8192;
const RB_POWER_OFF: i32 = 0x4321fedc;
const SYS_FINIT_MODULE: i64 = 313;
const TIOCSCTTY: u64 = 0x540E;
const TIOCSWINSZ: u64 = 0x5414;

const SIOCADDRT: u64 = 0x890B;
const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCSIFFLAGS: u64 = 0x8914;
const SIOCSIFADDR: u64 = 0x8916;
const SIOCSIFNETMASK: u64 = 0x891C;
const SIOCGIFHWADDR: u64 = 0x8927;

#[repr(C)]
#[derive(Clone, Copy)]
struct SockAddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

fn sin(addr: [u8; 4]) -> SockAddrIn {
    SockAddrIn {
        family: 2, // AF_INET
        port: 0,
        addr,
        zero: [0; 8],
    }
}

/// struct ifreq: the name, then a 24-byte union (flags or an address).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

/// struct rtentry, as the kernel and glibc lay it out on x86_64.
#[repr(C)]
struct RtEntry {
    pad1: u64,
    dst: SockAddrIn,
    gateway: SockAddrIn,
    genmask: SockAddrIn,
    flags: u16,
    pad2: i16,
    pad3: u64,
    tos: u8,
    class: u8,
    pad4: [i16; 3],
    metric: i16,
    dev: *mut i8,
    mtu: u64,
    window: u64,
    irtt: u16,
}

fn parse_ip(s: &str) -> io::Result<[u8; 4]> {
    let ip: std::net::Ipv4Addr = s
        .parse()
        .map_err(|_| io::Error::other(format!("bad IPv4 address {s:?}")))?;
    Ok(ip.octets())
}

fn ifreq(name: &str) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    let n = name.len().min(15);
    r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

fn sioc(fd: i32, req: u64, arg: *mut u8, what: &str) -> io::Result<()> {
    // SAFETY: arg points to a live, correctly sized ifreq/rtentry.
    if unsafe { ioctl(fd, req, arg) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Brings `dev` up, with an address and a default route when given: the
/// job of four `ip` runs, without their ~1 s of exec time under TCG.
fn ifup(dev: &str, addr: Option<(&str, &str, &str)>) -> io::Result<()> {
    // SAFETY: a plain syscall; the fd is closed below.
    let fd = unsafe { socket(2, 2, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        if let Some((ip, mask, _)) = addr {
            for (req, a, what) in [
                (SIOCSIFADDR, ip, "set address"),
                (SIOCSIFNETMASK, mask, "set netmask"),
            ] {
                let mut r = ifreq(dev);
                let sa = sin(parse_ip(a)?);
                // SAFETY: SockAddrIn is 16 bytes, the union has 24.
                unsafe { std::ptr::write_unaligned(r.data.as_mut_ptr() as *mut SockAddrIn, sa) };
                sioc(fd, req, &mut r as *mut IfReq as *mut u8, &format!("{dev}: {what}"))?;
            }
        }
        let mut r = ifreq(dev);
        sioc(fd, SIOCGIFFLAGS, &mut r as *mut IfReq as *mut u8, &format!("{dev}: get flags"))?;
        let flags = u16::from_ne_bytes([r.data[0], r.data[1]]) | 1; // IFF_UP
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        sioc(fd, SIOCSIFFLAGS, &mut r as *mut IfReq as *mut u8, &format!("{dev}: up"))?;
        if let Some((_, _, gw)) = addr.filter(|a| !a.2.is_empty()) {
            let mut rt = RtEntry {
                pad1: 0,
                dst: sin([0; 4]),
                gateway: sin(parse_ip(gw)?),
                genmask: sin([0; 4]),
                flags: 1 | 2, // RTF_UP | RTF_GATEWAY
                pad2: 0,
                pad3: 0,
                tos: 0,
                class: 0,
                pad4: [0; 3],
                metric: 0,
                dev: std::ptr::null_mut(),
                mtu: 0,
                window: 0,
                irtt: 0,
            };
            sioc(fd, SIOCADDRT, &mut rt as *mut RtEntry as *mut u8, &format!("{dev}: default route"))?;
        }
        Ok(())
    })();
    // SAFETY: fd is ours and not used after.
    unsafe { close(fd) };
    result
}

/// The device's MAC address.
fn hwaddr(dev: &str) -> io::Result<[u8; 6]> {
    // SAFETY: a plain syscall; the fd is closed below.
    let fd = unsafe { socket(2, 2, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut r = ifreq(dev);
    let res = sioc(fd, SIOCGIFHWADDR, &mut r as *mut IfReq as *mut u8, &format!("{dev}: get MAC"));
    // SAFETY: fd is ours and not used after.
    unsafe { close(fd) };
    res?;
    // struct sockaddr: family (2 bytes), then the address.
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&r.data[2..8]);
    Ok(mac)
}

/// What a DHCP server offered or acknowledged.
#[derive(Debug, Default)]
struct Lease {
    kind: u8,
    addr: [u8; 4],
    server: Option<[u8; 4]>,
    mask: Option<[u8; 4]>,
    router: Option<[u8; 4]>,
    dns: Vec<[u8; 4]>,
}

const DHCP_DISCOVER: u8 = 1;
const DHCP_OFFER: u8 = 2;
const DHCP_REQUEST: u8 = 3;
const DHCP_ACK: u8 = 5;
const DHCP_NAK: u8 = 6;

/// A BOOTP request carrying DHCP message `kind` (RFC 2131/2132).
fn dhcp_packet(kind: u8, xid: u32, mac: [u8; 6], host: &str, want: Option<&Lease>) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    // The broadcast flag: with no address yet, replies must be broadcast.
    p[10] = 0x80;
    p[28..34].copy_from_slice(&mac);
    p.extend_from_slice(&[99, 130, 83, 99]);
    p.extend_from_slice(&[53, 1, kind]);
    if let Some(l) = want {
        p.extend_from_slice(&[50, 4]);
        p.extend_from_slice(&l.addr);
        if let Some(s) = l.server {
            p.extend_from_slice(&[54, 4]);
            p.extend_from_slice(&s);
        }
    }
    let host = &host.as_bytes()[..host.len().min(63)];
    if !host.is_empty() {
        p.extend_from_slice(&[12, host.len() as u8]);
        p.extend_from_slice(host);
    }
    // Parameters: netmask, router, DNS servers.
    p.extend_from_slice(&[55, 3, 1, 3, 6, 255]);
    p
}

/// Parses a server's reply to `xid`; None when it is not one.
fn dhcp_parse(b: &[u8], xid: u32, mac: [u8; 6]) -> Option<Lease> {
    if b.len() < 240 || b[0] != 2 || b[4..8] != xid.to_be_bytes() || b[28..34] != mac {
        return None;
    }
    if b[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let mut l = Lease::default();
    l.addr.copy_from_slice(&b[16..20]);
    let mut i = 240;
    let ip = |v: &[u8]| -> Option<[u8; 4]> { v.get(..4)?.try_into().ok() };
    while i < b.len() {
        let code = b[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = *b.get(i + 1)? as usize;
        let v = b.get(i + 2..i + 2 + len)?;
        match code {
            53 => l.kind = *v.first()?,
            54 => l.server = ip(v),
            1 => l.mask = ip(v),
            3 => l.router = ip(v),
            6 => l.dns = v.chunks_exact(4).filter_map(ip).collect(),
            _ => {}
        }
        i += 2 + len;
    }
    (l.kind != 0).then_some(l)
}

/// A UDP socket on port 68 of `dev` that may send and receive broadcasts.
fn dhcp_socket(dev: &str) -> io::Result<std::net::UdpSocket> {
    use std::os::unix::io::FromRawFd;
    // SAFETY: a plain syscall; the fd is owned by the UdpSocket below.
    let fd = unsafe { socket(2, 2 | 0o2000000, 0) }; // SOCK_DGRAM | SOCK_CLOEXEC
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let sock = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    let one = 1i32.to_ne_bytes();
    // SOL_SOCKET: SO_REUSEADDR, SO_BROADCAST, SO_BINDTODEVICE.
    for (name, val) in [(2, &one[..]), (6, &one[..]), (25, dev.as_bytes())] {
        // SAFETY: val points to len readable bytes.
        if unsafe { setsockopt(fd, 1, name, val.as_ptr(), val.len() as u32) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // bind(2) itself: std can only bind while creating the socket, and
    // SO_BINDTODEVICE must come first.
    let sa = sin([0; 4]);
    let sa = SockAddrIn { port: 68u16.to_be(), ..sa };
    unsafe extern "C" {
        fn bind(fd: i32, addr: *const SockAddrIn, len: u32) -> i32;
    }
    // SAFETY: sa is a valid sockaddr_in of the size given.
    if unsafe { bind(fd, &sa, 16) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("bind 0.0.0.0:68: {e}")));
    }
    Ok(sock)
}

/// Configures `dev` by DHCP: DISCOVER, OFFER, REQUEST, ACK over a UDP
/// socket bound to the device (no raw sockets: the kernel sends a
/// broadcast from 0.0.0.0 on an interface without an address), then sets
/// the address, netmask, default route and /etc/resolv.conf.
fn dhcp(dev: &str, host: &str, timeout: u64) -> io::Result<String> {
    use std::time::{Duration, Instant};
    ifup(dev, None)?;
    let mac = hwaddr(dev)?;
    let sock = dhcp_socket(dev)?;
    let server = "255.255.255.255:67";
    let mut seed = [0u8; 4];
    let _ = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
    let xid = u32::from_ne_bytes(seed);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(timeout);
    // Waits for a reply of `kind` (or a NAK), resending `req` with backoff.
    let exchange = |req: &[u8], kinds: &[u8]| -> io::Result<Lease> {
        let mut wait = Duration::from_millis(500);
        let mut buf = [0u8; 1500];
        loop {
            sock.send_to(req, server)?;
            // Never past the deadline: the backoff alone would give up
            // at 7.5 s for a 5 s timeout (0.5 + 1 + 2 + 4).
            let until = (Instant::now() + wait).min(deadline);
            while let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
                sock.set_read_timeout(Some(left))?;
                let n = match sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
                    Err(e) => return Err(e),
                };
                if let Some(l) = dhcp_parse(&buf[..n], xid, mac)
                    && kinds.contains(&l.kind)
                {
                    return Ok(l);
                }
            }
            if Instant::now() >= deadline {
                // The time it really waited, for those checking the limit.
                let msg = format!(
                    "no DHCP answer in {timeout} s (gave up after {:.2} s)",
                    start.elapsed().as_secs_f64()
                );
                return Err(io::Error::new(io::ErrorKind::TimedOut, msg));
            }
            wait = (wait * 2).min(Duration::from_secs(4));
        }
    };
    let lease = loop {
        let offer = exchange(&dhcp_packet(DHCP_DISCOVER, xid, mac, host, None), &[DHCP_OFFER])?;
        let ack = exchange(
            &dhcp_packet(DHCP_REQUEST, xid, mac, host, Some(&offer)),
            &[DHCP_ACK, DHCP_NAK],
        )?;
        if ack.kind == DHCP_ACK {
            break Lease { server: ack.server.or(offer.server), ..ack };
        }
    };
    let fmt = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_string();
    let ip = fmt(lease.addr);
    let mask = fmt(lease.mask.unwrap_or([255, 255, 255, 0]));
    let gw = lease.router.map(fmt).unwrap_or_default();
    ifup(dev, Some((&ip, &mask, &gw)))?;
    if !lease.dns.is_empty() {
        let text: String = lease.dns.iter().map(|d| format!("nameserver {}\n", fmt(*d))).collect();
        let _ = fs::remove_file("/etc/resolv.conf");
        let _ = fs::write("/etc/resolv.conf", text);
    }
    Ok(format!("{dev} {ip}/{mask} via DHCP"))
}

fn log(msg: &str) {
    // The console is the serial line: the host shows it on failure.
    let _ = writeln!(io::stderr(), "mkt-init: {msg}");
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn do_mount(src: &str, target: &str, fstype: &str, flags: u64, data: &str) -> io::Result<()> {
    let _ = fs::create_dir_all(target);
    let (s, t, f, d) = (c(src), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() { std::ptr::null() } else { f.as_ptr() },
            flags,
            if data.is_empty() { std::ptr::null() } else { d.as_ptr() },
        )
    };
    if r == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("mount {src} on {target} ({fstype} {data}): {e}"),
        ))
    }
}

/// Netlink attributes (type, payload) of `b`, in order.
fn nl_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
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
fn acpi_events() -> io::Result<File> {
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
                let named = a.iter().any(|(t, v)| *t == 1 && v.starts_with(b"acpi_mc_group"));
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
static SESSION: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// `mkt stop` asks for an ACPI power-off. Nothing else in an mkt guest
/// (no acpid, no logind, maybe no evdev) would act on the power button, so
/// the init does: SIGTERM to every process (the command ends, or its trap
/// runs, and its status is reported as usual), SIGHUP to the shell's
/// session (an interactive shell ignores SIGTERM), then, if something is
/// still running after a grace period, sync and power off.
fn watch_power_button() {
    let mut sock = match acpi_events() {
        Ok(s) => s,
        Err(e) => {
            log(&format!("no ACPI power button events (mkt stop will force the VM off): {e}"));
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

fn poweroff() -> ! {
    // SAFETY: sync and reboot take no pointers; PID 1 may power off.
    unsafe {
        sync();
        reboot(RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn fail(msg: &str) -> ! {
    log(msg);
    log("cannot continue; powering off");
    poweroff()
}

/// Loads the modules packed into the initramfs, in /modules/order order.
fn load_modules() {
    let Ok(order) = fs::read_to_string("/modules/order") else {
        return;
    };
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = format!("/modules/{name}");
        let Ok(f) = File::open(&path) else {
            log(&format!("missing module {path}"));
            continue;
        };
        let empty = c("");
        // SAFETY: finit_module reads the open fd and the empty params string.
        let r = unsafe { syscall(SYS_FINIT_MODULE, f.as_raw_fd(), empty.as_ptr(), 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(17) {
                log(&format!("loading {name}: {e}"));
            }
        }
    }
}

/// Undoes the plan's escaping of tab, newline and backslash in fields.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(ch) = it.next() {
        if ch == '\\' {
            match it.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => out.push('\\'),
            }
        } else {
            out.push(ch);
        }
    }
    out
}

#[derive(Default)]
struct Plan {
    mode: String,
    root_kind: String,
    root_tag: String,
    ops: Vec<Vec<String>>,
    user: Option<(String, u32, u32, String)>,
    cwd: Option<String>,
    hostname: Option<String>,
    exec: Vec<String>,
    setup: Option<String>,
    boot: Option<String>,
    /// The tree's sshd, started by the init (shell mode).
    sshd: Option<String>,
    /// The host terminal: TERM, rows, cols (0: unknown).
    term: Option<(String, u16, u16)>,
    net: Option<(String, String, String, String)>,
    /// (device, hostname, timeout in seconds): configure the device by DHCP.
    dhcp: Option<(String, String, u64)>,
}

fn parse_plan(text: &str) -> Plan {
    let mut p = Plan {
        mode: "exec".into(),
        root_kind: "9p".into(),
        root_tag: "root".into(),
        ..Plan::default()
    };
    for line in text.lines() {
        let f: Vec<String> = line.split('\t').map(unescape).collect();
        let n = |i: usize| f.get(i).cloned().unwrap_or_default();
        match f[0].as_str() {
            "" => {}
            c if c.starts_with('#') => {}
            "mode" => p.mode = n(1),
            "root" => (p.root_kind, p.root_tag) = (n(1), n(2)),
            "user" => {
                p.user = Some((n(1), n(2).parse().unwrap_or(0), n(3).parse().unwrap_or(0), n(4)))
            }
            "cwd" => p.cwd = Some(n(1)),
            "hostname" => p.hostname = Some(n(1)),
            "exec" => p.exec = f[1..].to_vec(),
            "setup" => p.setup = Some(n(1)),
            "boot" => p.boot = Some(n(1)),
            "sshd" => p.sshd = Some(n(1)),
            "term" => p.term = Some((n(1), n(2).parse().unwrap_or(0), n(3).parse().unwrap_or(0))),
            "net" => p.net = Some((n(1), n(2), n(3), n(4))),
            "dhcp" => p.dhcp = Some((n(1), n(2), n(3).parse().unwrap_or(30))),
            _ => p.ops.push(f),
        }
    }
    p
}

/// `coherent`: the host may change the files while the guest runs (home,
/// the kernel tree being rebuilt), so 9p must not cache them loosely. The
/// stored rootfs never changes: it gets the fast, loose cache.
fn mount_share(kind: &str, tag: &str, target: &str, ro: bool, coherent: bool) -> io::Result<()> {
    let flags = if ro { MS_RDONLY } else { 0 };
    if kind == "virtiofs" {
        // virtiofsd's --cache decides coherency on the host side.
        do_mount(tag, target, "virtiofs", flags, "")
    } else {
        let cache = if coherent { "mmap" } else { "loose" };
        do_mount(
            tag,
            target,
            "9p",
            flags,
            &format!("trans=virtio,version=9p2000.L,cache={cache},msize=512000"),
        )
    }
}

/// Carries out one plan operation, with paths relative to the new root.
fn apply(op: &[String], root: &str) -> io::Result<()> {
    let at = |p: &str| format!("{root}{p}");
    let arg = |i: usize| op.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "share" => mount_share(arg(4), arg(1), &at(arg(2)), arg(3) == "ro", true),
        "mkdir" => {
            fs::create_dir_all(at(arg(1)))?;
            let mode = u32::from_str_radix(arg(2), 8).unwrap_or(0o755);
            fs::set_permissions(at(arg(1)), fs::Permissions::from_mode(mode))
        }
        "symlink" => {
            let link = at(arg(2));
            if let Some(parent) = Path::new(&link).parent() {
                fs::create_dir_all(parent)?;
            }
            let _ = fs::remove_file(&link);
            symlink(arg(1), &link)
        }
        "file" => {
            let dst = at(arg(2));
            if let Some(parent) = Path::new(&dst).parent() {
                fs::create_dir_all(parent)?;
            }
            let _ = fs::remove_file(&dst);
            fs::copy(format!("/mkt/{}", arg(1)), &dst)?;
            let mode = u32::from_str_radix(arg(3), 8).unwrap_or(0o644);
            fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
            let (uid, gid) = (arg(4).parse().unwrap_or(0), arg(5).parse().unwrap_or(0));
            let p = c(&dst);
            // SAFETY: p is a valid NUL-terminated path.
            if unsafe { chown(p.as_ptr(), uid, gid) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        "tmpfs" => do_mount("tmpfs", &at(arg(1)), "tmpfs", 0, "mode=0755"),
        // mkt inside the guest is this same static binary.
        "install-self" => {
            let dst = at(arg(1));
            if let Some(parent) = Path::new(&dst).parent() {
                fs::create_dir_all(parent)?;
            }
            fs::copy("/init", &dst)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
        }
        other => Err(io::Error::other(format!("unknown plan operation {other:?}"))),
    }
}

const MS_NOSUID: u64 = 2;
const MS_NODEV: u64 = 4;
const MS_NOEXEC: u64 = 8;

/// /dev/pts (ptys: sudo's use_pty, ssh sessions, script) and /dev/shm
/// (POSIX shared memory: Python multiprocessing), which devtmpfs lacks;
/// systemd leaves mounts it finds in place.
fn mount_dev_extras() {
    // The tree's tty group owns the ptys, as udev/systemd would set it.
    let tty = fs::read_to_string("/etc/group")
        .ok()
        .and_then(|g| {
            g.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.first() == Some(&"tty")).then(|| f.get(2)?.parse::<u32>().ok())?
            })
        })
        .unwrap_or(5);
    let pts = format!("gid={tty},mode=620,ptmxmode=666");
    for (src, dst, fstype, flags, data) in [
        ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, pts.as_str()),
        ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ] {
        if let Err(e) = do_mount(src, dst, fstype, flags, data) {
            log(&e.to_string());
        }
    }
}

/// The virtio-serial port on which the guest tells the host whether its
/// sshd listens, so `mkt ssh` connects only once it does.
const READY_PORT: &str = "mkt.ready";

/// Whether a socket listens on TCP port 22 (IPv4 or IPv6): the port QEMU
/// forwards the host's SSH port to.
fn sshd_listening() -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f).unwrap_or_default().lines().skip(1).any(|l| {
            // sl local_address rem_address st ...; 0A is LISTEN.
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() > 3 && w[1].ends_with(":0016") && w[3] == "0A"
        })
    })
}

/// Tells the host (on [`READY_PORT`]) whether sshd listens, waiting up to
/// `wait` for it.
fn report_sshd(wait: std::time::Duration) {
    let deadline = std::time::Instant::now() + wait;
    let listening = loop {
        if sshd_listening() {
            break true;
        }
        if std::time::Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let line = if listening {
        "sshd ready".to_string()
    } else {
        format!("sshd failed: nothing listens on port 22 after {}s", wait.as_secs())
    };
    match open_port(READY_PORT) {
        Some(mut port) => {
            let _ = writeln!(port, "{line}");
        }
        None => log(&format!("{line} (no {READY_PORT} port to tell the host)")),
    }
}

/// Starts the tree's sshd (it forks into the background once listening).
fn start_sshd(sshd: &str) {
    // Its privilege-separation directory; /run comes from the tree.
    let _ = fs::create_dir_all("/run/sshd");
    let _ = fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755));
    match Command::new(sshd).stdin(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        Ok(s) => log(&format!("{sshd} failed: {s}")),
        Err(e) => log(&format!("cannot start {sshd}: {e}")),
    }
}

/// Moves the new root over / (the initramfs cannot be pivot_root'ed).
fn switch_root(root: &str) -> io::Result<()> {
    for m in ["/proc", "/sys", "/dev"] {
        do_mount(m, &format!("{root}{m}"), "", MS_MOVE, "")?;
    }
    std::env::set_current_dir(root)?;
    do_mount(".", "/", "", MS_MOVE, "")?;
    let dot = c(".");
    // SAFETY: dot is a valid path; PID 1 runs as root.
    if unsafe { chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

fn find_port(name: &str) -> Option<PathBuf> {
    for e in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let n = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

fn open_port(name: &str) -> Option<File> {
    let p = find_port(name)?;
    fs::OpenOptions::new().write(true).open(p).ok()
}

fn user_env(cmd: &mut Command, user: &Option<(String, u32, u32, String)>) {
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("TERM", std::env::var("TERM").unwrap_or_else(|_| "linux".into()))
        .env("LANG", "C.UTF-8");
    if let Some((name, uid, gid, home)) = user {
        cmd.uid(*uid).gid(*gid);
        cmd.env("HOME", home).env("USER", name).env("LOGNAME", name);
    } else {
        cmd.env("HOME", "/root").env("USER", "root").env("LOGNAME", "root");
    }
}

/// Exec mode: run the command as the user with stdout/stderr on their own
/// virtio-serial ports, then report the exit status on the status port.
fn run_exec(p: &Plan) -> ! {
    let (Some(out), Some(err), Some(mut status)) = (
        open_port("mkt.stdout"),
        open_port("mkt.stderr"),
        open_port("mkt.status"),
    ) else {
        fail("virtio-serial ports mkt.stdout/mkt.stderr/mkt.status not found");
    };
    let code = if p.exec.is_empty() {
        0
    } else {
        let mut cmd = Command::new(&p.exec[0]);
        cmd.args(&p.exec[1..]);
        user_env(&mut cmd, &p.user);
        let cwd = p
            .cwd
            .clone()
            .filter(|d| Path::new(d).is_dir())
            .or_else(|| p.user.as_ref().map(|u| u.3.clone()))
            .unwrap_or_else(|| "/".into());
        cmd.current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err.try_clone().expect("dup")));
        // SAFETY: setsid is async-signal-safe; the child gets its own session.
        unsafe {
            cmd.pre_exec(|| {
                setsid();
                Ok(())
            });
        }
        match cmd.status() {
            Ok(s) => s.code().unwrap_or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                128 + s.signal().unwrap_or(0)
            }),
            Err(e) => {
                let _ = writeln!(&err, "mkt: cannot run {}: {e}", p.exec[0]);
                if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 }
            }
        }
    };
    let _ = writeln!(status, "EXIT {code}");
    drop(status);
    poweroff()
}

/// The console's size (the host terminal's): a serial line carries none.
/// The init keeps the console open, so the size stays for the shell.
fn set_winsize(rows: u16, cols: u16) {
    let ws: [u16; 4] = [rows, cols, 0, 0];
    // SAFETY: ws is a struct winsize (4 u16) that outlives the call.
    if unsafe { ioctl(0, TIOCSWINSZ, ws.as_ptr()) } != 0 {
        log(&format!("console size {rows}x{cols}: {}", io::Error::last_os_error()));
    }
}

/// Reads `rows cols` lines from the port and sets each on the console. A
/// read returns 0 while the host end is not connected: wait and retry.
fn follow_winsize(port: &Path) {
    use std::io::BufRead;
    loop {
        let Ok(f) = File::open(port) else { return };
        for line in io::BufReader::new(f).lines() {
            let Ok(line) = line else { break };
            let mut it = line.split_whitespace().map(|n| n.parse::<u16>().ok());
            if let (Some(Some(rows)), Some(Some(cols))) = (it.next(), it.next()) {
                set_winsize(rows, cols);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// Lowers the console log level to `quiet`'s (errors and worse) so kernel
/// messages stop landing on the shell; dmesg keeps them all. Left alone
/// when the command line asks for a level (loglevel=, debug, ignore_loglevel).
fn quiet_console() {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let asked = cmdline.split_whitespace().any(|w| {
        w.starts_with("loglevel=") || w == "debug" || w == "ignore_loglevel"
    });
    if !asked && let Err(e) = fs::write("/proc/sys/kernel/printk", "4\n") {
        log(&format!("console log level: {e}"));
    }
}

/// Shell mode: a login shell of the user on the console, power off after.
fn run_shell(p: &Plan) -> ! {
    let shell = "/bin/bash";
    let shell = if Path::new(shell).exists() { shell } else { "/bin/sh" };
    let mut cmd = Command::new(shell);
    cmd.arg("-l");
    user_env(&mut cmd, &p.user);
    if let Some((term, rows, cols)) = &p.term {
        if !term.is_empty() {
            cmd.env("TERM", term);
        }
        if *rows > 0 && *cols > 0 {
            set_winsize(*rows, *cols);
        }
    }
    // The host sends the terminal's new size after each resize; setting it
    // on the console sends the shell's foreground job SIGWINCH.
    if let Some(port) = find_port("mkt.winsize") {
        std::thread::spawn(move || follow_winsize(&port));
    }
    quiet_console();
    if let Some(u) = &p.user {
        cmd.current_dir(&u.3);
    }
    // SAFETY: setsid and ioctl are async-signal-safe; the console becomes
    // the shell's controlling terminal so job control and Ctrl-C work.
    unsafe {
        cmd.pre_exec(|| {
            setsid();
            ioctl(0, TIOCSCTTY, 1);
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(mut child) => {
            SESSION.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
            let _ = child.wait();
        }
        Err(e) => log(&format!("cannot start {shell}: {e}")),
    }
    poweroff()
}

/// Where the boot-time size/mtime of every tree module is recorded.
const MODULES_BOOT: &str = "/etc/mkt/modules.boot";

/// (size, mtime seconds, mtime nanoseconds) of what `path` points to.
fn stamp(path: &str) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ok()?;
    Some((m.size(), m.mtime(), m.mtime_nsec()))
}

fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

/// The modules that depend on `m` (they must go first when it is unloaded).
fn holders(m: &str) -> Vec<String> {
    fs::read_dir(format!("/sys/module/{m}/holders"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Post-order: every holder of `m` before `m` itself.
fn unload_order(m: &str, out: &mut Vec<String>) {
    if out.iter().any(|x| x == m) {
        return;
    }
    for h in holders(m) {
        unload_order(&h, out);
    }
    if !out.iter().any(|x| x == m) {
        out.push(m.to_string());
    }
}

/// `mkt modules-reload [--all]` in the guest: reload, in dependency order,
/// the loaded modules whose .ko changed in the build tree since boot (or
/// since the last reload); with --all, every loaded module of the tree.
fn modules_reload(args: &[String]) -> i32 {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { geteuid() } != 0 {
        // Loading modules needs root; the user has passwordless sudo.
        let e = Command::new("sudo")
            .args(["-n", "/usr/local/bin/mkt", "modules-reload"])
            .args(args)
            .exec();
        eprintln!("mkt: modules-reload needs root, and sudo failed: {e}");
        return 1;
    }
    let all = args.iter().any(|a| a == "--all");
    let Ok(text) = fs::read_to_string(MODULES_BOOT) else {
        eprintln!("mkt: {MODULES_BOOT} missing: this guest was not booted from a kernel tree by mkt");
        return 1;
    };
    let mut records: Vec<(String, String)> = Vec::new(); // (path, stamp line)
    let mut changed: Vec<String> = Vec::new();
    let mut paths: std::collections::HashMap<String, String> = Default::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 4 {
            continue;
        }
        let now = stamp(f[0]);
        let then = (f[1].parse().ok(), f[2].parse().ok(), f[3].parse().ok());
        let name = module_name(f[0]);
        paths.insert(name.clone(), f[0].to_string());
        let differs = match now {
            Some((a, b, c)) => (Some(a), Some(b), Some(c)) != then,
            None => false,
        };
        if differs || all {
            changed.push(name);
        }
        let fresh = now.map_or(line.to_string(), |(a, b, c)| format!("{}\t{a}\t{b}\t{c}", f[0]));
        records.push((f[0].to_string(), fresh));
    }
    let loaded: Vec<String> = fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').next().map(str::to_string))
        .collect();
    let (to_reload, not_loaded): (Vec<String>, Vec<String>) =
        changed.into_iter().partition(|m| loaded.contains(m));
    if !not_loaded.is_empty() && !all {
        println!("changed, not loaded (modprobe will load the new one): {}", not_loaded.join(" "));
    }
    if to_reload.is_empty() {
        println!("no modules changed");
        return 0;
    }
    let mut order = Vec::new();
    for m in &to_reload {
        unload_order(m, &mut order);
    }
    // A module in use stops the unloading; those already unloaded are
    // loaded again below, so a refused reload leaves the guest as it was.
    let mut unloaded = Vec::new();
    let mut failed = false;
    for m in &order {
        let name = c(m);
        // SAFETY: name is a valid C string; O_NONBLOCK (2048) fails when busy.
        if unsafe { syscall(176, name.as_ptr(), 2048) } != 0 {
            let e = io::Error::last_os_error();
            // EAGAIN (O_NONBLOCK) or EBUSY: something holds it.
            let why = if matches!(e.raw_os_error(), Some(11 | 16)) { " (in use)" } else { "" };
            eprintln!("mkt: cannot unload {m}: {e}{why}; nothing more is unloaded");
            failed = true;
            break;
        }
        unloaded.push(m.clone());
    }
    let mut reloaded = Vec::new();
    for m in unloaded.iter().rev() {
        let Some(path) = paths.get(m) else {
            eprintln!("mkt: {m} was unloaded but is not a module of the tree: modprobe it");
            continue;
        };
        let loaded = File::open(path).and_then(|f| {
            let empty = c("");
            // SAFETY: finit_module reads the open fd and the empty params.
            match unsafe { syscall(SYS_FINIT_MODULE, f.as_raw_fd(), empty.as_ptr(), 0) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
        match loaded {
            Ok(()) => reloaded.push(m.clone()),
            // The others are still loaded back.
            Err(e) => {
                eprintln!("mkt: cannot load {path}: {e}");
                failed = true;
            }
        }
    }
    if !reloaded.is_empty() {
        println!("reloaded: {}", reloaded.join(" "));
    }
    if failed {
        // The record stays: the next reload tries the changed ones again.
        return 1;
    }
    let text: String = records.iter().map(|(_, l)| format!("{l}\n")).collect();
    let _ = fs::write(MODULES_BOOT, text);
    0
}

fn main() {
    if std::process::id() != 1 {
        let args: Vec<String> = std::env::args().collect();
        match args.get(1).map(String::as_str) {
            Some("modules-reload") => std::process::exit(modules_reload(&args[2..])),
            // systemd mode's mkt-ssh-ready.service, once ssh.service started.
            Some("ssh-ready") if args.len() == 2 => {
                report_sshd(std::time::Duration::from_secs(30));
                std::process::exit(0)
            }
            _ => {}
        }
        eprintln!("usage: mkt modules-reload [--all] | mkt ssh-ready  (mkt's guest side; PID 1 of mkt guests)");
        std::process::exit(2);
    }
    for (src, dst, fstype) in [("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"), ("devtmpfs", "/dev", "devtmpfs")] {
        if let Err(e) = do_mount(src, dst, fstype, 0, "") {
            log(&e.to_string());
        }
    }
    load_modules();
    let mut text = String::new();
    if let Err(e) = File::open("/mkt/plan").and_then(|mut f| f.read_to_string(&mut text)) {
        fail(&format!("reading /mkt/plan: {e}"));
    }
    let plan = parse_plan(&text);

    // The stored tree, read-only, under a tmpfs overlay: the run's writes
    // live in guest memory and vanish with it.
    let root = "/newroot";
    let steps = || -> io::Result<()> {
        mount_share(&plan.root_kind, &plan.root_tag, "/lower", true, false)?;
        do_mount("tmpfs", "/rw", "tmpfs", 0, "mode=0755")?;
        fs::create_dir_all("/rw/upper")?;
        fs::create_dir_all("/rw/work")?;
        do_mount(
            "overlay",
            root,
            "overlay",
            0,
            "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work",
        )
    };
    if let Err(e) = steps() {
        fail(&e.to_string());
    }
    for op in &plan.ops {
        if let Err(e) = apply(op, root) {
            fail(&format!("plan step {}: {e}", op.join(" ")));
        }
    }
    if let Some(h) = &plan.hostname {
        // SAFETY: the pointer and length describe h's bytes.
        unsafe { sethostname(h.as_ptr(), h.len()) };
    }
    if let Err(e) = switch_root(root) {
        fail(&format!("switch root: {e}"));
    }
    mount_dev_extras();
    if let Err(e) = ifup("lo", None) {
        log(&e.to_string());
    }
    if let Some((dev, ip, mask, gw)) = &plan.net
        && let Err(e) = ifup(dev, Some((ip, mask, gw)))
    {
        log(&e.to_string());
    }
    if let Some((dev, host, timeout)) = &plan.dhcp {
        match dhcp(dev, host, *timeout) {
            Ok(done) => log(&done),
            Err(e) => log(&format!("DHCP on {dev} FAILED: {e}")),
        }
    }
    if let Some(setup) = &plan.setup {
        match Command::new("/bin/sh").arg(setup).status() {
            Ok(s) if s.success() => {}
            Ok(s) => log(&format!("{setup} failed: {s}")),
            Err(e) => log(&format!("cannot run {setup}: {e}")),
        }
    }
    if let Some(sshd) = plan.sshd.clone() {
        // Beside the boot: the shell's prompt does not wait for sshd, and
        // the host hears when sshd listens.
        std::thread::spawn(move || {
            start_sshd(&sshd);
            report_sshd(std::time::Duration::from_secs(5));
        });
    }
    // systemd handles the power button itself (logind).
    if plan.mode != "systemd" {
        std::thread::spawn(watch_power_button);
    }
    // The boot script runs as the user before the command or shell (systemd
    // mode runs it from a unit instead); its output goes to the console.
    if let (Some(script), false) = (&plan.boot, plan.mode == "systemd") {
        let mut cmd = Command::new(script);
        user_env(&mut cmd, &plan.user);
        if let Some(u) = &plan.user {
            cmd.current_dir(&u.3);
        }
        match cmd.stdin(Stdio::null()).status() {
            Ok(s) if s.success() => log("boot script: ok"),
            Ok(s) => log(&format!("boot script {script} FAILED: {s}")),
            Err(e) => log(&format!("boot script {script} FAILED: cannot run: {e}")),
        }
    }
    match plan.mode.as_str() {
        "exec" => run_exec(&plan),
        "shell" => run_shell(&plan),
        "systemd" => {
            let e = Command::new("/sbin/init").exec();
            fail(&format!("cannot exec /sbin/init: {e}"))
        }
        m => fail(&format!("unknown mode {m:?}")),
    }
}
