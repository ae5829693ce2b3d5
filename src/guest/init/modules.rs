//! Kernel modules: those packed in the initramfs at boot, and the guest
//! side of `mkt modules-reload`.

use crate::sys::{c, log, nr, syscall};
use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Loads the modules packed into the initramfs, in /modules/order order.
pub fn load_modules() {
    let Ok(order) = fs::read_to_string("/modules/order") else {
        return;
    };
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = format!("/modules/{name}");
        let Ok(f) = File::open(&path) else {
            log(&format!("missing module {path}"));
            continue;
        };
        if let Err(e) = load(&f)
            && e.raw_os_error() != Some(17)
        {
            log(&format!("loading {name}: {e}"));
        }
    }
}

/// finit_module(2) of an open .ko, without parameters.
fn load(f: &File) -> io::Result<()> {
    let empty = c("");
    // SAFETY: finit_module reads the open fd and the empty params string.
    match unsafe { syscall(nr::FINIT_MODULE, f.as_raw_fd(), empty.as_ptr(), 0) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Where the boot-time size/mtime of every tree module is recorded.
pub const MODULES_BOOT: &str = "/etc/mkt/modules.boot";

/// (size, mtime seconds, mtime nanoseconds) of a .ko.
pub type Stamp = (u64, i64, i64);

/// The [`Stamp`] of what `path` points to.
pub fn stamp(path: &str) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ok()?;
    Some((m.size(), m.mtime(), m.mtime_nsec()))
}

pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

/// The modules that depend on `m` (they must go first when it is unloaded).
pub fn holders(m: &str) -> Vec<String> {
    fs::read_dir(format!("/sys/module/{m}/holders"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Post-order: every holder of `m` (as `holders` tells) before `m` itself.
pub fn unload_order(m: &str, holders: &dyn Fn(&str) -> Vec<String>, out: &mut Vec<String>) {
    if out.iter().any(|x| x == m) {
        return;
    }
    for h in holders(m) {
        unload_order(&h, holders, out);
    }
    if !out.iter().any(|x| x == m) {
        out.push(m.to_string());
    }
}

/// The record of tree modules against the tree now.
pub struct Scan {
    /// The record's lines, with today's stamps (written once reloaded).
    pub records: Vec<String>,
    /// The modules whose .ko changed (with `all`, every one).
    pub changed: Vec<String>,
    /// Module name to .ko path.
    pub paths: std::collections::HashMap<String, String>,
}

/// Reads the record (`path\tsize\tmtime\tnsec` lines), comparing each
/// module's stamp with `stamp`'s (None: the .ko is gone, not changed).
pub fn scan(text: &str, all: bool, stamp: &dyn Fn(&str) -> Option<Stamp>) -> Scan {
    let mut s = Scan {
        records: Vec::new(),
        changed: Vec::new(),
        paths: Default::default(),
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 4 {
            continue;
        }
        let now = stamp(f[0]);
        let then = (f[1].parse().ok(), f[2].parse().ok(), f[3].parse().ok());
        let name = module_name(f[0]);
        s.paths.insert(name.clone(), f[0].to_string());
        let differs = match now {
            Some((a, b, c)) => (Some(a), Some(b), Some(c)) != then,
            None => false,
        };
        if differs || all {
            s.changed.push(name);
        }
        let fresh = now.map_or(line.to_string(), |(a, b, c)| {
            format!("{}\t{a}\t{b}\t{c}", f[0])
        });
        s.records.push(fresh);
    }
    s
}

/// `mkt modules-reload [--all]` in the guest: reload, in dependency order,
/// the loaded modules whose .ko changed in the build tree since boot (or
/// since the last reload); with --all, every loaded module of the tree.
pub fn modules_reload(args: &[String]) -> i32 {
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
        eprintln!(
            "mkt: {MODULES_BOOT} missing: this guest was not booted from a kernel tree by mkt"
        );
        return 1;
    };
    let Scan {
        records,
        changed,
        paths,
    } = scan(&text, all, &stamp);
    let loaded: Vec<String> = fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').next().map(str::to_string))
        .collect();
    let (to_reload, not_loaded): (Vec<String>, Vec<String>) =
        changed.into_iter().partition(|m| loaded.contains(m));
    if !not_loaded.is_empty() && !all {
        println!(
            "changed, not loaded (modprobe will load the new one): {}",
            not_loaded.join(" ")
        );
    }
    if to_reload.is_empty() {
        println!("no modules changed");
        return 0;
    }
    let mut order = Vec::new();
    for m in &to_reload {
        unload_order(m, &holders, &mut order);
    }
    // A module in use stops the unloading; those already unloaded are
    // loaded again below, so a refused reload leaves the guest as it was.
    let mut unloaded = Vec::new();
    let mut failed = false;
    for m in &order {
        let name = c(m);
        // SAFETY: name is a valid C string; O_NONBLOCK (2048) fails when busy.
        if unsafe { syscall(nr::DELETE_MODULE, name.as_ptr(), 2048) } != 0 {
            let e = io::Error::last_os_error();
            // EAGAIN (O_NONBLOCK) or EBUSY: something holds it.
            let why = if matches!(e.raw_os_error(), Some(11 | 16)) {
                " (in use)"
            } else {
                ""
            };
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
        match File::open(path).and_then(|f| load(&f)) {
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
    let text: String = records.iter().map(|l| format!("{l}\n")).collect();
    let _ = fs::write(MODULES_BOOT, text);
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn module_names_are_the_kernels() {
        assert_eq!(module_name("/home/dev/linux/drivers/net/dummy.ko"), "dummy");
        assert_eq!(
            module_name("/lib/modules/6.1/snd-hda-intel.ko.xz"),
            "snd_hda_intel"
        );
        assert_eq!(module_name("rxe.ko"), "rxe");
    }

    #[test]
    fn changed_stamps_are_found_and_refreshed() {
        let text = "/t/a.ko\t10\t100\t5\n/t/b-c.ko\t20\t200\t0\n/t/gone.ko\t1\t1\t1\nbroken line\n";
        let now: HashMap<&str, Stamp> =
            [("/t/a.ko", (10, 100, 5)), ("/t/b-c.ko", (21, 300, 7))].into();
        let stamp = |p: &str| now.get(p).copied();
        let s = scan(text, false, &stamp);
        assert_eq!(s.changed, ["b_c"]);
        assert_eq!(
            s.records,
            [
                "/t/a.ko\t10\t100\t5",
                "/t/b-c.ko\t21\t300\t7",
                "/t/gone.ko\t1\t1\t1"
            ]
        );
        assert_eq!(s.paths["b_c"], "/t/b-c.ko");
        assert_eq!(s.paths.len(), 3);
        // --all: every recorded module, even unchanged or gone.
        assert_eq!(scan(text, true, &stamp).changed, ["a", "b_c", "gone"]);
        // A record that is not a number counts as changed.
        assert_eq!(scan("/t/a.ko\tx\t100\t5\n", false, &stamp).changed, ["a"]);
    }

    #[test]
    fn holders_are_unloaded_before_what_they_hold() {
        let deps: HashMap<&str, Vec<String>> = [
            ("ib_core", vec!["rdma_rxe".into(), "ib_uverbs".into()]),
            ("ib_uverbs", vec!["rdma_rxe".into()]),
        ]
        .into();
        let holders = |m: &str| deps.get(m).cloned().unwrap_or_default();
        let mut order = Vec::new();
        unload_order("ib_core", &holders, &mut order);
        assert_eq!(order, ["rdma_rxe", "ib_uverbs", "ib_core"]);
        // Already listed ones are not listed twice.
        unload_order("ib_uverbs", &holders, &mut order);
        unload_order("dummy", &holders, &mut order);
        assert_eq!(order, ["rdma_rxe", "ib_uverbs", "ib_core", "dummy"]);
    }
}
