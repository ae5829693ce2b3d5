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
pub fn open_log(dir: &Path, name: &str) -> Result<(PathBuf, File), CreateError> {
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
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, data)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

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
