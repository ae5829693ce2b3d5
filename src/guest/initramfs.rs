//! The initramfs mkt boots every guest with: its own static init as /init,
//! the mount points it uses, and (for distro kernels) the modules it must
//! load before it can mount the shared root.

use super::Generated;
use super::cpio::CpioWriter;
use std::io;

/// mkt's guest init, a static binary built by build.rs from src/guest/init/.
pub(crate) const INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mkt-init"));

/// A module to load at boot: file name in /modules and its raw .ko bytes.
pub struct BootModule {
    pub name: String,
    pub data: Vec<u8>,
}

/// The initramfs as bytes (uncompressed newc cpio: nothing to inflate, and
/// the kernel reads it straight from memory). The run's generated files go
/// in /mkt, so the init needs no share to find its plan.
pub fn build(files: &Generated, modules: &[BootModule]) -> io::Result<Vec<u8>> {
    let mut w = CpioWriter::new(Vec::with_capacity(INIT.len() + 4096));
    for d in [
        "dev", "proc", "sys", "mkt", "lower", "rw", "newroot", "modules",
    ] {
        w.dir(d, 0o755)?;
    }
    w.file("init", 0o755, INIT)?;
    for f in &files.files {
        w.file(&format!("mkt/{}", f.name), f.mode, &f.content)?;
    }
    let mut order = String::new();
    for m in modules {
        w.file(&format!("modules/{}", m.name), 0o644, &m.data)?;
        order.push_str(&m.name);
        order.push('\n');
    }
    w.file("modules/order", 0o644, order.as_bytes())?;
    w.finish()
}
