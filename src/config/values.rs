//! Typed config and flag values, each parsed once where it enters mkt, by
//! its [`FromStr`]: from the config file through serde, from the command
//! line through clap (or `cli::run_options`, for sizes and PCI addresses,
//! whose errors name the flag as mkt's own errors do). The error strings
//! are the reasons shown after "bad value ... for key ...".

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// serde through the type's own `FromStr` and `Display`: a TOML string.
macro_rules! string_value {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(Parsed(std::marker::PhantomData))
            }
        }
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
string_value!(MemSize, PciAddr, MacAddr, NetMode, SoftRdma);

/// Parses while toml still deserializes the value itself, so that an error
/// gets the span of this value (an array's element), not of its container.
struct Parsed<T>(std::marker::PhantomData<T>);

impl<T: FromStr<Err = String>> serde::de::Visitor<'_> for Parsed<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

/// A number of guest CPUs: at least one. The one parser for `--cpus`
/// (clap, through [`FromStr`]) and the config's `cpus` (serde, through
/// `TryFrom<u32>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Cpus(std::num::NonZeroU32);

impl Cpus {
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl TryFrom<u32> for Cpus {
    type Error = String;
    fn try_from(n: u32) -> Result<Cpus, String> {
        std::num::NonZeroU32::new(n)
            .map(Cpus)
            .ok_or_else(|| "a guest needs at least one CPU, not 0".to_string())
    }
}

impl From<Cpus> for u32 {
    fn from(c: Cpus) -> u32 {
        c.get()
    }
}

impl FromStr for Cpus {
    type Err = String;
    fn from_str(s: &str) -> Result<Cpus, String> {
        let n: u32 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number of CPUs"))?;
        Cpus::try_from(n)
    }
}

/// A size in whole MiB, at least 1: `2G`, `2048M`, `1048576K`, `1T`, or a
/// plain number of MiB. Suffixes are binary and case-insensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(u64);

impl MemSize {
    pub fn mib(self) -> u64 {
        self.0
    }
}

impl FromStr for MemSize {
    type Err = String;
    fn from_str(s: &str) -> Result<MemSize, String> {
        let t = s.trim();
        let (digits, unit) = match t.as_bytes().last() {
            Some(c) if c.is_ascii_alphabetic() => (&t[..t.len() - 1], c.to_ascii_uppercase()),
            _ => (t, b'M'),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err("expected a size such as \"2G\" or \"2048M\" (suffix K, M, G or T)".into());
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| "size is too large".to_string())?;
        let mib = match unit {
            b'K' if !n.is_multiple_of(1024) => return Err("not a whole number of MiB".into()),
            b'K' => Some(n / 1024),
            b'M' => Some(n),
            b'G' => n.checked_mul(1024),
            b'T' => n.checked_mul(1024 * 1024),
            _ => {
                return Err(format!(
                    "unknown suffix `{}` (use K, M, G or T)",
                    unit as char
                ));
            }
        };
        match mib {
            None => Err("size is too large".into()),
            Some(0) => Err("size must be at least 1M".into()),
            Some(m) => Ok(MemSize(m)),
        }
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            m if m.is_multiple_of(1 << 20) => write!(f, "{}T", m >> 20),
            m if m.is_multiple_of(1 << 10) => write!(f, "{}G", m >> 10),
            m => write!(f, "{m}M"),
        }
    }
}

/// A PCI function, `[DDDD:]BB:DD.F` (hex) as written, shown in the full
/// lowercase form sysfs uses, `0000:05:00.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciAddr(String);

impl PciAddr {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PciAddr {
    type Err = String;
    fn from_str(addr: &str) -> Result<PciAddr, String> {
        const FORM: &str =
            "expected a PCI address such as 0000:05:00.0 ([domain:]bus:device.function, hex)";
        let hex = |s: &str, max_digits: usize| -> Result<u32, String> {
            if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(FORM.to_string());
            }
            u32::from_str_radix(s, 16).map_err(|_| FORM.to_string())
        };
        let parts: Vec<&str> = addr.trim().split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [bus, devfn] => (0, hex(bus, 2)?, *devfn),
            // Linux prints domains with %04x, so domains above 0xffff (VMD) have more digits.
            [domain, bus, devfn] => (hex(domain, 8)?, hex(bus, 2)?, *devfn),
            _ => return Err(FORM.to_string()),
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(|| FORM.to_string())?;
        let (dev, func) = (hex(dev, 2)?, hex(func, 1)?);
        if dev > 0x1f {
            return Err(format!("device {dev:#x} is out of range (at most 0x1f)"));
        }
        if func > 7 {
            return Err(format!("function {func} is out of range (at most 7)"));
        }
        Ok(PciAddr(format!(
            "{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"
        )))
    }
}

impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A unicast MAC address `aa:bb:cc:dd:ee:ff`, kept lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacAddr(String);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(mac: &str) -> Result<MacAddr, String> {
        let octets: Vec<&str> = mac.trim().split(':').collect();
        if octets.len() != 6
            || !octets
                .iter()
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err("expected a MAC address such as 02:6d:6b:74:00:01".into());
        }
        let first = u8::from_str_radix(octets[0], 16).map_err(|e| e.to_string())?;
        if first & 1 == 1 {
            return Err(
                "a multicast address cannot be a NIC's (the first octet must be even)".into(),
            );
        }
        Ok(MacAddr(octets.join(":").to_ascii_lowercase()))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bridge `net = "bridge"` uses when none is named (MKT's).
const DEFAULT_BRIDGE: &str = "br0";

/// The guest network: `nat`, `none`, `tap`, `bridge` or `bridge=IFNAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    Nat,
    None,
    /// A tap on no bridge: the host side is the user's to configure.
    Tap,
    Bridge(String),
}

/// The kernel's dev_valid_name(): below IFNAMSIZ, no '/', ':' or blanks.
fn is_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
}

impl FromStr for NetMode {
    type Err = String;
    fn from_str(net: &str) -> Result<NetMode, String> {
        match net {
            "nat" => Ok(NetMode::Nat),
            "none" => Ok(NetMode::None),
            "tap" => Ok(NetMode::Tap),
            "bridge" => Ok(NetMode::Bridge(DEFAULT_BRIDGE.into())),
            _ => match net.strip_prefix("bridge=") {
                Some(ifname) if is_ifname(ifname) => Ok(NetMode::Bridge(ifname.into())),
                Some(_) => Err("not a valid interface name after `bridge=`".into()),
                None => Err("expected one of nat, none, tap, bridge, bridge=IFNAME".into()),
            },
        }
    }
}

impl fmt::Display for NetMode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            NetMode::Nat => f.write_str("nat"),
            NetMode::None => f.write_str("none"),
            NetMode::Tap => f.write_str("tap"),
            NetMode::Bridge(b) => write!(f, "bridge={b}"),
        }
    }
}

/// A soft RDMA device made in the guest (MKT's "virt" devices), written
/// `rxe-IFNAME` (soft-RoCE) or `siw-IFNAME` (soft-iWARP).
pub use crate::guest::SoftRdma;

impl FromStr for SoftRdma {
    type Err = String;
    fn from_str(v: &str) -> Result<SoftRdma, String> {
        let (kind, netdev) = v
            .split_once('-')
            .ok_or("expected rxe-IFNAME or siw-IFNAME, e.g. rxe-eth0")?;
        let kind = match kind {
            "rxe" => "rxe",
            "siw" => "siw",
            _ => return Err(format!("unknown soft RDMA kind {kind:?}: rxe or siw")),
        };
        if netdev.is_empty()
            || netdev.len() >= 16
            || netdev.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err("not a valid interface name after the kind".into());
        }
        Ok(SoftRdma {
            kind,
            netdev: netdev.into(),
        })
    }
}

impl fmt::Display for SoftRdma {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}-{}", self.kind, self.netdev)
    }
}

/// `--init`: what an interactive guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitMode {
    // Plain comments: a doc comment would turn clap's one-line list of
    // possible values into a described list in --help.
    // The rootfs's systemd.
    Systemd,
    // mkt's init with a login shell.
    Shell,
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn sizes_are_shown_in_their_largest_whole_unit_and_read_back() {
        for (given, shown) in [
            ("1048576M", "1T"),
            ("3T", "3T"),
            ("2048M", "2G"),
            ("1025G", "1025G"),
            ("1536M", "1536M"),
            ("1M", "1M"),
            ("4096K", "4M"),
        ] {
            let m: MemSize = given.parse().unwrap();
            assert_eq!(m.to_string(), shown, "{given}");
            assert_eq!(shown.parse::<MemSize>().unwrap(), m, "{shown}");
        }
    }

    // The old function forms, so the cases below read as they were written.
    pub(crate) fn parse_mem_mib(s: &str) -> Result<u64, String> {
        s.parse::<MemSize>().map(MemSize::mib)
    }
    pub(crate) fn normalize_pci(s: &str) -> Result<String, String> {
        s.parse::<PciAddr>().map(|a| a.to_string())
    }
    pub(crate) fn check_mac(s: &str) -> Result<String, String> {
        s.parse::<MacAddr>().map(|a| a.to_string())
    }
    pub(crate) fn check_net(s: &str) -> Result<(), String> {
        s.parse::<NetMode>().map(|_| ())
    }
    pub(crate) fn parse_virt(s: &str) -> Result<(&'static str, String), String> {
        s.parse::<SoftRdma>().map(|v| (v.kind, v.netdev))
    }

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_mib("2G"), Ok(2048));
        assert_eq!(parse_mem_mib("2g"), Ok(2048));
        assert_eq!(parse_mem_mib("2048M"), Ok(2048));
        assert_eq!(parse_mem_mib("512"), Ok(512));
        assert_eq!(parse_mem_mib("1048576K"), Ok(1024));
        assert_eq!(parse_mem_mib("1T"), Ok(1024 * 1024));
        assert_eq!(parse_mem_mib(" 4G "), Ok(4096));
        for bad in [
            "",
            "G",
            "2X",
            "-1G",
            "1.5G",
            "512K",
            "0",
            "0G",
            "99999999999999999999",
            "2 G",
        ] {
            assert!(parse_mem_mib(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_mem_mib(&format!("{}T", u64::MAX / 1024)).is_err());
    }

    #[test]
    fn pci_addresses() {
        assert_eq!(normalize_pci("0000:05:00.0").as_deref(), Ok("0000:05:00.0"));
        assert_eq!(normalize_pci("05:00.1").as_deref(), Ok("0000:05:00.1"));
        assert_eq!(normalize_pci("1:A:1f.7").as_deref(), Ok("0001:0a:1f.7"));
        assert_eq!(
            normalize_pci("10000:e1:00.0").as_deref(),
            Ok("10000:e1:00.0")
        );
        for bad in [
            "",
            "05:00",
            "05.00.0",
            "0000:05:20.0",
            "0000:05:00.8",
            "0000:105:00.0",
            "x:05:00.0",
            "0:0:0:0.0",
        ] {
            assert!(normalize_pci(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn modes_parse() {
        let cases = [
            ("nat", NetMode::Nat),
            ("none", NetMode::None),
            ("tap", NetMode::Tap),
            ("bridge", NetMode::Bridge("br0".into())),
            ("bridge=br-test", NetMode::Bridge("br-test".into())),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse(), Ok(want), "{s}");
        }
    }

    #[test]
    fn net_values() {
        for good in ["nat", "none", "tap", "bridge", "bridge=br0"] {
            assert!(check_net(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "user",
            "bridge=",
            "bridge=a/b",
            "bridge=0123456789abcdef",
        ] {
            assert!(check_net(bad).is_err(), "{bad}");
        }
    }
}
