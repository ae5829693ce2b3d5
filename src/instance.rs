//! Per-run state on the host: a private directory under the runtime dir
//! holding the run's sockets, generated guest files, initramfs and console
//! log. It is locked (flock) for as long as mkt runs, removed when the run
//! ends, and a directory whose lock nobody holds is left over from a killed
//! mkt: any later run removes it.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// What `mkt ssh` (and later `mkt ps`) need to know of a running VM,
/// stored as instance.json in its run directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub name: String,
    pub pid: u32,
    pub ssh_port: Option<u16>,
    pub user: String,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// Seconds since the epoch.
    pub started: u64,
    /// QEMU's QMP socket, for `mkt stop`.
    #[serde(default)]
    pub qmp: Option<PathBuf>,
}

/// Sends one QMP command (after the capabilities handshake) and returns
/// QEMU's answer line.
pub fn qmp(socket: &Path, command: &str) -> io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    let mut line = String::new();
    // Greeting, then the answer to qmp_capabilities; events may interleave.
    r.read_line(&mut line)?;
    writeln!(w, r#"{{"execute":"qmp_capabilities"}}"#)?;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line.contains("\"return\"") {
            break;
        }
    }
    writeln!(w, r#"{{"execute":"{command}"}}"#)?;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(String::new());
        }
        if line.contains("\"return\"") || line.contains("\"error\"") {
            return Ok(line.trim().to_string());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot write instance record {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create run directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock run directory {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A run's directory; removed on drop unless kept.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    keep: bool,
    _lock: Flock<File>,
}

/// Where the runs live inside the runtime dir.
pub fn runs_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("runs")
}

impl RunDir {
    /// Creates `<runtime>/runs/<name>-<pid>` (mode 0700) and locks it.
    pub fn create(runtime_dir: &Path, name: &str) -> Result<RunDir, InstanceError> {
        use std::os::unix::fs::DirBuilderExt;
        let runs = runs_dir(runtime_dir);
        let path = runs.join(format!("{name}-{}", std::process::id()));
        let err = |source| InstanceError::Create {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&runs).map_err(err)?;
        // A dir with our pid can only be a dead run's (pids are reused).
        if path.exists() {
            fs::remove_dir_all(&path).map_err(err)?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(err)?;
        let file = File::create(path.join("lock")).map_err(err)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            InstanceError::Lock {
                path: path.clone(),
                source: e.into(),
            }
        })?;
        Ok(RunDir {
            path,
            keep: false,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the instance record atomically (temp file + rename), so a
    /// reader never sees half of it.
    pub fn write_record(&self, r: &Record) -> Result<(), InstanceError> {
        let path = self.path.join("instance.json");
        let tmp = self.path.join(".instance.json.tmp");
        let err = |source| InstanceError::Record {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(r).map_err(|e| err(io::Error::other(e)))?;
        fs::write(&tmp, text).map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)
    }

    /// Keep the directory after the run (for --keep).
    pub fn keep(&mut self) {
        self.keep = true;
        let _ = File::create(self.path.join("keep"));
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes run directories whose lock no live mkt holds; returns them.
pub fn clean_stale(runtime_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(runs_dir(runtime_dir)) else {
        return removed;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let Ok(f) = File::open(dir.join("lock")) else {
            continue;
        };
        // Locked by a running mkt: leave it. Kept dirs have no lock holder
        // either, so they are marked and skipped.
        if dir.join("keep").exists() {
            continue;
        }
        if let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            // A dead run's VFIO bindings and tap go first; if that fails
            // (say, not root), the record stays for a run that can.
            if let Err(e) = recover(&dir) {
                tracing::warn!("run directory {} left over: {e}", dir.display());
                continue;
            }
            if fs::remove_dir_all(&dir).is_ok() {
                removed.push(dir);
            }
            drop(lock);
        }
    }
    removed
}

/// Undoes what a dead run changed outside its directory.
fn recover(dir: &Path) -> Result<(), String> {
    crate::vfio::recover(dir, None).map_err(|e| format!("restoring its VFIO devices: {e}"))?;
    crate::net::recover(dir).map_err(|e| format!("deleting its tap device: {e}"))
}

/// A run directory whose lock a live mkt holds.
fn is_live(dir: &Path) -> bool {
    match File::open(dir.join("lock")) {
        Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err(),
        Err(_) => false,
    }
}

/// The records of running VMs (stale run directories are removed first).
pub fn list(runtime_dir: &Path) -> Vec<Record> {
    clean_stale(runtime_dir);
    let Ok(entries) = fs::read_dir(runs_dir(runtime_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<Record> = entries
        .flatten()
        .filter(|e| is_live(&e.path()))
        .filter_map(|e| fs::read(e.path().join("instance.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_is_private_locked_and_removed() {
        let rt = tempfile::tempdir().unwrap();
        let d = RunDir::create(rt.path(), "t").unwrap();
        let path = d.path().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A live run is not stale.
        assert!(clean_stale(rt.path()).is_empty());
        assert!(path.exists());
        drop(d);
        assert!(!path.exists());
    }

    #[test]
    fn stale_dirs_of_dead_runs_are_removed_kept_ones_stay() {
        let rt = tempfile::tempdir().unwrap();
        let runs = runs_dir(rt.path());
        for name in ["dead-1", "kept-2"] {
            fs::create_dir_all(runs.join(name)).unwrap();
            File::create(runs.join(name).join("lock")).unwrap();
        }
        File::create(runs.join("kept-2/keep")).unwrap();
        let removed = clean_stale(rt.path());
        assert_eq!(removed, vec![runs.join("dead-1")]);
        assert!(runs.join("kept-2").exists());
    }

    #[test]
    fn records_of_live_runs_are_listed() {
        let rt = tempfile::tempdir().unwrap();
        let d = RunDir::create(rt.path(), "cx5").unwrap();
        let r = Record {
            name: "cx5".into(),
            pid: 42,
            ssh_port: Some(2222),
            user: "dev".into(),
            kernel: "/k".into(),
            rootfs: "/r".into(),
            started: 1,
            qmp: None,
        };
        d.write_record(&r).unwrap();
        assert_eq!(list(rt.path()), vec![r]);
        drop(d);
        assert!(list(rt.path()).is_empty());
    }

    #[test]
    fn the_sweep_gives_a_dead_runs_vfio_devices_back() {
        let tree = crate::vfio::fake::Tree::new();
        tree.device("0000:05:00.0", "3", Some("vfio-pci"));
        tree.driver("mlx5_core");
        let rt = tempfile::tempdir().unwrap();
        let dead = runs_dir(rt.path()).join("cx5-1");
        fs::create_dir_all(&dead).unwrap();
        File::create(dead.join("lock")).unwrap();
        let state = crate::vfio::State {
            root: tree.root().to_path_buf(),
            devices: vec![crate::vfio::Device {
                bdf: "0000:05:00.0".into(),
                group: "3".into(),
                driver: Some("mlx5_core".into()),
            }],
        };
        fs::write(
            dead.join(crate::vfio::STATE_FILE),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
        assert_eq!(clean_stale(rt.path()), vec![dead.clone()]);
        let drivers = tree.root().join("sys/bus/pci/drivers");
        let read = |p: &str| fs::read_to_string(drivers.join(p)).unwrap();
        assert_eq!(read("vfio-pci/unbind"), "0000:05:00.0");
        assert_eq!(read("mlx5_core/bind"), "0000:05:00.0");
        // A state that cannot be restored keeps the directory for later.
        fs::create_dir_all(&dead).unwrap();
        File::create(dead.join("lock")).unwrap();
        let mut gone = state.clone();
        gone.root = rt.path().join("nonexistent");
        fs::write(
            dead.join(crate::vfio::STATE_FILE),
            serde_json::to_vec(&gone).unwrap(),
        )
        .unwrap();
        assert!(clean_stale(rt.path()).is_empty());
        assert!(dead.exists());
    }

    #[test]
    fn kept_run_dir_survives_drop() {
        let rt = tempfile::tempdir().unwrap();
        let mut d = RunDir::create(rt.path(), "k").unwrap();
        d.keep();
        let path = d.path().to_path_buf();
        drop(d);
        assert!(path.exists());
    }
}
