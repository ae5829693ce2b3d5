//! Layer-building and inspection helpers shared by the unpacker's tests.

use super::{Unpacker, XATTR_GID, XATTR_MODE, XATTR_RDEV, XATTR_UID};
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use tar::EntryType as T;

/// The cancel flag of an unpack nobody interrupts.
pub(super) static NO: AtomicBool = AtomicBool::new(false);

/// A ustar header (it has device numbers) of `kind` named `name` (copied as
/// is, so `./` and `.wh..` stay), with `mode`, owner 0:0 and time
/// 1_000_000; [`add`] sets its size and checksum.
pub(super) fn header(kind: T, name: &str, mode: u32) -> tar::Header {
    owned(kind, name, mode, 0, 0)
}

/// A [`header`] owned by `uid`:`gid`.
pub(super) fn owned(kind: T, name: &str, mode: u32, uid: u64, gid: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_000_000);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h
}

/// A device's [`header`], group `gid`, device number `major`:`minor`.
pub(super) fn device(
    kind: T,
    name: &str,
    mode: u32,
    gid: u64,
    major: u32,
    minor: u32,
) -> tar::Header {
    let mut h = owned(kind, name, mode, 0, gid);
    h.set_device_major(major).unwrap();
    h.set_device_minor(minor).unwrap();
    h
}

/// A symlink's or hardlink's [`header`] (mode 0777) pointing at `target`.
pub(super) fn link(kind: T, name: &str, target: &str) -> tar::Header {
    let mut h = header(kind, name, 0o777);
    h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
    h
}

/// Appends `h` with `data` (its size), after PAX records `pax` when there
/// are any.
pub(super) fn add(
    b: &mut tar::Builder<Vec<u8>>,
    mut h: tar::Header,
    data: &[u8],
    pax: &[(&str, &[u8])],
) {
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().copied()).unwrap();
    }
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// A tar stream of the headers with their content.
pub(super) fn pack(entries: Vec<(tar::Header, &[u8])>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (h, data) in entries {
        add(&mut b, h, data, &[]);
    }
    b.into_inner().unwrap()
}

/// Unpacks `layer` as the layer `sha256:t`; the error as its message.
pub(super) fn unpack(u: &mut Unpacker, layer: &[u8]) -> Result<(), String> {
    u.unpack_tar(layer, "sha256:t", &NO)
        .map_err(|e| e.to_string())
}

/// The value of xattr `name` of `path` (not following it).
pub(super) fn getx(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: NUL-terminated strings and a buffer of buf.len() bytes.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

/// [`getx`] as a u32 (little-endian, exactly 4 bytes).
pub(super) fn getx32(path: &Path, name: &str) -> Option<u32> {
    getx(path, name).map(|v| u32::from_le_bytes(v.try_into().unwrap()))
}

/// [`getx`] as a u64 (little-endian, exactly 8 bytes).
pub(super) fn getx64(path: &Path, name: &str) -> Option<u64> {
    getx(path, name).map(|v| u64::from_le_bytes(v.try_into().unwrap()))
}

/// (uid, gid, mode) recorded in QEMU's xattrs, and rdev if any.
pub(super) fn record(path: &Path) -> (Option<u32>, Option<u32>, Option<u32>, Option<u64>) {
    (
        getx32(path, XATTR_UID),
        getx32(path, XATTR_GID),
        getx32(path, XATTR_MODE),
        getx64(path, XATTR_RDEV),
    )
}

/// The permission bits of `path` (not following it), setuid and all.
pub(super) fn perms(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// The modification time of `path` (not following it).
pub(super) fn mtime_of(path: &Path) -> i64 {
    std::fs::symlink_metadata(path).unwrap().mtime()
}

/// A gzip layer blob of `files` (name, size) of zeros, in `dir`;
/// returns its path and digest.
pub(super) fn zero_layer(dir: &Path, files: &[(&str, usize)]) -> (PathBuf, String) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, size) in files {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_mode(0o644);
        h.set_size(*size as u64);
        h.set_cksum();
        b.append(&h, io::repeat(0).take(*size as u64)).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    let blob = gz.finish().unwrap();
    let digest = crate::oci::sha256_digest(&blob);
    let path = dir.join(&digest[7..]);
    std::fs::write(&path, blob).unwrap();
    (path, digest)
}

/// Runs `f` on a thread whose effective capabilities lack `mask`.
pub(super) fn without_caps<T: Send>(mask: u32, f: impl FnOnce() -> T + Send) -> T {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut h = Header {
                version: 0x2008_0522,
                pid: 0,
            };
            let mut data = [Data::default(); 2];
            // SAFETY: a v3 header and two data structs, for this thread.
            let r = unsafe { libc::syscall(libc::SYS_capget, &raw mut h, data.as_mut_ptr()) };
            assert_eq!(r, 0);
            data[0].effective &= !mask;
            // SAFETY: as above.
            let r = unsafe { libc::syscall(libc::SYS_capset, &raw mut h, data.as_ptr()) };
            assert_eq!(r, 0);
            f()
        })
        .join()
        .unwrap()
    })
}
