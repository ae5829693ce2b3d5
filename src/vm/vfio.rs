//! VFIO PCI passthrough (`--pci BDF`, config `pci`/`nested_pci`): checks a
//! host device can be handed to a guest, binds it to vfio-pci through sysfs,
//! and gives it back to its driver when the run ends.
//!
//! Every path goes through [`Sysfs`], whose root is `/` on a real host and a
//! directory the tests build otherwise (same layout: `sys/bus/pci/...`,
//! `sys/kernel/iommu_groups/...`, `dev/vfio/...`), so the tests run the same
//! code that writes the real sysfs.
//!
//! A run records the original drivers in `vfio.json` in its run directory
//! before it changes anything; if mkt dies before restoring them, the next
//! mkt's sweep of stale run directories ([`recover`]) does it.

use crate::config::PciAddr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The driver devices are bound to for passthrough.
pub(crate) const VFIO_DRIVER: &str = "vfio-pci";

/// Drivers that do not stop the kernel from handing an IOMMU group to VFIO
/// (the kernel's own list: stub drivers and PCIe port drivers of bridges).
const GROUP_SAFE_DRIVERS: &[&str] = &[VFIO_DRIVER, "pci-stub", "pcieport"];

/// The name of the state file in a run directory.
pub(crate) const STATE_FILE: &str = "vfio.json";

/// Called after each write, with the root and the written file: tests use it
/// to play the kernel's part (moving `driver` links) in a fake tree.
pub(crate) type WriteHook = fn(root: &Path, file: &Path, value: &str);

/// Where sysfs (`<root>/sys`) and device nodes (`<root>/dev`) are.
#[derive(Debug, Clone)]
pub struct Sysfs {
    pub root: PathBuf,
    pub hook: Option<WriteHook>,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::new("/")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("PCI device {0} does not exist on this host ({1} is missing; see lspci -D)")]
    NoDevice(String, PathBuf),
    #[error(
        "the host has no IOMMU enabled ({0} is empty), so no device can be passed through: \
         enable VT-d/AMD-Vi in the firmware and add `{1}` to the host kernel's command line"
    )]
    NoIommu(PathBuf, &'static str),
    #[error("PCI device {0} is in no IOMMU group ({1} is missing)")]
    NoGroup(String, PathBuf),
    #[error(
        "cannot pass {dev} through: {blocker}, in the same IOMMU group {group}, is bound to \
         {driver}; every device of the group must be bound to vfio-pci or to no driver \
         (unbind {blocker}, or pass it too with --pci {blocker})"
    )]
    GroupBusy {
        dev: String,
        group: String,
        blocker: String,
        driver: String,
    },
    #[error("VFIO passthrough of {dev} needs {missing}: {why}")]
    Privilege {
        dev: String,
        missing: String,
        why: String,
    },
    #[error("the vfio-pci driver is not loaded ({0} is missing): run `modprobe vfio-pci`")]
    NoVfioDriver(PathBuf),
    #[error("cannot write {value:?} to {}", .path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("{dev} is bound to {} after binding, not vfio-pci", .driver.as_deref().unwrap_or("no driver"))]
    NotBound { dev: String, driver: Option<String> },
    #[error("cannot save or read the VFIO state file {}", .0.display())]
    State(PathBuf, #[source] io::Error),
}

/// A device checked for passthrough.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub bdf: String,
    pub group: String,
    /// The driver it was bound to before mkt touched it.
    pub driver: Option<String>,
}

/// What a run changed, as saved in its run directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub root: PathBuf,
    pub devices: Vec<Device>,
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs {
            root: root.into(),
            hook: None,
        }
    }

    pub fn sys(&self, rel: &str) -> PathBuf {
        self.root.join("sys").join(rel)
    }

    fn dev_dir(&self, bdf: &str) -> PathBuf {
        self.sys("bus/pci/devices").join(bdf)
    }

    fn link_name(path: &Path) -> Option<String> {
        let target = fs::read_link(path).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// The driver `bdf` is bound to now.
    pub fn driver(&self, bdf: &str) -> Option<String> {
        Self::link_name(&self.dev_dir(bdf).join("driver"))
    }

    pub fn iommu_group(&self, bdf: &str) -> Option<String> {
        Self::link_name(&self.dev_dir(bdf).join("iommu_group"))
    }

    /// The devices of IOMMU group `group`, sorted.
    pub fn group_devices(&self, group: &str) -> Vec<String> {
        let dir = self.sys("kernel/iommu_groups").join(group).join("devices");
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// `vendor:device` of `bdf` as sysfs shows them (`0x15b3`, `0x1017`).
    pub fn ids(&self, bdf: &str) -> Option<(String, String)> {
        let read = |f: &str| {
            fs::read_to_string(self.dev_dir(bdf).join(f))
                .ok()
                .map(|s| s.trim().to_string())
        };
        Some((read("vendor")?, read("device")?))
    }

    /// The kernel parameters that turn the IOMMU on for this host's CPU.
    pub fn iommu_param(&self) -> &'static str {
        let cpuinfo = fs::read_to_string(self.root.join("proc/cpuinfo")).unwrap_or_default();
        if cpuinfo.contains("AuthenticAMD") {
            "amd_iommu=on iommu=pt"
        } else if cpuinfo.contains("GenuineIntel") {
            "intel_iommu=on iommu=pt"
        } else {
            "intel_iommu=on (Intel) or amd_iommu=on (AMD), and iommu=pt,"
        }
    }

    /// Validates `addrs` for passthrough: present, in an IOMMU
    /// group whose other devices are free. Reads only.
    pub fn check(&self, addrs: &[PciAddr]) -> Result<Vec<Device>, VfioError> {
        let mut bdfs = Vec::new();
        for a in addrs {
            let bdf = a.to_string();
            if !self.dev_dir(&bdf).exists() {
                return Err(VfioError::NoDevice(bdf.clone(), self.dev_dir(&bdf)));
            }
            if !bdfs.contains(&bdf) {
                bdfs.push(bdf);
            }
        }
        if bdfs.is_empty() {
            return Ok(Vec::new());
        }
        let groups = self.sys("kernel/iommu_groups");
        let any_group = fs::read_dir(&groups).is_ok_and(|mut d| d.next().is_some());
        if !any_group {
            return Err(VfioError::NoIommu(groups, self.iommu_param()));
        }
        let passed: BTreeSet<&str> = bdfs.iter().map(String::as_str).collect();
        let mut out = Vec::new();
        for bdf in &bdfs {
            let group = self.iommu_group(bdf).ok_or_else(|| {
                VfioError::NoGroup(bdf.clone(), self.dev_dir(bdf).join("iommu_group"))
            })?;
            for other in self.group_devices(&group) {
                if passed.contains(other.as_str()) {
                    continue;
                }
                if let Some(d) = self.driver(&other)
                    && !GROUP_SAFE_DRIVERS.contains(&d.as_str())
                {
                    return Err(VfioError::GroupBusy {
                        dev: bdf.clone(),
                        group,
                        blocker: other,
                        driver: d,
                    });
                }
            }
            out.push(Device {
                bdf: bdf.clone(),
                group,
                driver: self.driver(bdf),
            });
        }
        Ok(out)
    }

    /// Says, before anything is changed, which privilege a bind lacks:
    /// rebinding needs write access to sysfs (root); QEMU needs read-write
    /// access to /dev/vfio/vfio. Devices already on vfio-pci need no sysfs
    /// writes, so a user with /dev/vfio access can pass those alone.
    pub fn check_privilege(&self, devices: &[Device]) -> Result<(), VfioError> {
        for d in devices {
            if d.driver.as_deref() == Some(VFIO_DRIVER) {
                continue;
            }
            for f in [
                self.sys("bus/pci/drivers_probe"),
                self.dev_dir(&d.bdf).join("driver_override"),
            ] {
                if !writable(&f) {
                    return Err(VfioError::Privilege {
                        dev: d.bdf.clone(),
                        missing: "root (write access to sysfs)".into(),
                        why: format!(
                            "cannot write {} to rebind it from {} to vfio-pci; run mkt as root, \
                             or bind it to vfio-pci beforehand (then only /dev/vfio access is needed)",
                            f.display(),
                            d.driver.as_deref().unwrap_or("no driver")
                        ),
                    });
                }
            }
            let vfio = self.sys("bus/pci/drivers").join(VFIO_DRIVER);
            if !vfio.is_dir() {
                return Err(VfioError::NoVfioDriver(vfio));
            }
        }
        if let Some(d) = devices.first() {
            let node = self.root.join("dev/vfio/vfio");
            if !rw(&node) {
                return Err(VfioError::Privilege {
                    dev: d.bdf.clone(),
                    missing: format!("read-write access to {}", node.display()),
                    why: "QEMU opens it to set up the device's DMA mappings; run mkt as root or \
                          grant your user access to /dev/vfio (a udev rule or group)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), VfioError> {
        // No create: like sysfs, a missing attribute is an error. (sysfs
        // ignores the truncation; a fake tree needs it.)
        let r = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| f.write_all(value.as_bytes()));
        r.map_err(|source| VfioError::Write {
            path: path.to_path_buf(),
            value: value.trim().to_string(),
            source,
        })?;
        if let Some(hook) = self.hook {
            hook(&self.root, path, value);
        }
        Ok(())
    }

    /// Binds `devices` to vfio-pci, saving their drivers in `state_file`
    /// first. The returned [`Binding`] restores them when dropped.
    pub fn bind(&self, devices: &[Device], state_file: &Path) -> Result<Binding, VfioError> {
        let state = State {
            root: self.root.clone(),
            devices: devices.to_vec(),
        };
        save_state(state_file, &state)?;
        // From here on, whatever fails, the drop restores what was done.
        let binding = Binding {
            sysfs: self.clone(),
            state,
            state_file: state_file.to_path_buf(),
        };
        for d in devices {
            if d.driver.as_deref() == Some(VFIO_DRIVER) {
                continue;
            }
            if let Some(drv) = &d.driver {
                self.write(
                    &self.sys("bus/pci/drivers").join(drv).join("unbind"),
                    &d.bdf,
                )?;
            }
            self.write(&self.dev_dir(&d.bdf).join("driver_override"), VFIO_DRIVER)?;
            self.write(&self.sys("bus/pci/drivers_probe"), &d.bdf)?;
        }
        for d in devices {
            let now = self.driver(&d.bdf);
            if now.as_deref() != Some(VFIO_DRIVER) {
                return Err(VfioError::NotBound {
                    dev: d.bdf.clone(),
                    driver: now,
                });
            }
            let node = self.root.join("dev/vfio").join(&d.group);
            if !rw(&node) {
                return Err(VfioError::Privilege {
                    dev: d.bdf.clone(),
                    missing: format!("read-write access to {}", node.display()),
                    why: "QEMU opens the group's device node".into(),
                });
            }
        }
        Ok(binding)
    }

    /// Gives `d` back to the driver it had; safe to repeat.
    pub fn restore(&self, d: &Device) -> Result<(), VfioError> {
        if d.driver.as_deref() == Some(VFIO_DRIVER) {
            return Ok(());
        }
        let now = self.driver(&d.bdf);
        if let Some(cur) = &now
            && Some(cur) != d.driver.as_ref()
        {
            self.write(
                &self.sys("bus/pci/drivers").join(cur).join("unbind"),
                &d.bdf,
            )?;
        }
        // A newline clears the override, so the usual driver matches again.
        self.write(&self.dev_dir(&d.bdf).join("driver_override"), "\n")?;
        if let Some(orig) = &d.driver
            && now.as_ref() != Some(orig)
        {
            self.write(&self.sys("bus/pci/drivers").join(orig).join("bind"), &d.bdf)?;
        }
        Ok(())
    }
}

fn access(path: &Path, mode: nix::unistd::AccessFlags) -> bool {
    nix::unistd::access(path, mode).is_ok()
}

fn writable(path: &Path) -> bool {
    access(path, nix::unistd::AccessFlags::W_OK)
}

fn rw(path: &Path) -> bool {
    access(
        path,
        nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
    )
}

fn save_state(path: &Path, state: &State) -> Result<(), VfioError> {
    let text =
        serde_json::to_vec_pretty(state).map_err(|e| VfioError::State(path.into(), e.into()))?;
    fs::write(path, text).map_err(|e| VfioError::State(path.into(), e))
}

/// Devices bound for one run; restored when dropped (normal end, error,
/// signal). After kill -9, [`recover`] does it on the next run.
#[derive(Debug)]
pub struct Binding {
    sysfs: Sysfs,
    state: State,
    state_file: PathBuf,
}

impl Binding {
    pub fn devices(&self) -> &[Device] {
        &self.state.devices
    }

    /// Restores every device; the state file goes only when all succeeded.
    pub fn restore(&self) -> Result<(), VfioError> {
        let mut first_err = None;
        for d in &self.state.devices {
            if let Err(e) = self.sysfs.restore(d) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => {
                let _ = fs::remove_file(&self.state_file);
                Ok(())
            }
        }
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!(
                "mkt: warning: could not give a passed-through device back to its driver: {e} \
                 (the next mkt run retries; state in {})",
                self.state_file.display()
            );
        }
    }
}

/// Restores the bindings a dead run left in `run_dir` (no-op without a
/// state file). `hook` is the fake kernel of tests.
pub(crate) fn recover(run_dir: &Path, hook: Option<WriteHook>) -> Result<(), VfioError> {
    let path = run_dir.join(STATE_FILE);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(VfioError::State(path, e)),
    };
    let state: State = serde_json::from_slice(&text)
        .map_err(|e| VfioError::State(path.clone(), io::Error::other(e)))?;
    let binding = Binding {
        sysfs: Sysfs {
            root: state.root.clone(),
            hook,
        },
        state,
        state_file: path,
    };
    let r = binding.restore();
    // Restored (or reported) here: the drop must not try again.
    std::mem::forget(binding);
    r
}

#[cfg(test)]
pub mod fake {
    //! A fake sysfs tree and a fake kernel reacting to writes into it.
    use super::*;
    use std::os::unix::fs::symlink;

    pub struct Tree {
        pub dir: tempfile::TempDir,
    }

    impl Default for Tree {
        fn default() -> Self {
            Tree::new()
        }
    }

    impl Tree {
        pub fn new() -> Tree {
            let t = Tree {
                dir: tempfile::tempdir().unwrap(),
            };
            for d in ["sys/bus/pci/devices", "sys/kernel/iommu_groups", "dev/vfio"] {
                fs::create_dir_all(t.root().join(d)).unwrap();
            }
            fs::write(t.root().join("sys/bus/pci/drivers_probe"), "").unwrap();
            fs::write(t.root().join("dev/vfio/vfio"), "").unwrap();
            t.driver(VFIO_DRIVER);
            t
        }

        pub fn root(&self) -> &Path {
            self.dir.path()
        }

        pub fn sysfs(&self) -> Sysfs {
            Sysfs {
                root: self.root().to_path_buf(),
                hook: Some(kernel),
            }
        }

        pub fn driver(&self, name: &str) {
            let d = self.root().join("sys/bus/pci/drivers").join(name);
            fs::create_dir_all(&d).unwrap();
            for f in ["bind", "unbind"] {
                fs::write(d.join(f), "").unwrap();
            }
        }

        /// A device in `group`, bound to `driver`.
        pub fn device(&self, bdf: &str, group: &str, driver: Option<&str>) {
            let d = self.root().join("sys/bus/pci/devices").join(bdf);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("driver_override"), "(null)\n").unwrap();
            fs::write(d.join("vendor"), "0x15b3\n").unwrap();
            fs::write(d.join("device"), "0x1017\n").unwrap();
            let g = self.root().join("sys/kernel/iommu_groups").join(group);
            fs::create_dir_all(g.join("devices")).unwrap();
            symlink(
                format!("../../../kernel/iommu_groups/{group}"),
                d.join("iommu_group"),
            )
            .unwrap();
            symlink(
                format!("../../../../bus/pci/devices/{bdf}"),
                g.join("devices").join(bdf),
            )
            .unwrap();
            if let Some(drv) = driver {
                self.driver(drv);
                symlink(format!("../../../bus/pci/drivers/{drv}"), d.join("driver")).unwrap();
            }
        }
    }

    /// What the kernel does on these writes, as far as mkt can observe.
    pub fn kernel(root: &Path, file: &Path, value: &str) {
        let sys = root.join("sys");
        let rel = file
            .strip_prefix(&sys)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let bdf = value.trim();
        let dev = sys.join("bus/pci/devices").join(bdf);
        let bind_to = |drv: &str| {
            let _ = fs::remove_file(dev.join("driver"));
            symlink(
                format!("../../../bus/pci/drivers/{drv}"),
                dev.join("driver"),
            )
            .unwrap();
            if drv == VFIO_DRIVER {
                let g = fs::read_link(dev.join("iommu_group")).unwrap();
                let node = root.join("dev/vfio").join(g.file_name().unwrap());
                fs::write(node, "").unwrap();
            }
        };
        if rel == "bus/pci/drivers_probe" {
            let ov = fs::read_to_string(dev.join("driver_override")).unwrap();
            let ov = ov.trim();
            if ov != "(null)" && !ov.is_empty() && sys.join("bus/pci/drivers").join(ov).is_dir() {
                bind_to(ov);
            }
        } else if let Some(rest) = rel.strip_prefix("bus/pci/drivers/") {
            let (drv, op) = rest.split_once('/').unwrap();
            match op {
                "unbind" => fs::remove_file(dev.join("driver")).unwrap(),
                "bind" => bind_to(drv),
                _ => {}
            }
        } else if rel.ends_with("/driver_override") && value.trim().is_empty() {
            fs::write(file, "(null)\n").unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::Tree;
    use super::*;

    fn bdfs(a: &[&str]) -> Vec<PciAddr> {
        a.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn missing_devices_are_named() {
        let t = Tree::new();
        let s = t.sysfs();
        let e = s.check(&bdfs(&["05:00.0"])).unwrap_err().to_string();
        assert!(e.contains("0000:05:00.0 does not exist"), "{e}");
    }

    #[test]
    fn no_iommu_names_the_kernel_parameter() {
        let t = Tree::new();
        let d = t.root().join("sys/bus/pci/devices/0000:05:00.0");
        fs::create_dir_all(&d).unwrap();
        fs::create_dir_all(t.root().join("proc")).unwrap();
        for (cpu, want) in [
            ("vendor_id\t: GenuineIntel\n", "intel_iommu=on iommu=pt"),
            ("vendor_id\t: AuthenticAMD\n", "amd_iommu=on iommu=pt"),
        ] {
            fs::write(t.root().join("proc/cpuinfo"), cpu).unwrap();
            let e = t.sysfs().check(&bdfs(&["05:00.0"])).unwrap_err();
            assert!(matches!(e, VfioError::NoIommu(..)), "{e:?}");
            let e = e.to_string();
            assert!(e.contains("no IOMMU enabled") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn group_check_names_the_blocking_device_and_driver() {
        let t = Tree::new();
        t.device("0000:05:00.0", "7", Some("mlx5_core"));
        t.device("0000:05:00.1", "7", Some("mlx5_core"));
        t.device("0000:00:1c.0", "7", Some("pcieport"));
        let s = t.sysfs();
        let e = s.check(&bdfs(&["05:00.0"])).unwrap_err();
        match &e {
            VfioError::GroupBusy {
                dev,
                group,
                blocker,
                driver,
            } => {
                assert_eq!(
                    (
                        dev.as_str(),
                        group.as_str(),
                        blocker.as_str(),
                        driver.as_str()
                    ),
                    ("0000:05:00.0", "7", "0000:05:00.1", "mlx5_core")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string()
                .contains("pass it too with --pci 0000:05:00.1")
        );
        // Passing the whole group (the bridge on pcieport is fine) works.
        let devs = s.check(&bdfs(&["05:00.0", "0000:05:00.1"])).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].driver.as_deref(), Some("mlx5_core"));
        assert_eq!(devs[0].group, "7");
    }

    #[test]
    fn bind_then_restore_on_drop() {
        let t = Tree::new();
        t.device("0000:05:00.0", "3", Some("mlx5_core"));
        t.device("0000:06:00.0", "4", None);
        let s = t.sysfs();
        let devs = s.check(&bdfs(&["05:00.0", "06:00.0"])).unwrap();
        s.check_privilege(&devs).unwrap();
        let run = tempfile::tempdir().unwrap();
        let state = run.path().join(STATE_FILE);
        let b = s.bind(&devs, &state).unwrap();
        // What QEMU is given: the devices as checked, original drivers kept.
        assert_eq!(b.devices(), &devs[..]);
        assert_eq!(s.driver("0000:05:00.0").as_deref(), Some(VFIO_DRIVER));
        assert_eq!(s.driver("0000:06:00.0").as_deref(), Some(VFIO_DRIVER));
        let dev = t.root().join("sys/bus/pci/devices/0000:05:00.0");
        assert_eq!(
            fs::read_to_string(dev.join("driver_override")).unwrap(),
            VFIO_DRIVER
        );
        let saved: State = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
        assert_eq!(saved.devices, devs);
        drop(b);
        assert_eq!(s.driver("0000:05:00.0").as_deref(), Some("mlx5_core"));
        assert_eq!(s.driver("0000:06:00.0"), None);
        assert_eq!(
            fs::read_to_string(dev.join("driver_override")).unwrap(),
            "(null)\n"
        );
        assert!(!state.exists());
    }

    #[test]
    fn a_crashed_runs_bindings_are_restored_by_recover() {
        let t = Tree::new();
        t.device("0000:05:00.0", "3", Some("ixgbe"));
        let s = t.sysfs();
        let devs = s.check(&bdfs(&["05:00.0"])).unwrap();
        let run = tempfile::tempdir().unwrap();
        let b = s.bind(&devs, &run.path().join(STATE_FILE)).unwrap();
        // kill -9: no drop.
        std::mem::forget(b);
        assert_eq!(s.driver("0000:05:00.0").as_deref(), Some(VFIO_DRIVER));
        recover(run.path(), Some(fake::kernel)).unwrap();
        assert_eq!(s.driver("0000:05:00.0").as_deref(), Some("ixgbe"));
        assert!(!run.path().join(STATE_FILE).exists());
        // Nothing to do the second time.
        recover(run.path(), Some(fake::kernel)).unwrap();
    }

    /// One device that cannot be given back must not strand the others on
    /// vfio-pci (a host NIC left unusable): the restore goes on, reports
    /// the failure, and keeps the state file so the next run retries.
    #[test]
    fn a_failing_restore_still_restores_the_other_devices() {
        let t = Tree::new();
        t.device("0000:05:00.0", "3", Some("mlx5_core"));
        t.device("0000:06:00.0", "4", Some("ixgbe"));
        let s = t.sysfs();
        let devs = s.check(&bdfs(&["05:00.0", "06:00.0"])).unwrap();
        let run = tempfile::tempdir().unwrap();
        let state = run.path().join(STATE_FILE);
        let b = s.bind(&devs, &state).unwrap();
        // The first device's override cannot be written (a device that
        // went away, say).
        let first_ov = t
            .root()
            .join("sys/bus/pci/devices/0000:05:00.0/driver_override");
        fs::remove_file(&first_ov).unwrap();
        let e = b.restore().unwrap_err();
        assert!(
            matches!(&e, VfioError::Write { path, .. } if *path == first_ov),
            "{e:?}"
        );
        assert_eq!(s.driver("0000:06:00.0").as_deref(), Some("ixgbe"));
        assert!(state.exists(), "the state file goes only when all are back");
        // Through recover (after kill -9) too: the second is restored.
        std::mem::forget(b);
        s.bind(&devs[1..], &run.path().join("other.json"))
            .map(std::mem::forget)
            .unwrap();
        assert_eq!(s.driver("0000:06:00.0").as_deref(), Some(VFIO_DRIVER));
        assert!(recover(run.path(), Some(fake::kernel)).is_err());
        assert_eq!(s.driver("0000:06:00.0").as_deref(), Some("ixgbe"));
        assert!(state.exists());
        // Once the first can be written again, the next run finishes it.
        fs::write(&first_ov, "vfio-pci").unwrap();
        recover(run.path(), Some(fake::kernel)).unwrap();
        assert_eq!(s.driver("0000:05:00.0").as_deref(), Some("mlx5_core"));
        assert!(!state.exists());
    }

    #[test]
    fn devices_already_on_vfio_are_left_alone() {
        let t = Tree::new();
        t.device("0000:05:00.0", "3", Some(VFIO_DRIVER));
        fs::write(t.root().join("dev/vfio/3"), "").unwrap();
        let s = t.sysfs();
        let devs = s.check(&bdfs(&["05:00.0"])).unwrap();
        let run = tempfile::tempdir().unwrap();
        let b = s.bind(&devs, &run.path().join(STATE_FILE)).unwrap();
        drop(b);
        assert_eq!(s.driver("0000:05:00.0").as_deref(), Some(VFIO_DRIVER));
        let ov = t
            .root()
            .join("sys/bus/pci/devices/0000:05:00.0/driver_override");
        assert_eq!(fs::read_to_string(ov).unwrap(), "(null)\n");
    }

    #[test]
    fn ids_are_the_devices_vendor_and_device() {
        let t = Tree::new();
        t.device("0000:05:00.0", "3", Some("mlx5_core"));
        let s = t.sysfs();
        assert_eq!(
            s.ids("0000:05:00.0"),
            Some(("0x15b3".to_string(), "0x1017".to_string()))
        );
        assert_eq!(s.ids("0000:06:00.0"), None);
    }

    /// A missing attribute or /dev/vfio/vfio is refused before anything
    /// changes (as root too, for whom every existing file is writable).
    #[test]
    fn missing_sysfs_files_and_vfio_node_are_refused_naming_them() {
        let t = Tree::new();
        t.device("0000:05:00.0", "3", Some("e1000e"));
        let s = t.sysfs();
        let devs = s.check(&bdfs(&["05:00.0"])).unwrap();
        let ov = t
            .root()
            .join("sys/bus/pci/devices/0000:05:00.0/driver_override");
        fs::remove_file(&ov).unwrap();
        let e = s.check_privilege(&devs).unwrap_err().to_string();
        assert!(e.contains(&format!("cannot write {}", ov.display())), "{e}");
        fs::write(&ov, "(null)\n").unwrap();
        fs::remove_file(t.root().join("dev/vfio/vfio")).unwrap();
        let e = s.check_privilege(&devs).unwrap_err().to_string();
        assert!(e.contains("read-write access to"), "{e}");
        assert!(e.contains("dev/vfio/vfio"), "{e}");
        assert_eq!(s.driver("0000:05:00.0").as_deref(), Some("e1000e"));
    }

    /// A state file that exists but cannot be read is an error, not "no
    /// dead run to recover" (which would leave its devices on vfio-pci).
    #[test]
    fn an_unreadable_state_file_is_an_error() {
        let run = tempfile::tempdir().unwrap();
        assert!(recover(run.path(), Some(fake::kernel)).is_ok());
        fs::create_dir(run.path().join(STATE_FILE)).unwrap();
        let e = recover(run.path(), Some(fake::kernel)).unwrap_err();
        assert!(matches!(e, VfioError::State(..)), "{e:?}");
    }

    #[test]
    fn missing_vfio_driver_is_explained() {
        let t = Tree::new();
        fs::remove_dir_all(t.root().join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        t.device("0000:05:00.0", "3", Some("e1000e"));
        let s = t.sysfs();
        let devs = s.check(&bdfs(&["05:00.0"])).unwrap();
        let e = s.check_privilege(&devs).unwrap_err().to_string();
        assert!(e.contains("modprobe vfio-pci"), "{e}");
    }
}
