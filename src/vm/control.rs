//! `mkt stop` and finding the running VMs from their records.

use crate::config::Paths;
use crate::instance;
use crate::vm::qmp;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Waits until the run of `r` has ended (its mkt released the run's lock).
pub(crate) fn wait_gone(r: &instance::Record, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while instance::running(r) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// `mkt stop`: an ACPI power-off request through QMP, then (after
/// `timeout`, or at once with `force`) QMP quit, then signals to mkt. The
/// VM's own mkt does the cleanup, as for any other end of the run.
pub fn stop(
    paths: &Paths,
    name: Option<&str>,
    all: bool,
    force: bool,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let running = running_vms_named(&paths.runtime_dir, name)?;
    let targets: Vec<&instance::Record> = match (name, all) {
        (_, true) if running.is_empty() => {
            eprintln!("mkt: no VM is running; nothing to stop");
            return Ok(0);
        }
        (_, true) => running.iter().collect(),
        (Some(n), false) => vec![find_vm(&running, n)?],
        (None, false) => match running.as_slice() {
            [one] => vec![one],
            [] => anyhow::bail!("no VM is running"),
            _ => anyhow::bail!(
                "several VMs are running; name one or use --all: {}",
                names(&running)
            ),
        },
    };
    for r in targets {
        let qmp = r.qmp.as_deref();
        let mut stopped = false;
        // A request that fails (QEMU busy, or gone) is only logged: the
        // wait and the next step follow as after any other.
        let ask = |q: &std::path::Path, command| {
            if let Err(e) = qmp::execute(q, command) {
                tracing::debug!("{}: {e}", r.name);
            }
        };
        if !force && let Some(q) = qmp {
            ask(q, qmp::Command::SystemPowerdown);
            stopped = wait_gone(r, timeout);
        }
        if !stopped && let Some(q) = qmp {
            ask(q, qmp::Command::Quit);
            stopped = wait_gone(r, Duration::from_secs(5));
        }
        // Signals only to the process that holds this run's lock: the
        // recorded pid may have ended and been reused meanwhile.
        if !stopped && instance::running(r) {
            use nix::sys::signal::{Signal, kill};
            let pid = nix::unistd::Pid::from_raw(r.pid as i32);
            let _ = kill(pid, Signal::SIGTERM);
            if !wait_gone(r, Duration::from_secs(5)) && instance::running(r) {
                let _ = kill(pid, Signal::SIGKILL);
                wait_gone(r, Duration::from_secs(5));
                clean_stale(&paths.runtime_dir)?;
            }
        }
        println!("stopped {}", r.name);
    }
    Ok(0)
}

pub(crate) fn names(r: &[instance::Record]) -> String {
    if r.is_empty() {
        return "none".into();
    }
    r.iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The running VM called `name`: the one of exactly that name, else the one
/// numbered VM of it (`run` finds `run-1` when that is the only one).
/// Several candidates are an error listing them, never a silent pick.
pub(crate) fn find_vm<'a>(
    running: &'a [instance::Record],
    name: &str,
) -> anyhow::Result<&'a instance::Record> {
    if let Some(r) = running.iter().find(|r| r.name == name) {
        return Ok(r);
    }
    let numbered: Vec<&instance::Record> = running
        .iter()
        .filter(|r| {
            r.name
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    match numbered.as_slice() {
        [one] => Ok(one),
        [] => anyhow::bail!("no running VM named {name:?} (running: {})", names(running)),
        several => anyhow::bail!(
            "{name:?} is ambiguous: {} VMs match ({}); name one",
            several.len(),
            several
                .iter()
                .map(|r| format!("{} (pid {})", r.name, r.pid))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Undoes what a dead run changed outside its run directory.
fn recover(dir: &Path) -> Result<(), String> {
    crate::vm::vfio::recover(dir, None).map_err(|e| format!("restoring its VFIO devices: {e}"))?;
    crate::vm::net::recover(dir).map_err(|e| format!("deleting its tap device: {e}"))
}

/// Removes the run directories of dead runs, their VFIO devices given
/// back and taps deleted first; returns them.
pub(crate) fn clean_stale(runtime_dir: &Path) -> Result<Vec<PathBuf>, instance::InstanceError> {
    instance::clean_stale(runtime_dir, recover)
}

/// The running VMs' records, stale run directories swept first.
pub fn running_vms(runtime_dir: &Path) -> Result<Vec<instance::Record>, instance::InstanceError> {
    clean_stale(runtime_dir)?;
    instance::records(runtime_dir)
}

/// [`running_vms`], once the run called `name` has its record: a VM whose
/// `mkt run` is still starting (run directory locked, no record yet) is
/// waited for (up to [`START_WAIT`]), and a name with no run
/// directory at all for [`NAME_GRACE`] (a `mkt run NAME &` started just
/// before has not made it yet), so a script's `mkt run NAME &` then
/// `mkt ssh NAME` (or `stop`) finds it.
pub(crate) fn running_vms_named(
    runtime_dir: &Path,
    name: Option<&str>,
) -> Result<Vec<instance::Record>, instance::InstanceError> {
    let t0 = std::time::Instant::now();
    let mut running = running_vms(runtime_dir)?;
    let Some(name) = name else {
        return Ok(running);
    };
    loop {
        if running.iter().any(|r| r.name == name) {
            return Ok(running);
        }
        let wait = if instance::starting(runtime_dir, name) {
            START_WAIT
        } else if !instance::runs_dir(runtime_dir).join(name).exists() {
            NAME_GRACE
        } else {
            Duration::ZERO
        };
        if t0.elapsed() >= wait {
            return Ok(running);
        }
        std::thread::sleep(Duration::from_millis(50));
        running = instance::records(runtime_dir)?;
    }
}

/// How long a starting VM is waited for: as long as `mkt ssh` waits for a
/// booting guest's sshd (a systemd boot under TCG on a busy host).
const START_WAIT: Duration = Duration::from_secs(120);

/// How long a VM name nothing runs under is waited for (see
/// [`running_vms_named`]): `mkt run` makes its run directory within tens
/// of milliseconds of starting, seconds on a loaded machine.
const NAME_GRACE: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::tests::{dead_run, runtime};
    use std::fs;

    #[test]
    fn the_sweep_gives_a_dead_runs_vfio_devices_back() {
        let tree = crate::vm::vfio::fake::Tree::new();
        tree.device("0000:05:00.0", "3", Some("vfio-pci"));
        tree.driver("mlx5_core");
        let rt = runtime();
        let dead = dead_run(rt.path(), "cx5-1");
        let state = crate::vm::vfio::State {
            root: tree.root().to_path_buf(),
            devices: vec![crate::vm::vfio::Device {
                bdf: "0000:05:00.0".into(),
                group: "3".into(),
                driver: Some("mlx5_core".into()),
            }],
        };
        fs::write(
            dead.join(crate::vm::vfio::STATE_FILE),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
        assert_eq!(clean_stale(rt.path()).unwrap(), vec![dead.clone()]);
        let drivers = tree.root().join("sys/bus/pci/drivers");
        let read = |p: &str| fs::read_to_string(drivers.join(p)).unwrap();
        assert_eq!(read("vfio-pci/unbind"), "0000:05:00.0");
        assert_eq!(read("mlx5_core/bind"), "0000:05:00.0");
        // A state that cannot be restored keeps the directory for later.
        let dead = dead_run(rt.path(), "cx5-1");
        let mut gone = state.clone();
        gone.root = rt.path().join("nonexistent");
        fs::write(
            dead.join(crate::vm::vfio::STATE_FILE),
            serde_json::to_vec(&gone).unwrap(),
        )
        .unwrap();
        assert!(clean_stale(rt.path()).unwrap().is_empty());
        assert!(dead.exists());
    }
}
