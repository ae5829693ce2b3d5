//! `mkt ci`: patch-oriented static analysis of one revision, in the
//! background by default.
//!
//! The revision is checked out in a scratch tree (a repository of its own
//! under `$XDG_CACHE_HOME/mkt/ci` that borrows the source repository's
//! objects, kept between runs so builds there stay incremental), the
//! analysers run inside the rootfs like `mkt build` (same namespaces, same
//! ccache), only over the Kbuild directories the patch touches, on the
//! revision and on its parent, and only what the patch introduced is
//! reported.

pub mod checks;
pub mod findings;
pub mod git;
pub mod job;
pub mod report;
pub mod scope;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Paths};
use job::{Record, State};
use report::Report;

#[derive(Debug, thiserror::Error)]
pub enum CiError {
    #[error("cannot run {0}")]
    Spawn(String, #[source] io::Error),
    #[error("git -C {dir} {args} failed: {stderr}")]
    Git {
        dir: PathBuf,
        args: String,
        stderr: String,
    },
    #[error("{0:?} is not a commit in {1}")]
    BadRev(String, PathBuf),
    #[error("{0} is not a git repository (mkt ci checks commits)")]
    NotARepo(PathBuf, #[source] Box<CiError>),
    #[error("cannot create {0}")]
    Create(PathBuf, #[source] io::Error),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("no job {0} (mkt ci --status lists them)")]
    NoJob(u64),
    #[error("{0}: unreadable job record: {1}")]
    BadRecord(PathBuf, String),
    #[error("--kernel-config {0}: cannot read it")]
    KernelConfig(PathBuf, #[source] io::Error),
    #[error("cannot lock the scratch tree {0}")]
    Lock(PathBuf, #[source] nix::errno::Errno),
    #[error("in the rootfs")]
    Build(#[from] crate::build::BuildError),
}

/// What to check: everything a job needs, fixed when it is submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub project: Option<String>,
    /// The source repository (any directory inside it).
    pub source: PathBuf,
    /// REV as given.
    pub rev: String,
    pub rootfs: PathBuf,
    pub checkpatch: bool,
    pub sparse: bool,
    pub smatch: bool,
    pub warnings: bool,
    pub clang: bool,
    pub show_all: bool,
    pub ignore_gerrit: bool,
    pub kernel_config: Option<PathBuf>,
    pub junit: Option<PathBuf>,
}

/// `mkt ci`'s command line.
#[derive(Debug, Clone, Default)]
pub struct CiOptions {
    pub project: Option<String>,
    pub dir: Option<PathBuf>,
    pub rev: Option<String>,
    pub rootfs: Option<String>,
    pub no_checkpatch: bool,
    pub no_sparse: bool,
    pub no_smatch: bool,
    pub no_warnings: bool,
    pub no_clang: bool,
    pub show_all: bool,
    pub no_ignore_gerrit: bool,
    pub kernel_config: Option<PathBuf>,
    pub json: bool,
    pub junit: Option<PathBuf>,
    pub wait: bool,
    /// `--status [ID]`: `Some(None)` lists every job.
    pub status: Option<Option<u64>>,
    pub log: Option<u64>,
    /// Internal: run submitted job ID (the detached process).
    pub run_job: Option<u64>,
    /// mkt's `--config`, handed to the detached process.
    pub config_file: Option<PathBuf>,
    pub quiet: bool,
    pub verbose: bool,
}

/// `mkt ci`: the exit status.
pub fn ci(opts: &CiOptions, config: &Config, paths: &Paths) -> anyhow::Result<i32> {
    let jobs = job::jobs_dir(&paths.state_dir);
    if let Some(id) = opts.run_job {
        return Ok(run_detached(id, config, paths)?);
    }
    if let Some(which) = opts.status {
        return status(&jobs, which, opts.json, opts.show_all);
    }
    if let Some(id) = opts.log {
        let r = job::load(&jobs, id)?;
        let text = fs::read(&r.log).map_err(|e| CiError::Read(r.log.clone(), e))?;
        io::stdout().write_all(&text)?;
        return Ok(0);
    }
    let request = make_request(opts, config, paths)?;
    let src = git::open(&request.source)
        .map_err(|e| CiError::NotARepo(request.source.clone(), Box::new(e)))?;
    let commit = git::resolve(&src.top, &request.rev)?;
    let subject = git::subject(&src.top, &commit)?;
    let (id, dir) = job::allocate(&jobs)?;
    let log_dir = paths.logs_dir.join("ci");
    fs::create_dir_all(&log_dir).map_err(|e| CiError::Create(log_dir.clone(), e))?;
    let mut record = Record {
        id,
        state: State::Queued,
        pid: 0,
        request,
        commit,
        subject,
        submitted: crate::util::time::rfc3339_now(),
        finished: None,
        exit: None,
        error: None,
        log: log_dir.join(format!("{id}.log")),
    };
    if opts.wait {
        record.pid = std::process::id();
        job::save(&dir, &record)?;
        let echo = !opts.quiet;
        let report = run_job(&mut record, &dir, config, paths, echo)?;
        if opts.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report::human(&report, record.request.show_all));
        }
        return Ok(report.exit);
    }
    job::save(&dir, &record)?;
    let pid = match spawn_detached(id, &record.log, opts.config_file.as_deref()) {
        Ok(pid) => pid,
        Err(e) => {
            record.state = State::Failed;
            record.error = Some(e.to_string());
            job::save(&dir, &record)?;
            return Err(e.into());
        }
    };
    if opts.json {
        let v = serde_json::json!({"job": id, "pid": pid, "log": record.log});
        println!("{v}");
    } else {
        println!("{id}");
    }
    if !opts.quiet {
        eprintln!(
            "mkt: ci job {id} checks {} {:?} in the background; `mkt ci --status {id}` shows its report, `mkt ci --log {id}` its log",
            &record.commit[..12],
            record.subject
        );
    }
    Ok(0)
}

fn make_request(opts: &CiOptions, config: &Config, paths: &Paths) -> anyhow::Result<Request> {
    if let Some(p) = &opts.project
        && !crate::build::PROJECT_NAMES.contains(&p.as_str())
    {
        return Err(crate::build::BuildError::UnknownProject(p.clone()).into());
    }
    let bopts = crate::build::BuildOptions {
        project: opts.project.clone(),
        dir: opts.dir.clone(),
        ..Default::default()
    };
    let source = crate::build::resolve_src(&bopts, config)?;
    // Not a repository: say so before a first use builds the rootfs.
    git::open(&source).map_err(|e| CiError::NotARepo(source.clone(), Box::new(e)))?;
    let rootfs = crate::build::rootfs_for(
        opts.rootfs.as_deref(),
        config,
        paths,
        opts.quiet,
        opts.verbose,
    )?;
    let kernel_config = match &opts.kernel_config {
        Some(f) => Some(fs::canonicalize(f).map_err(|e| CiError::KernelConfig(f.clone(), e))?),
        None => None,
    };
    let junit = opts.junit.as_ref().map(|j| {
        if j.is_absolute() {
            j.clone()
        } else {
            std::env::current_dir().unwrap_or_default().join(j)
        }
    });
    Ok(Request {
        project: opts.project.clone(),
        source,
        rev: opts.rev.clone().unwrap_or_else(|| "HEAD".into()),
        rootfs,
        checkpatch: !opts.no_checkpatch,
        sparse: !opts.no_sparse,
        smatch: !opts.no_smatch,
        warnings: !opts.no_warnings,
        clang: !opts.no_clang,
        show_all: opts.show_all,
        ignore_gerrit: !opts.no_ignore_gerrit,
        kernel_config,
        junit,
    })
}

/// Starts `mkt ci --run-job ID` in a new session, detached from the
/// terminal, its output appended to the job's log; its pid.
fn spawn_detached(id: u64, log: &Path, config_file: Option<&Path>) -> Result<u32, CiError> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| CiError::Spawn("mkt".into(), e))?;
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| CiError::Create(log.into(), e))?;
    let err = out
        .try_clone()
        .map_err(|e| CiError::Create(log.into(), e))?;
    let mut c = std::process::Command::new(exe);
    if let Some(f) = config_file {
        c.arg("--config").arg(f);
    }
    c.args(["ci", "--run-job", &id.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory; it makes
    // the job its own session, so closing the terminal does not hang it up.
    unsafe {
        c.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
    let child = c
        .spawn()
        .map_err(|e| CiError::Spawn("mkt ci --run-job".into(), e))?;
    // Not waited for: this process exits at once and init adopts the job.
    Ok(child.id())
}

/// The detached process: runs the job, records the outcome.
fn run_detached(id: u64, config: &Config, paths: &Paths) -> Result<i32, CiError> {
    let jobs = job::jobs_dir(&paths.state_dir);
    let dir = jobs.join(id.to_string());
    let mut record = job::load(&jobs, id)?;
    record.pid = std::process::id();
    record.state = State::Queued;
    record.error = None;
    job::save(&dir, &record)?;
    // Progress goes to stderr, which is the log.
    match run_job(&mut record, &dir, config, paths, false) {
        Ok(r) => Ok(r.exit),
        Err(_) => Ok(2),
    }
}

/// Writes progress lines to the job's log (and stderr when `echo`).
pub struct Progress {
    log: fs::File,
    echo: bool,
    id: u64,
    t0: Instant,
}

impl Progress {
    pub fn say(&self, msg: &str) {
        let line = format!("[{:6.1}s] {msg}\n", self.t0.elapsed().as_secs_f64());
        let _ = (&self.log).write_all(line.as_bytes());
        if self.echo {
            eprintln!("mkt: ci job {}: {msg}", self.id);
        }
    }
    pub fn log(&self) -> &fs::File {
        &self.log
    }
}

/// Runs a job: its report (also saved in the job directory); the record
/// is kept up to date on disk.
fn run_job(
    record: &mut Record,
    dir: &Path,
    config: &Config,
    paths: &Paths,
    echo: bool,
) -> Result<Report, CiError> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&record.log)
        .map_err(|e| CiError::Create(record.log.clone(), e))?;
    let progress = Progress {
        log,
        echo,
        id: record.id,
        t0: Instant::now(),
    };
    progress.say(&format!(
        "checking {} {:?} from {}",
        record.commit,
        record.subject,
        record.request.source.display()
    ));
    // `rootfs rm` refuses the tree while the job builds in it (a tree being
    // removed fails the job's first build with its own error).
    let _tree_in_use = crate::rootfs::lock::in_use(paths, &record.request.rootfs)
        .ok()
        .flatten();
    let result = checks::run(record, dir, config, paths, &progress);
    record.finished = Some(crate::util::time::rfc3339_now());
    match result {
        Ok(report) => {
            let json = serde_json::to_vec_pretty(&report).expect("reports serialise");
            job::write_atomic(&dir.join("report.json"), &json)?;
            if let Some(j) = &record.request.junit {
                fs::write(j, report::junit(&report)).map_err(|e| CiError::Write(j.clone(), e))?;
            }
            let _ = (&progress.log).write_all(report::human(&report, true).as_bytes());
            record.state = State::Done;
            record.exit = Some(report.exit);
            job::save(dir, record)?;
            Ok(report)
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg += &format!(": {s}");
                src = s.source();
            }
            progress.say(&format!("failed: {msg}"));
            record.state = State::Failed;
            record.error = Some(msg);
            job::save(dir, record)?;
            Err(e)
        }
    }
}

fn status(jobs: &Path, which: Option<u64>, json: bool, show_all: bool) -> anyhow::Result<i32> {
    let Some(id) = which else {
        let records: Vec<Record> = job::list_ids(jobs)
            .into_iter()
            .filter_map(|id| job::load(jobs, id).ok())
            .collect();
        if json {
            println!("{}", serde_json::to_string_pretty(&records)?);
        } else {
            for r in &records {
                println!("{}", job::state_line(r));
            }
        }
        return Ok(0);
    };
    let r = job::load(jobs, id)?;
    let report: Option<Report> = fs::read_to_string(jobs.join(id.to_string()).join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if json {
        let v = serde_json::json!({"job": r, "report": report});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", job::state_line(&r));
        if let Some(rep) = &report {
            print!("{}", report::human(rep, show_all || r.request.show_all));
        } else {
            println!("log: {}", r.log.display());
        }
    }
    // The job's own exit status once it has one: scripts can poll.
    Ok(match r.state {
        State::Done => r.exit.unwrap_or(0),
        State::Failed => 2,
        State::Queued | State::Running => 0,
    })
}
