//! The virtio-serial ports, the console's size and log level, and the
//! sshd readiness the host waits for.

use crate::plan::SshdReport;
use crate::sys::{ioctl, log};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const TIOCSWINSZ: u64 = 0x5414;

/// The virtio-serial port on which the guest tells the host whether its
/// sshd listens, so `mkt ssh` connects only once it does.
pub use crate::plan::READY_PORT;

/// Whether a socket listens on TCP port 22 (IPv4 or IPv6): the port QEMU
/// forwards the host's SSH port to.
pub fn sshd_listening() -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .any(|f| listens_on_22(&fs::read_to_string(f).unwrap_or_default()))
}

/// Whether a /proc/net/tcp{,6} text has a socket listening on port 22.
pub fn listens_on_22(table: &str) -> bool {
    table.lines().skip(1).any(|l| {
        // sl local_address rem_address st ...; 0A is LISTEN.
        let w: Vec<&str> = l.split_whitespace().collect();
        w.len() > 3 && w[1].ends_with(":0016") && w[3] == "0A"
    })
}

/// Tells the host (on [`READY_PORT`]) whether sshd listens, waiting up to
/// `wait` for it.
pub fn report_sshd(wait: std::time::Duration) {
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
        SshdReport::Ready
    } else {
        SshdReport::Failed(format!(
            "nothing listens on port 22 after {}s",
            wait.as_secs()
        ))
    }
    .encode();
    match open_port(READY_PORT) {
        Some(mut port) => {
            let _ = writeln!(port, "{line}");
        }
        None => log(&format!("{line} (no {READY_PORT} port to tell the host)")),
    }
}

/// Starts the tree's sshd (it forks into the background once listening).
pub fn start_sshd(sshd: &str) {
    // Its privilege-separation directory; /run comes from the tree.
    let _ = fs::create_dir_all("/run/sshd");
    let _ = fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755));
    match Command::new(sshd).stdin(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        Ok(s) => log(&format!("{sshd} failed: {s}")),
        Err(e) => log(&format!("cannot start {sshd}: {e}")),
    }
}

pub fn find_port(name: &str) -> Option<PathBuf> {
    for e in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let n = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

pub fn open_port(name: &str) -> Option<File> {
    let p = find_port(name)?;
    fs::OpenOptions::new().write(true).open(p).ok()
}

/// The console's size (the host terminal's): a serial line carries none.
/// The init keeps the console open, so the size stays for the shell.
pub fn set_winsize(rows: u16, cols: u16) {
    let ws: [u16; 4] = [rows, cols, 0, 0];
    // SAFETY: ws is a struct winsize (4 u16) that outlives the call.
    if unsafe { ioctl(0, TIOCSWINSZ, ws.as_ptr()) } != 0 {
        log(&format!(
            "console size {rows}x{cols}: {}",
            io::Error::last_os_error()
        ));
    }
}

/// Reads `rows cols` lines from the port and sets each on the console. A
/// read returns 0 while the host end is not connected: wait and retry.
pub fn follow_winsize(port: &Path) {
    use std::io::BufRead;
    loop {
        let Ok(f) = File::open(port) else { return };
        for line in io::BufReader::new(f).lines() {
            let Ok(line) = line else { break };
            if let Some((rows, cols)) = winsize(&line) {
                set_winsize(rows, cols);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The `rows cols` of a line from the host.
pub fn winsize(line: &str) -> Option<(u16, u16)> {
    let mut it = line.split_whitespace().map(|n| n.parse::<u16>().ok());
    match (it.next(), it.next()) {
        (Some(Some(rows)), Some(Some(cols))) => Some((rows, cols)),
        _ => None,
    }
}

/// Lowers the console log level to `quiet`'s (errors and worse) so kernel
/// messages stop landing on the shell; dmesg keeps them all. Left alone
/// when the command line asks for a level (loglevel=, debug, ignore_loglevel).
pub fn quiet_console() {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !loglevel_asked(&cmdline)
        && let Err(e) = fs::write("/proc/sys/kernel/printk", "4\n")
    {
        log(&format!("console log level: {e}"));
    }
}

/// Whether the kernel command line sets the console log level.
pub fn loglevel_asked(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|w| w.starts_with("loglevel=") || w == "debug" || w == "ignore_loglevel")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    #[test]
    fn sshd_listens_when_port_22_is_in_listen_state() {
        let v4 = "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0\n";
        assert!(listens_on_22(&format!("{HEAD}{v4}")));
        let v6 = "   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1\n";
        assert!(listens_on_22(&format!("{HEAD}{v6}")));
        // Established on 22, listening on 2222 or 16 (0x0010): no.
        let est =
            "   1: 0F02000A:0016 0202000A:D0A4 01 00000000:00000000 00:00000000 00000000 0 0 1 1\n";
        let other =
            "   2: 00000000:08AE 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1\n";
        let sixteen =
            "   3: 00000000:0010 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1\n";
        // 0016 in the address, not the port: 0.0.22.0:2222.
        let addr =
            "   4: 00160000:08AE 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1\n";
        assert!(!listens_on_22(&format!(
            "{HEAD}{est}{other}{sixteen}{addr}"
        )));
        // The header line is no socket; an empty table has none.
        assert!(!listens_on_22(v4));
        assert!(!listens_on_22(""));
    }

    #[test]
    fn window_sizes_and_log_level_words() {
        assert_eq!(winsize("50 132"), Some((50, 132)));
        assert_eq!(winsize(" 24\t80 extra"), Some((24, 80)));
        assert_eq!(winsize("50"), None);
        assert_eq!(winsize("50 x"), None);
        assert_eq!(winsize("70000 80"), None);
        assert!(loglevel_asked("console=ttyS0 loglevel=7 quiet"));
        assert!(loglevel_asked("debug"));
        assert!(loglevel_asked("root=/dev/vda ignore_loglevel"));
        assert!(!loglevel_asked("console=ttyS0 quiet debugfs=on"));
    }
}
