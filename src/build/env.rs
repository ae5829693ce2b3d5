//! The rootfs as `mkt build` and `mkt ci` enter it for one source tree:
//! the user, the mounts, the environment (PATH, ccache), and running one
//! step with its output logged.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use super::{BuildError, BuildOptions, MKT_DIR, VM_CONFIG};
use crate::config::{Config, Paths};
use crate::sandbox::{self, Layout, Mount, What};

/// Everything needed to enter the rootfs for one source tree (also used
/// by `mkt ci`).
pub(crate) struct Env {
    pub(crate) rootfs: PathBuf,
    pub(crate) src: PathBuf,
    pub(crate) layout: Layout,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(super) shell: String,
    pub(crate) ccache: bool,
    /// `-j`: the CPUs this process may really use.
    pub(crate) jobs: u32,
    /// Host directory shown read-only at [`MKT_DIR`] inside.
    pub(crate) files: PathBuf,
    /// Holds the generated passwd/group/vm.config and the staging dir.
    _work: tempfile::TempDir,
}

pub(crate) fn prepare_env(
    opts: &BuildOptions,
    config: &Config,
    paths: &Paths,
    rootfs: PathBuf,
    src: PathBuf,
) -> Result<Env, BuildError> {
    // The same user `mkt run` recreates in guests, with the home mkt uses.
    let mut user = crate::guest::GuestUser::of(crate::host::user::current());
    user.home = paths.home.clone();
    user.shell = ["/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|s| rootfs.join(&s[1..]).exists())
        .unwrap_or("/bin/sh")
        .to_string();
    let (name, home, shell) = (user.name.clone(), user.home.clone(), user.shell.clone());

    let work = crate::util::fs::work_dir("mkt-build")
        .map_err(|e| BuildError::Create(std::env::temp_dir(), e))?;
    let files = work.path().join("files");
    let staging = work.path().join("root");
    for d in [&files, &staging] {
        fs::create_dir(d).map_err(|e| BuildError::Create(d.clone(), e))?;
    }
    let write = |n: &str, text: &str| -> Result<PathBuf, BuildError> {
        let p = files.join(n);
        fs::write(&p, text).map_err(|e| BuildError::Write(p.clone(), e))?;
        Ok(p)
    };
    let base = |n: &str| fs::read_to_string(rootfs.join("etc").join(n)).unwrap_or_default();
    let passwd = write(
        "passwd",
        &crate::guest::passwd_with_user(&base("passwd"), &user),
    )?;
    let groupf = write(
        "group",
        &crate::guest::group_with_user(&base("group"), &user),
    )?;
    write("vm.config", VM_CONFIG)?;

    let mut mounts = vec![
        Mount::new("/proc", What::Proc),
        Mount::new("/dev", What::Dev),
        Mount::new("/tmp", What::Tmpfs),
        Mount::bind_file(&passwd, "/etc/passwd"),
        Mount::bind_file(&groupf, "/etc/group"),
        Mount::bind(&files, MKT_DIR, true),
    ];
    if Path::new("/etc/resolv.conf").exists() {
        mounts.push(Mount::bind_file("/etc/resolv.conf", "/etc/resolv.conf"));
    }
    if home.is_dir() && home != Path::new("/") {
        mounts.push(Mount::bind(&home, &home, true));
    }
    let masquerade = ccache_dir(&rootfs);
    let ccache = masquerade.is_some();
    let mut env: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), search_path(masquerade).into()),
        ("HOME".into(), home.clone().into()),
        ("USER".into(), name.clone().into()),
        ("LOGNAME".into(), name.into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("SHELL".into(), shell.clone().into()),
    ];
    if let Some(term) = std::env::var_os("TERM") {
        env.push(("TERM".into(), term));
    }
    if ccache {
        let d = &paths.ccache_dir;
        fs::create_dir_all(d).map_err(|e| BuildError::Create(d.clone(), e))?;
        mounts.push(Mount::bind(d, d, false));
        env.push(("CCACHE_DIR".into(), d.clone().into()));
    }
    let mut extra: Vec<PathBuf> = Vec::new();
    for d in config.defaults.dirs.iter().chain(&opts.dirs) {
        let c = fs::canonicalize(d).map_err(|_| BuildError::BadDir(d.clone()))?;
        if !c.is_dir() {
            return Err(BuildError::BadDir(d.clone()));
        }
        extra.push(c);
    }
    extra.push(src.clone());
    for d in extra {
        // One mount per path: the last (read-write) bind wins.
        mounts.retain(|m| m.dst != d);
        mounts.push(Mount::bind(&d, &d, false));
    }
    Ok(Env {
        layout: Layout {
            rootfs: rootfs.clone(),
            staging,
            mounts,
            writable: false,
        },
        rootfs,
        src,
        env,
        shell,
        ccache,
        jobs: crate::host::user::usable_cpus(),
        files,
        _work: work,
    })
}

/// Where distributions put ccache's masquerade links (`gcc` → ccache),
/// first match wins: Arch and Alpine, Fedora and openSUSE, Debian.
const CCACHE_DIRS: [&str; 3] = [
    "/usr/lib/ccache/bin",
    "/usr/lib64/ccache",
    "/usr/lib/ccache",
];

/// The rootfs's ccache masquerade directory, as seen inside.
pub(crate) fn ccache_dir(rootfs: &Path) -> Option<&'static str> {
    CCACHE_DIRS
        .into_iter()
        .find(|d| rootfs.join(&d[1..]).is_dir() && rootfs.join("usr/bin/ccache").exists())
}

/// PATH inside the rootfs: the masquerade directory first, so `gcc` is
/// ccache while every command line (kbuild's .cmd files, CMake's cache)
/// still says `gcc`: plain `make` and `mkt build` stay interchangeable.
pub(crate) fn search_path(ccache_dir: Option<&str>) -> String {
    let base = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    match ccache_dir {
        Some(d) => format!("{d}:{base}"),
        None => base.to_string(),
    }
}

/// `make ARGS`: the compiler is make's own `gcc` (ccache through PATH).
pub(crate) fn make_argv(args: &[&str]) -> Vec<String> {
    let mut v = vec!["make".to_string()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

impl Env {
    /// What a recipe gets besides the environment: `MKT_JOBS`.
    pub(super) fn add_recipe_vars(&mut self) {
        self.env
            .push(("MKT_JOBS".into(), self.jobs.to_string().into()));
    }

    /// `make headers` in kernel `tree` (the uapi headers, made in its
    /// usr/include; `headers_install` would need rsync in the rootfs), then
    /// binds those directories over the rootfs's /usr/include ones for the
    /// following steps. `Err(status)` when make fails.
    pub(super) fn install_headers(
        &mut self,
        tree: &Path,
        log: &mut fs::File,
        stream: bool,
    ) -> Result<Result<(), i32>, BuildError> {
        let saved = (self.layout.mounts.clone(), self.src.clone());
        self.layout.mounts.push(Mount::bind(tree, tree, false));
        self.src = tree.to_path_buf();
        let argv = vec!["make".to_string(), "-s".into(), "headers".into()];
        let _ = writeln!(log, "$ cd {}; {}", tree.display(), argv.join(" "));
        let r = self.run_logged(&argv, log, stream);
        (self.layout.mounts, self.src) = saved;
        let status = r?.status;
        if status != 0 {
            return Ok(Err(status));
        }
        let include = tree.join("usr/include");
        let rd = fs::read_dir(&include).map_err(|e| BuildError::Read(include.clone(), e))?;
        let multiarch = Path::new("/usr/include")
            .join(crate::arch::HOST.multiarch)
            .join("asm");
        let mut dirs: Vec<_> = rd
            .flatten()
            .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.file_name())
            .collect();
        dirs.sort();
        for name in dirs {
            let dst = if name == "asm"
                && self
                    .rootfs
                    .join(multiarch.strip_prefix("/").unwrap_or(&multiarch))
                    .is_dir()
            {
                multiarch.clone()
            } else {
                Path::new("/usr/include").join(&name)
            };
            self.layout
                .mounts
                .push(Mount::bind(include.join(&name), dst, true));
        }
        Ok(Ok(()))
    }

    pub(crate) fn spec(&self, argv: &[String]) -> sandbox::Spec {
        sandbox::Spec {
            layout: self.layout.clone(),
            // The host's name: kbuild bakes `hostname` into the kernel
            // (compile.h), so builds inside and outside mkt stay identical.
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "mkt".into()),
            cwd: self.src.clone(),
            argv: argv.iter().map(OsString::from).collect(),
            env: self.env.clone(),
            ids: sandbox::Ids::Own,
        }
    }

    /// Runs one step with its output appended to `log` (and copied to
    /// stderr when `stream`).
    pub(crate) fn run_logged(
        &self,
        argv: &[String],
        log: &fs::File,
        stream: bool,
    ) -> Result<sandbox::Exit, BuildError> {
        self.run_logged_with(argv, &[], log, stream)
    }

    /// [`Env::run_logged`] with `extra` variables in the environment.
    pub(crate) fn run_logged_with(
        &self,
        argv: &[String],
        extra: &[(&str, &str)],
        log: &fs::File,
        stream: bool,
    ) -> Result<sandbox::Exit, BuildError> {
        let mut spec = self.spec(argv);
        spec.env.extend(
            extra
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        let enter_err = |e| BuildError::Enter(self.rootfs.clone(), argv.join(" "), e);
        if !stream {
            let fd: OwnedFd = log
                .try_clone()
                .map_err(|e| BuildError::Write(PathBuf::from("log"), e))?
                .into();
            return sandbox::run(&spec, &sandbox::HostFs, sandbox::Output::To(&fd))
                .map_err(enter_err);
        }
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| BuildError::Create(PathBuf::from("pipe"), e.into()))?;
        let mut log_w = log
            .try_clone()
            .map_err(|e| BuildError::Write(PathBuf::from("log"), e))?;
        let tee = std::thread::spawn(move || {
            let mut r = fs::File::from(rd);
            let mut buf = [0u8; 16384];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = log_w.write_all(&buf[..n]);
                let _ = io::stderr().write_all(&buf[..n]);
            }
        });
        let r = sandbox::run(&spec, &sandbox::HostFs, sandbox::Output::To(&wr));
        drop(wr);
        let _ = tee.join();
        r.map_err(enter_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ccache_masquerade_dir_first_on_path() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        assert_eq!(ccache_dir(r), None);
        fs::create_dir_all(r.join("usr/lib/ccache")).unwrap();
        // A masquerade dir without ccache itself is not used.
        assert_eq!(ccache_dir(r), None);
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::write(r.join("usr/bin/ccache"), "").unwrap();
        assert_eq!(ccache_dir(r), Some("/usr/lib/ccache"));
        fs::create_dir_all(r.join("usr/lib64/ccache")).unwrap();
        assert_eq!(ccache_dir(r), Some("/usr/lib64/ccache"));
        assert_eq!(
            search_path(Some("/usr/lib64/ccache")),
            "/usr/lib64/ccache:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        );
        assert_eq!(
            search_path(None),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        );
        assert_eq!(make_argv(&["-j2"]), ["make", "-j2"]);
    }
}
