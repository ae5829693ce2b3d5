//! `mkt ci` jobs: a numbered directory under `$XDG_STATE_HOME/mkt/ci/jobs`
//! holding `job.json` (what to check, state, outcome) and `report.json`;
//! the log is `logs/ci/ID.log`. Background jobs are this binary re-run
//! detached (`setsid`, output to the log).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CiError, Request};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Submitted; waiting for the scratch tree (another job holds it).
    Queued,
    Running,
    /// Finished with a report.
    Done,
    /// Stopped by an error (in `error`), no report.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub state: State,
    /// The process running the job.
    pub pid: u32,
    pub request: Request,
    pub commit: String,
    pub subject: String,
    pub submitted: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub log: PathBuf,
}

pub(crate) fn jobs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ci/jobs")
}

/// Creates the next job directory (`1`, `2`, ...): the id.
pub(crate) fn allocate(jobs: &Path) -> Result<(u64, PathBuf), CiError> {
    fs::create_dir_all(jobs).map_err(|e| CiError::Create(jobs.into(), e))?;
    loop {
        let next = list_ids(jobs).last().copied().unwrap_or(0) + 1;
        let d = jobs.join(next.to_string());
        match fs::create_dir(&d) {
            Ok(()) => return Ok((next, d)),
            // Another mkt took it: try the one after.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(CiError::Create(d, e)),
        }
    }
}

/// The job ids present, ascending.
pub(crate) fn list_ids(jobs: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(jobs)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Writes `job.json` atomically.
pub(crate) fn save(dir: &Path, r: &Record) -> Result<(), CiError> {
    write_atomic(
        &dir.join("job.json"),
        &serde_json::to_vec_pretty(r).expect("records serialise"),
    )
}

pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), CiError> {
    crate::util::fs::write_atomic(path, data).map_err(|e| CiError::Write(path.into(), e))
}

pub fn load(jobs: &Path, id: u64) -> Result<Record, CiError> {
    let p = jobs.join(id.to_string()).join("job.json");
    let text = fs::read_to_string(&p).map_err(|_| CiError::NoJob(id))?;
    let mut r: Record =
        serde_json::from_str(&text).map_err(|e| CiError::BadRecord(p.clone(), e.to_string()))?;
    // A queued or running job whose process is gone died without a word
    // (pid 0: the detached process has not recorded itself yet).
    if matches!(r.state, State::Queued | State::Running) && r.pid != 0 && !alive(r.pid) {
        r.state = State::Failed;
        r.error = Some(format!(
            "the job's process ({}) ended without finishing; see the log",
            r.pid
        ));
    }
    Ok(r)
}

/// Is `pid` still an mkt process?
fn alive(pid: u32) -> bool {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.cmdline())
        .is_ok_and(|args| args.iter().any(|a| a == "ci"))
}

/// The one-line state for `--status`.
pub(crate) fn state_line(r: &Record) -> String {
    let what = match (r.state, r.exit) {
        (State::Done, Some(0)) => "done: no new findings".to_string(),
        (State::Done, Some(1)) => "done: new findings".to_string(),
        (State::Done, Some(2)) => "done: a check could not run".to_string(),
        (State::Done, Some(3)) => "done: new findings; a check could not run".to_string(),
        (State::Done, e) => format!("done (exit {e:?})"),
        (State::Failed, _) => format!("failed: {}", r.error.as_deref().unwrap_or("?")),
        (State::Queued, _) => "queued (starting, or waiting for another job's scratch tree)".into(),
        (State::Running, _) => "running".into(),
    };
    format!(
        "{:>4}  {}  {:<12} {:?}  {what}",
        r.id,
        r.submitted,
        &r.commit[..r.commit.len().min(12)],
        r.subject
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_count_up_and_survive_gaps() {
        let t = tempfile::tempdir().unwrap();
        let j = t.path().join("jobs");
        assert_eq!(allocate(&j).unwrap().0, 1);
        assert_eq!(allocate(&j).unwrap().0, 2);
        fs::create_dir(j.join("10")).unwrap();
        fs::create_dir(j.join("not-a-job")).unwrap();
        assert_eq!(allocate(&j).unwrap().0, 11);
        assert_eq!(list_ids(&j), [1, 2, 10, 11]);
    }
}
