//! A writer for the Linux initramfs "newc" cpio format (magic `070701`).
//!
//! Each entry is a 110-byte ASCII header — the magic, then 13 fields of 8
//! hex digits: ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
//! devminor, rdevmajor, rdevminor, namesize (including the NUL) and check
//! (always 0) — followed by the NUL-terminated name padded to 4 bytes, then
//! the data padded to 4 bytes. The archive ends with an entry named
//! `TRAILER!!!`. See the kernel's `Documentation/driver-api/early-userspace/
//! buffer-format.rst` and `usr/gen_init_cpio.c`.
//!
//! Archives are reproducible: every entry is owned by uid/gid 0 with mtime
//! 0, and inode numbers are assigned sequentially from 1.
//!
//! **Parent directories.** The kernel's unpacker does not create missing
//! parents, so every entry method ([`CpioWriter::file`], [`CpioWriter::dir`])
//! first emits, once, a
//! directory entry (mode 0755) for each ancestor not yet in the archive.
//! [`parents`] exposes the same computation. An explicit [`CpioWriter::dir`]
//! for a directory already in the archive is skipped when the mode is the
//! same and re-emitted otherwise (the kernel then chmods the directory), so
//! `dir("tmp", 0o1777)` works whether or not `tmp` was implied before.
//!
//! Names are stored without a leading `/`; `.` components and repeated
//! slashes are dropped, and `..` components or NUL bytes are rejected with
//! [`io::ErrorKind::InvalidInput`].

use std::collections::HashMap;
use std::io::{self, Write};

/// Newc magic ("new ASCII", no checksum).
const MAGIC: &[u8; 6] = b"070701";
/// The name of the end-of-archive entry.
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
/// Permission bits, including setuid, setgid and sticky.
const PERM_MASK: u32 = 0o7777;
/// Mode of implied parent directories.
const PARENT_MODE: u32 = 0o755;

/// Writes a newc cpio archive to `W`. Call [`CpioWriter::finish`] to write
/// the trailer; dropping the writer without it leaves a truncated archive.
pub(crate) struct CpioWriter<W: Write> {
    w: W,
    /// Bytes written so far (for padding).
    offset: u64,
    /// Next inode number.
    next_ino: u32,
    /// Directories already in the archive, with their permission bits.
    dirs: HashMap<String, u32>,
}

/// The metadata of one header; uid, gid and mtime are always 0.
struct Header {
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(w: W) -> Self {
        CpioWriter {
            w,
            offset: 0,
            next_ino: 1,
            dirs: HashMap::new(),
        }
    }

    /// Adds directory `path` with permission bits `mode` (S_IFDIR is added).
    /// Missing parents are added with mode 0755. The root (`/` or empty)
    /// always exists and is skipped.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let name = normalize(path)?;
        if name.is_empty() {
            return Ok(());
        }
        let perm = mode & PERM_MASK;
        if self.dirs.get(&name) == Some(&perm) {
            return Ok(());
        }
        self.ensure_parents(&name)?;
        self.emit_dir(name, perm)
    }

    /// Adds regular file `path` with permission bits `mode` (S_IFREG is
    /// added) and contents `data`. Missing parents are added with mode 0755.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let name = normalize_entry(path)?;
        let filesize = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cpio: {name}: {} bytes exceed the newc limit of 4 GiB",
                    data.len()
                ),
            )
        })?;
        self.ensure_parents(&name)?;
        let header = Header {
            mode: S_IFREG | (mode & PERM_MASK),
            nlink: 1,
            filesize,
            rdevmajor: 0,
            rdevminor: 0,
        };
        self.entry(&name, &header, data)
    }

    /// Writes the trailer, flushes, and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        let header = Header {
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdevmajor: 0,
            rdevminor: 0,
        };
        self.write_header(0, TRAILER, &header)?;
        self.w.flush()?;
        Ok(self.w)
    }

    fn ensure_parents(&mut self, name: &str) -> io::Result<()> {
        for parent in parents(name) {
            if !self.dirs.contains_key(&parent) {
                self.emit_dir(parent, PARENT_MODE)?;
            }
        }
        Ok(())
    }

    fn emit_dir(&mut self, name: String, perm: u32) -> io::Result<()> {
        let header = Header {
            mode: S_IFDIR | perm,
            nlink: 2,
            filesize: 0,
            rdevmajor: 0,
            rdevminor: 0,
        };
        self.entry(&name, &header, &[])?;
        self.dirs.insert(name, perm);
        Ok(())
    }

    fn entry(&mut self, name: &str, header: &Header, data: &[u8]) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino = ino
            .checked_add(1)
            .ok_or_else(|| invalid("cpio: too many entries".to_string()))?;
        self.write_header(ino, name, header)?;
        self.write_all(data)?;
        self.pad()
    }

    fn write_header(&mut self, ino: u32, name: &str, h: &Header) -> io::Result<()> {
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            0, // mtime
            h.filesize,
            0, // devmajor
            0, // devminor
            h.rdevmajor,
            h.rdevminor,
            name.len() as u32 + 1, // namesize, including the NUL
            0,                     // check
        ];
        let mut buf = Vec::with_capacity(110 + name.len() + 4);
        buf.extend_from_slice(MAGIC);
        for f in fields {
            buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        self.write_all(&buf)?;
        self.pad()
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.w.write_all(data)?;
        self.offset += data.len() as u64;
        Ok(())
    }

    /// Pads with NULs to the next multiple of 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.write_all(&[0u8; 3][..n])
    }
}

/// The ancestors of `path`, outermost first, in archive form (no leading
/// `/`): `parents("/lib/modules/x.ko")` is `["lib", "lib/modules"]`. Invalid
/// paths (with `..` or NUL) give an empty list.
pub(crate) fn parents(path: &str) -> Vec<String> {
    let Ok(name) = normalize(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, b) in name.bytes().enumerate() {
        if b == b'/' {
            out.push(name[..i].to_string());
        }
    }
    out
}

/// Archive form of `path`: no leading `/`, no `.` or empty components.
fn normalize(path: &str) -> io::Result<String> {
    if path.contains('\0') {
        return Err(invalid(format!("cpio: path {path:?} contains NUL")));
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(invalid(format!("cpio: path {path:?} contains `..`"))),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Like [`normalize`], but the root is not a valid name for a non-directory.
fn normalize_entry(path: &str) -> io::Result<String> {
    let name = normalize(path)?;
    if name.is_empty() {
        return Err(invalid(format!("cpio: {path:?} is not a valid entry path")));
    }
    Ok(name)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::{Command, Stdio};

    fn in_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
    }

    fn hdr(fields: [u32; 13]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        for f in fields {
            v.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        v
    }

    #[test]
    fn exact_bytes_of_one_small_file() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/init", 0o755, b"hi\n").unwrap();
        let out = w.finish().unwrap();

        let mut want = hdr([1, 0o100755, 0, 0, 1, 0, 3, 0, 0, 0, 0, 5, 0]);
        assert_eq!(want.len(), 110);
        want.extend_from_slice(b"init\0"); // 115 bytes ...
        want.push(0); // ... padded to 116
        want.extend_from_slice(b"hi\n\0"); // 3 data bytes padded to 4
        want.extend_from_slice(&hdr([0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0]));
        want.extend_from_slice(b"TRAILER!!!\0"); // 121 bytes ...
        want.extend_from_slice(&[0, 0, 0]); // ... padded to 124
        assert_eq!(
            out,
            want,
            "\n got: {:?}\nwant: {:?}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&want)
        );
        assert_eq!(
            &out[..110],
            concat!(
                "070701", "00000001", "000081ED", "00000000", "00000000", "00000001", "00000000",
                "00000003", "00000000", "00000000", "00000000", "00000000", "00000005", "00000000",
            )
            .as_bytes()
        );
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn parents_and_normalization() {
        assert_eq!(parents("/lib/modules/x.ko"), ["lib", "lib/modules"]);
        assert_eq!(parents("init"), Vec::<String>::new());
        assert_eq!(parents("//a/./b//c"), ["a", "a/b"]);
        assert!(parents("a/../b").is_empty());
        let mut w = CpioWriter::new(Vec::new());
        assert_eq!(
            w.file("a/../b", 0o644, b"").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            w.file("/", 0o644, b"").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        w.dir("/", 0o755).unwrap(); // the root: nothing to write
        assert_eq!(w.finish().unwrap().len(), 124); // the trailer only
    }

    #[test]
    fn implied_parents_are_written_once() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a/b/one", 0o644, b"1").unwrap();
        w.file("a/b/two", 0o644, b"2").unwrap();
        w.dir("a", 0o755).unwrap(); // same mode: skipped
        w.dir("a/b", 0o700).unwrap(); // new mode: re-emitted
        let out = String::from_utf8_lossy(&w.finish().unwrap()).into_owned();
        assert_eq!(out.matches("a\0").count(), 1);
        assert_eq!(out.matches("a/b\0").count(), 2);
        assert_eq!(out.matches("070701").count(), 6); // a, a/b, one, two, a/b, trailer
    }

    /// Writes an archive and unpacks it with the system `cpio`.
    #[test]
    fn round_trip_through_system_cpio() {
        let cpio = Path::new("/usr/bin/cpio");
        if !cpio.exists() {
            if in_ci() {
                panic!("prerequisite missing in CI: /usr/bin/cpio (apt-get install cpio)");
            }
            eprintln!("SKIP: /usr/bin/cpio not installed (apt-get install cpio)");
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/tmp", 0o1777).unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\necho hello\n").unwrap();
        w.file("/etc/mkt/empty", 0o600, b"").unwrap();
        w.file(
            "/lib/modules/6.1.0/kernel/x.ko",
            0o644,
            &[0u8, 1, 2, 3, 4, 255],
        )
        .unwrap();
        w.dir("/etc", 0o700).unwrap();
        let archive = w.finish().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(cpio)
            .args(["-idv", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "cpio failed: {stderr}");
        assert!(!stderr.contains("warning"), "cpio warned: {stderr}");

        let root = dir.path();
        let mode = |p: &str| {
            std::fs::symlink_metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(
            std::fs::read(root.join("init")).unwrap(),
            b"#!/bin/sh\necho hello\n"
        );
        assert_eq!(mode("init"), 0o100755);
        assert_eq!(std::fs::read(root.join("etc/mkt/empty")).unwrap(), b"");
        assert_eq!(mode("etc/mkt/empty"), 0o100600);
        assert_eq!(
            std::fs::read(root.join("lib/modules/6.1.0/kernel/x.ko")).unwrap(),
            [0u8, 1, 2, 3, 4, 255]
        );
        assert_eq!(mode("lib/modules/6.1.0/kernel/x.ko"), 0o100644);
        assert_eq!(mode("tmp"), 0o41777);
        assert_eq!(mode("etc"), 0o40700);
        assert_eq!(mode("lib/modules"), 0o40755);
    }
}
