//! Guest networking without `ip` or a DHCP client in the tree: interface
//! set-up by ioctl, and a small DHCP client.

use crate::sys::{close, ioctl, setsockopt, socket};
use std::fs::{self, File};
use std::io::{self, Read};

pub const SIOCADDRT: u64 = 0x890B;
pub const SIOCGIFFLAGS: u64 = 0x8913;
pub const SIOCSIFFLAGS: u64 = 0x8914;
pub const SIOCSIFADDR: u64 = 0x8916;
pub const SIOCSIFNETMASK: u64 = 0x891C;
pub const SIOCGIFHWADDR: u64 = 0x8927;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockAddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

pub fn sin(addr: [u8; 4]) -> SockAddrIn {
    SockAddrIn {
        family: 2, // AF_INET
        port: 0,
        addr,
        zero: [0; 8],
    }
}

/// struct ifreq: the name, then a 24-byte union (flags or an address).
#[repr(C)]
pub struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

/// struct rtentry, as the kernel and glibc lay it out on x86_64.
#[repr(C)]
pub struct RtEntry {
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

pub fn parse_ip(s: &str) -> io::Result<[u8; 4]> {
    let ip: std::net::Ipv4Addr = s
        .parse()
        .map_err(|_| io::Error::other(format!("bad IPv4 address {s:?}")))?;
    Ok(ip.octets())
}

pub fn ifreq(name: &str) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    let n = name.len().min(15);
    r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

pub fn sioc(fd: i32, req: u64, arg: *mut u8, what: &str) -> io::Result<()> {
    // SAFETY: arg points to a live, correctly sized ifreq/rtentry.
    if unsafe { ioctl(fd, req, arg) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Brings `dev` up, with an address and a default route when given: the
/// job of four `ip` runs, without their ~1 s of exec time under TCG.
pub fn ifup(dev: &str, addr: Option<(&str, &str, &str)>) -> io::Result<()> {
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
                sioc(
                    fd,
                    req,
                    &mut r as *mut IfReq as *mut u8,
                    &format!("{dev}: {what}"),
                )?;
            }
        }
        let mut r = ifreq(dev);
        sioc(
            fd,
            SIOCGIFFLAGS,
            &mut r as *mut IfReq as *mut u8,
            &format!("{dev}: get flags"),
        )?;
        let flags = u16::from_ne_bytes([r.data[0], r.data[1]]) | 1; // IFF_UP
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        sioc(
            fd,
            SIOCSIFFLAGS,
            &mut r as *mut IfReq as *mut u8,
            &format!("{dev}: up"),
        )?;
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
            sioc(
                fd,
                SIOCADDRT,
                &mut rt as *mut RtEntry as *mut u8,
                &format!("{dev}: default route"),
            )?;
        }
        Ok(())
    })();
    // SAFETY: fd is ours and not used after.
    unsafe { close(fd) };
    result
}

/// The device's MAC address.
pub fn hwaddr(dev: &str) -> io::Result<[u8; 6]> {
    // SAFETY: a plain syscall; the fd is closed below.
    let fd = unsafe { socket(2, 2, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut r = ifreq(dev);
    let res = sioc(
        fd,
        SIOCGIFHWADDR,
        &mut r as *mut IfReq as *mut u8,
        &format!("{dev}: get MAC"),
    );
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
pub struct Lease {
    kind: u8,
    addr: [u8; 4],
    server: Option<[u8; 4]>,
    mask: Option<[u8; 4]>,
    router: Option<[u8; 4]>,
    dns: Vec<[u8; 4]>,
}

pub const DHCP_DISCOVER: u8 = 1;
pub const DHCP_OFFER: u8 = 2;
pub const DHCP_REQUEST: u8 = 3;
pub const DHCP_ACK: u8 = 5;
pub const DHCP_NAK: u8 = 6;

/// A BOOTP request carrying DHCP message `kind` (RFC 2131/2132).
pub fn dhcp_packet(kind: u8, xid: u32, mac: [u8; 6], host: &str, want: Option<&Lease>) -> Vec<u8> {
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
pub fn dhcp_parse(b: &[u8], xid: u32, mac: [u8; 6]) -> Option<Lease> {
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
pub fn dhcp_socket(dev: &str) -> io::Result<std::net::UdpSocket> {
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
    let sa = SockAddrIn {
        port: 68u16.to_be(),
        ..sa
    };
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
pub fn dhcp(dev: &str, host: &str, timeout: u64) -> io::Result<String> {
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
            while let Some(left) = until
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            {
                sock.set_read_timeout(Some(left))?;
                let n = match sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break;
                    }
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
        let offer = exchange(
            &dhcp_packet(DHCP_DISCOVER, xid, mac, host, None),
            &[DHCP_OFFER],
        )?;
        let ack = exchange(
            &dhcp_packet(DHCP_REQUEST, xid, mac, host, Some(&offer)),
            &[DHCP_ACK, DHCP_NAK],
        )?;
        if ack.kind == DHCP_ACK {
            break Lease {
                server: ack.server.or(offer.server),
                ..ack
            };
        }
    };
    let fmt = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_string();
    let ip = fmt(lease.addr);
    let mask = fmt(lease.mask.unwrap_or([255, 255, 255, 0]));
    let gw = lease.router.map(fmt).unwrap_or_default();
    ifup(dev, Some((&ip, &mask, &gw)))?;
    if !lease.dns.is_empty() {
        let text: String = lease
            .dns
            .iter()
            .map(|d| format!("nameserver {}\n", fmt(*d)))
            .collect();
        let _ = fs::remove_file("/etc/resolv.conf");
        let _ = fs::write("/etc/resolv.conf", text);
    }
    Ok(format!("{dev} {ip}/{mask} via DHCP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A server's reply to `xid` for MAC: BOOTREPLY, yiaddr, the cookie, then
    /// the options given.
    fn reply(xid: u32, options: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 236];
        b[0] = 2;
        b[4..8].copy_from_slice(&xid.to_be_bytes());
        b[16..20].copy_from_slice(&[192, 168, 1, 50]);
        b[28..34].copy_from_slice(&MAC);
        b.extend_from_slice(&[99, 130, 83, 99]);
        b.extend_from_slice(options);
        b
    }

    #[test]
    fn a_discover_asks_for_broadcast_replies_and_the_parameters() {
        let p = dhcp_packet(DHCP_DISCOVER, 0x01020304, MAC, "cx5", None);
        assert_eq!(&p[..3], [1, 1, 6]);
        assert_eq!(p[4..8], [1, 2, 3, 4]);
        assert_eq!(p[10], 0x80, "the broadcast flag");
        assert_eq!(p[28..34], MAC);
        assert_eq!(
            &p[236..],
            [
                99, 130, 83, 99, 53, 1, 1, 12, 3, b'c', b'x', b'5', 55, 3, 1, 3, 6, 255
            ]
        );
    }

    #[test]
    fn a_request_names_the_offer_and_its_server_and_cuts_long_hostnames() {
        let offer = Lease {
            kind: DHCP_OFFER,
            addr: [10, 0, 0, 9],
            server: Some([10, 0, 0, 1]),
            ..Lease::default()
        };
        let host = "h".repeat(70);
        let p = dhcp_packet(DHCP_REQUEST, 7, MAC, &host, Some(&offer));
        let opts = &p[240..];
        assert_eq!(opts[..3], [53, 1, DHCP_REQUEST]);
        assert_eq!(opts[3..9], [50, 4, 10, 0, 0, 9]);
        assert_eq!(opts[9..15], [54, 4, 10, 0, 0, 1]);
        assert_eq!(opts[15..17], [12, 63]);
        assert_eq!(opts.len(), 17 + 63 + 6);
        // No hostname: no option 12.
        let p = dhcp_packet(DHCP_DISCOVER, 7, MAC, "", None);
        assert_eq!(p[240..], [53, 1, 1, 55, 3, 1, 3, 6, 255]);
    }

    #[test]
    fn a_reply_gives_the_lease() {
        let opts = [
            53, 1, 5, 0, // ACK, a pad
            54, 4, 192, 168, 1, 1, 1, 4, 255, 255, 254, 0, 3, 4, 192, 168, 1, 254, 6, 8, 9, 9, 9,
            9, 1, 1, 1, 1, 255, 42, 42, // after the end: ignored
        ];
        let l = dhcp_parse(&reply(99, &opts), 99, MAC).unwrap();
        assert_eq!(l.kind, DHCP_ACK);
        assert_eq!(l.addr, [192, 168, 1, 50]);
        assert_eq!(l.server, Some([192, 168, 1, 1]));
        assert_eq!(l.mask, Some([255, 255, 254, 0]));
        assert_eq!(l.router, Some([192, 168, 1, 254]));
        assert_eq!(l.dns, [[9, 9, 9, 9], [1, 1, 1, 1]]);
    }

    #[test]
    fn replies_to_others_or_broken_ones_are_no_lease() {
        let ok = reply(5, &[53, 1, 2, 255]);
        assert!(dhcp_parse(&ok, 5, MAC).is_some());
        assert!(dhcp_parse(&ok, 6, MAC).is_none(), "another xid");
        assert!(dhcp_parse(&ok, 5, [0; 6]).is_none(), "another MAC");
        assert!(dhcp_parse(&ok[..239], 5, MAC).is_none(), "too short");
        let mut request = ok.clone();
        request[0] = 1;
        assert!(dhcp_parse(&request, 5, MAC).is_none(), "a BOOTREQUEST");
        let mut cookie = ok.clone();
        cookie[236] = 0;
        assert!(dhcp_parse(&cookie, 5, MAC).is_none(), "no magic cookie");
        assert!(
            dhcp_parse(&reply(5, &[1, 4, 255, 255]), 5, MAC).is_none(),
            "truncated"
        );
        assert!(
            dhcp_parse(&reply(5, &[1, 4, 255, 255, 255, 0, 255]), 5, MAC).is_none(),
            "no type"
        );
    }

    #[test]
    fn addresses_parse_and_interface_names_are_cut() {
        assert_eq!(parse_ip("10.0.2.15").unwrap(), [10, 0, 2, 15]);
        assert!(
            parse_ip("10.0.2")
                .unwrap_err()
                .to_string()
                .contains("bad IPv4 address")
        );
        let r = ifreq("a-very-long-interface-name");
        assert_eq!(&r.name[..15], b"a-very-long-int");
        assert_eq!(r.name[15], 0, "NUL-terminated");
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::size_of::<SockAddrIn>(), 16);
        assert_eq!(
            std::mem::size_of::<RtEntry>(),
            120,
            "struct rtentry on x86_64"
        );
    }
}
