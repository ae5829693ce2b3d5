//! Files mkt writes: logs that never overwrite one another, records that a
//! reader never sees half-written.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot create {path}")]
pub struct CreateError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// A new log file `DIR/NAME-YYYYmmdd-HHMMSS[-N].log` (N when two start in
/// the same second), opened for appending; its path and file.
pub(crate) fn open_log(dir: &Path, name: &str) -> Result<(PathBuf, File), CreateError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CreateError { path, source }
    };
    fs::create_dir_all(dir).map_err(err(dir))?;
    let ts = super::time::compact_now();
    for n in 0.. {
        let file = if n == 0 {
            format!("{name}-{ts}.log")
        } else {
            format!("{name}-{ts}-{n}.log")
        };
        let p = dir.join(file);
        match fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(&p)(e)),
        }
    }
    unreachable!()
}

/// Writes `path` whole or not at all: a temp file beside it, then a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, data)?;
    fs::rename(&tmp, path)
}

/// A private work dir in the temp dir, `PREFIX-PID-XXXXXX`, removed when
/// dropped. Made after a sweep of this user's dirs of the same prefix
/// whose mkt is gone: a process killed by a signal (SIGKILL) has no chance
/// to remove its own.
pub(crate) fn work_dir(prefix: &str) -> io::Result<tempfile::TempDir> {
    let tmp = std::env::temp_dir();
    sweep_dead(&tmp, prefix);
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-{}-", std::process::id()))
        .tempdir_in(&tmp)
}

/// Removes this user's `PREFIX-PID-*` dirs in `tmp` whose process is gone.
fn sweep_dead(tmp: &Path, prefix: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = fs::read_dir(tmp) else { return };
    let me = nix::unistd::geteuid().as_raw();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let mine = e.metadata().is_ok_and(|m| m.uid() == me && m.is_dir());
        if mine && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing {} left by a killed mkt", e.path().display());
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dirs_of_dead_processes_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        // A pid that cannot be running (above pid_max's ceiling).
        let dead = tmp.path().join("mkt-build-4194304-abc");
        let live = tmp
            .path()
            .join(format!("mkt-build-{}-abc", std::process::id()));
        let other = tmp.path().join("mkt-build-x");
        let other_prefix = tmp.path().join("mkt-shell-4194304-abc");
        let longer_prefix = tmp.path().join("mkt-build-tree-4194304-abc");
        for d in [&dead, &live, &other, &other_prefix, &longer_prefix] {
            fs::create_dir_all(d.join("root")).unwrap();
        }
        sweep_dead(tmp.path(), "mkt-build");
        assert!(!dead.exists());
        assert!(live.exists() && other.exists() && other_prefix.exists());
        assert!(longer_prefix.exists());
    }

    #[test]
    fn logs_started_in_the_same_second_get_their_own_file() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("logs/build");
        let (a, _) = open_log(&dir, "linux").unwrap();
        let (b, _) = open_log(&dir, "linux").unwrap();
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("linux-20") && name.ends_with(".log"),
            "{name}"
        );
        assert_eq!(name.len(), "linux-YYYYmmdd-HHMMSS.log".len(), "{name}");
        let e = open_log(&d.path().join("logs/build/linux-x/../../f"), "x");
        assert!(e.is_ok() || e.unwrap_err().to_string().starts_with("cannot create"));
    }

    #[test]
    fn atomic_write_replaces_whole_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("job.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        let e = write_atomic(&d.path().join("no/such/f"), b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
