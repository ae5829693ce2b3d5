//! Where mkt keeps its files on this host ([`Paths`]), `~`/`$HOME`
//! expansion of configured paths, and the private runtime directory.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{Config, ConfigError};

pub(super) fn expand_in_place(p: &mut PathBuf, home: &Path) {
    // Values come from TOML strings, so they are always valid UTF-8.
    let expanded = expand_home(&p.to_string_lossy(), home);
    *p = expanded;
}

/// Expands a leading `~` or `~/`, and `$HOME` / `${HOME}` anywhere, with
/// `home`. `~user` and other variables are left as written.
pub fn expand_home(value: &str, home: &Path) -> PathBuf {
    // "/home/u/" + "/x" must not give a double slash; "/" stays "/".
    let home_str = home.as_os_str().to_string_lossy();
    let trimmed = home_str.trim_end_matches('/');
    let home_os: OsString = if trimmed.len() == home_str.len() {
        home.as_os_str().to_owned()
    } else if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    };
    let mut out = OsString::new();
    let mut rest = value;
    if value == "~" {
        return PathBuf::from(home_os);
    } else if let Some(r) = value.strip_prefix("~/") {
        out.push(&home_os);
        if home_os != "/" {
            out.push("/");
        }
        rest = r;
    }
    while let Some(i) = rest.find('$') {
        out.push(&rest[..i]);
        let after = &rest[i + 1..];
        let plain = after
            .strip_prefix("HOME")
            .filter(|r| !r.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'));
        if let Some(r) = after.strip_prefix("{HOME}").or(plain) {
            out.push(&home_os);
            rest = r;
        } else {
            out.push("$");
            rest = after;
        }
    }
    out.push(rest);
    PathBuf::from(out)
}

/// Where mkt keeps things on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The user's home, used for `~` expansion in the config.
    pub home: PathBuf,
    /// The config file: `--config`/`MKT_CONFIG`, else
    /// `$XDG_CONFIG_HOME/mkt/config.toml`.
    pub config_file: PathBuf,
    /// `$XDG_DATA_HOME/mkt` (`~/.local/share/mkt`).
    pub data_dir: PathBuf,
    /// `data_dir/rootfs`: one directory per root filesystem.
    pub rootfs_dir: PathBuf,
    /// `data_dir/blobs`: downloaded images and other content.
    pub blob_dir: PathBuf,
    /// `$XDG_RUNTIME_DIR/mkt`, else `/tmp/mkt-$UID`: sockets and pid files.
    pub runtime_dir: PathBuf,
    /// `$XDG_STATE_HOME/mkt` (`~/.local/state/mkt`).
    pub state_dir: PathBuf,
    /// `defaults.logs`, else `state_dir/logs`.
    pub logs_dir: PathBuf,
    /// `defaults.ccache`, else `$XDG_CACHE_HOME/mkt/ccache`
    /// (`~/.cache/mkt/ccache`).
    pub ccache_dir: PathBuf,
    /// `[limits]` of a pull, in bytes.
    pub limits: crate::oci::Limits,
}

impl Paths {
    /// Computes the paths from an environment lookup (`get("HOME")`, ...),
    /// the user id (for the runtime fallback) and the `--config` override.
    /// Empty or relative `XDG_*` values are ignored, as the XDG spec says.
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
        uid: u32,
        config_override: Option<PathBuf>,
    ) -> Result<Paths, ConfigError> {
        let home = get("HOME")
            .map(PathBuf::from)
            .filter(|h| h.is_absolute())
            .ok_or(ConfigError::NoHome)?;
        let xdg = |var: &str| get(var).map(PathBuf::from).filter(|p| p.is_absolute());
        let xdg_or = |var: &str, fallback: &str| xdg(var).unwrap_or_else(|| home.join(fallback));
        let config_file = config_override
            .unwrap_or_else(|| xdg_or("XDG_CONFIG_HOME", ".config").join("mkt/config.toml"));
        let data_dir = xdg_or("XDG_DATA_HOME", ".local/share").join("mkt");
        let state_dir = xdg_or("XDG_STATE_HOME", ".local/state").join("mkt");
        let runtime_dir = match xdg("XDG_RUNTIME_DIR") {
            Some(d) => d.join("mkt"),
            None => PathBuf::from(format!("/tmp/mkt-{uid}")),
        };
        Ok(Paths {
            config_file,
            rootfs_dir: data_dir.join("rootfs"),
            blob_dir: data_dir.join("blobs"),
            runtime_dir,
            logs_dir: state_dir.join("logs"),
            ccache_dir: xdg_or("XDG_CACHE_HOME", ".cache").join("mkt/ccache"),
            data_dir,
            state_dir,
            home,
            limits: crate::oci::Limits::default(),
        })
    }

    /// Applies the config's `defaults.logs`, `defaults.ccache` and `[limits]`.
    pub fn with_config(mut self, cfg: &Config) -> Paths {
        self.limits = cfg.limits.bytes();
        if let Some(logs) = &cfg.defaults.logs {
            self.logs_dir = logs.clone();
        }
        if let Some(ccache) = &cfg.defaults.ccache {
            self.ccache_dir = ccache.clone();
        }
        self
    }

    /// `logs/{build,ci,run,rootfs}`.
    pub fn log_subdirs(&self) -> [PathBuf; 4] {
        ["build", "ci", "run", "rootfs"].map(|d| self.logs_dir.join(d))
    }

    /// Creates the runtime directory with mode 0700, tightens the mode of an
    /// existing one, and refuses one that is a symlink, not a directory, or
    /// owned by another user (it may live in a shared /tmp).
    pub fn ensure_runtime_dir(&self) -> Result<(), ConfigError> {
        ensure_private_dir(&self.runtime_dir, nix::unistd::geteuid().as_raw())
    }
}

fn ensure_private_dir(path: &Path, uid: u32) -> Result<(), ConfigError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let io_err = |action, source| ConfigError::RuntimeDir {
        path: path.to_path_buf(),
        action,
        source,
    };
    let unsafe_dir = |reason: String| ConfigError::UnsafeRuntimeDir {
        path: path.to_path_buf(),
        reason,
    };
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create", e)),
    }
    // lstat: a symlink planted in /tmp must not redirect us.
    let meta = fs::symlink_metadata(path).map_err(|e| io_err("inspect", e))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir("it is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("it is not a directory".into()));
    }
    if meta.uid() != uid {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not uid {uid}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o7777 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("chmod", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{finishes, parse};
    use std::collections::HashMap;

    const HOME: &str = "/home/u";

    #[test]
    fn expands_tilde_and_home() {
        let h = Path::new(HOME);
        assert_eq!(expand_home("~", h), PathBuf::from("/home/u"));
        assert_eq!(expand_home("~/src", h), PathBuf::from("/home/u/src"));
        assert_eq!(
            expand_home("$HOME/a/$HOME", h),
            PathBuf::from("/home/u/a//home/u")
        );
        assert_eq!(
            expand_home("/x/${HOME}/y", h),
            PathBuf::from("/x//home/u/y")
        );
        // Only the HOME variable, and only the whole name.
        assert_eq!(
            expand_home("$HOMEDIR/$USER", h),
            PathBuf::from("$HOMEDIR/$USER")
        );
        assert_eq!(expand_home("~bob/x", h), PathBuf::from("~bob/x"));
        assert_eq!(expand_home("a~/b", h), PathBuf::from("a~/b"));
        assert_eq!(expand_home("cost$", h), PathBuf::from("cost$"));
        // A trailing slash on HOME does not double up.
        assert_eq!(
            expand_home("~/x", Path::new("/home/u/")),
            PathBuf::from("/home/u/x")
        );
        assert_eq!(expand_home("~/x", Path::new("/")), PathBuf::from("/x"));
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn paths_without_xdg() {
        let p = Paths::from_env(env(&[("HOME", HOME)]), 1000, None).unwrap();
        assert_eq!(p.home, PathBuf::from(HOME));
        assert_eq!(
            p.config_file,
            PathBuf::from("/home/u/.config/mkt/config.toml")
        );
        assert_eq!(p.data_dir, PathBuf::from("/home/u/.local/share/mkt"));
        assert_eq!(
            p.rootfs_dir,
            PathBuf::from("/home/u/.local/share/mkt/rootfs")
        );
        assert_eq!(p.blob_dir, PathBuf::from("/home/u/.local/share/mkt/blobs"));
        assert_eq!(p.runtime_dir, PathBuf::from("/tmp/mkt-1000"));
        assert_eq!(p.state_dir, PathBuf::from("/home/u/.local/state/mkt"));
        assert_eq!(p.logs_dir, PathBuf::from("/home/u/.local/state/mkt/logs"));
        assert_eq!(p.ccache_dir, PathBuf::from("/home/u/.cache/mkt/ccache"));
        assert_eq!(
            p.log_subdirs()[3],
            PathBuf::from("/home/u/.local/state/mkt/logs/rootfs")
        );
    }

    #[test]
    fn paths_with_xdg() {
        let vars = [
            ("HOME", HOME),
            ("XDG_CONFIG_HOME", "/cfg"),
            ("XDG_DATA_HOME", "/data"),
            ("XDG_STATE_HOME", "/state"),
            ("XDG_CACHE_HOME", "/cache"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ];
        let p = Paths::from_env(env(&vars), 1000, None).unwrap();
        assert_eq!(p.config_file, PathBuf::from("/cfg/mkt/config.toml"));
        assert_eq!(p.data_dir, PathBuf::from("/data/mkt"));
        assert_eq!(p.state_dir, PathBuf::from("/state/mkt"));
        assert_eq!(p.ccache_dir, PathBuf::from("/cache/mkt/ccache"));
        assert_eq!(p.runtime_dir, PathBuf::from("/run/user/1000/mkt"));
        let p = Paths::from_env(env(&vars), 1000, Some("/o.toml".into())).unwrap();
        assert_eq!(p.config_file, PathBuf::from("/o.toml"));
    }

    #[test]
    fn paths_ignore_relative_and_empty_xdg() {
        let vars = [
            ("HOME", HOME),
            ("XDG_CONFIG_HOME", "cfg"),
            ("XDG_DATA_HOME", ""),
            ("XDG_RUNTIME_DIR", "run"),
        ];
        let p = Paths::from_env(env(&vars), 42, None).unwrap();
        assert_eq!(
            p.config_file,
            PathBuf::from("/home/u/.config/mkt/config.toml")
        );
        assert_eq!(p.data_dir, PathBuf::from("/home/u/.local/share/mkt"));
        assert_eq!(p.runtime_dir, PathBuf::from("/tmp/mkt-42"));
    }

    #[test]
    fn paths_need_an_absolute_home() {
        for vars in [&[][..], &[("HOME", "")], &[("HOME", "rel")]] {
            assert!(matches!(
                Paths::from_env(env(vars), 0, None),
                Err(ConfigError::NoHome)
            ));
        }
    }

    #[test]
    fn paths_take_logs_and_ccache_from_config() {
        let cfg = parse("[defaults]\nlogs = \"~/l\"\nccache = \"/cc\"\n").unwrap();
        let p = Paths::from_env(env(&[("HOME", HOME)]), 0, None)
            .unwrap()
            .with_config(&cfg);
        assert_eq!(p.logs_dir, PathBuf::from("/home/u/l"));
        assert_eq!(p.ccache_dir, PathBuf::from("/cc"));
        assert_eq!(p.log_subdirs()[0], PathBuf::from("/home/u/l/build"));
    }

    #[test]
    fn runtime_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let dir = tmp.path().join("rt");
        ensure_private_dir(&dir, uid).unwrap();
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir, uid).unwrap();
        assert_eq!(mode(&dir), 0o700);

        let err = ensure_private_dir(&dir, uid.wrapping_add(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&dir.display().to_string()) && err.contains("owned by uid"),
            "{err}"
        );

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = ensure_private_dir(&link, uid).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");

        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(
            ensure_private_dir(&file, uid)
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
    }

    #[test]
    fn a_lone_dollar_sign_is_kept_and_expansion_ends() {
        let out = finishes(|| expand_home("a$b$HOME$", Path::new(HOME)));
        assert_eq!(out.as_os_str(), "a$b/home/u$");
        let out = finishes(|| expand_home("$$HOME", Path::new(HOME)));
        assert_eq!(out.as_os_str(), "$/home/u");
    }

    #[test]
    fn a_trailing_slash_on_home_is_dropped_from_every_expansion() {
        // As strings: PathBuf's == ignores doubled and trailing slashes.
        let h = Path::new("/home/u/");
        assert_eq!(expand_home("~", h).as_os_str(), "/home/u");
        assert_eq!(expand_home("~/x", h).as_os_str(), "/home/u/x");
        assert_eq!(expand_home("$HOME", h).as_os_str(), "/home/u");
        assert_eq!(expand_home("/a/${HOME}", h).as_os_str(), "/a//home/u");
        assert_eq!(expand_home("~/x", Path::new("/")).as_os_str(), "/x");
        assert_eq!(expand_home("~", Path::new("///")).as_os_str(), "/");
    }

    #[test]
    fn ensure_runtime_dir_makes_a_private_directory_and_needs_its_parent() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let paths = |xdg: &Path| {
            let xdg = xdg.to_str().unwrap().to_string();
            Paths::from_env(
                move |k| match k {
                    "HOME" => Some(HOME.into()),
                    "XDG_RUNTIME_DIR" => Some(xdg.clone()),
                    _ => None,
                },
                1000,
                None,
            )
            .unwrap()
        };
        let p = paths(tmp.path());
        p.ensure_runtime_dir().unwrap();
        let meta = fs::symlink_metadata(&p.runtime_dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        p.ensure_runtime_dir().unwrap();

        let p = paths(&tmp.path().join("gone"));
        let err = p.ensure_runtime_dir().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot create runtime directory {}",
                p.runtime_dir.display()
            )
        );
    }

    #[test]
    fn an_already_private_runtime_dir_is_left_untouched() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let dir = tmp.path().join("rt");
        ensure_private_dir(&dir, uid).unwrap();
        let ctime = |p: &Path| {
            let m = fs::symlink_metadata(p).unwrap();
            (m.ctime(), m.ctime_nsec())
        };
        let before = ctime(&dir);
        // Longer than the kernel's coarse timestamp tick: a chmod, even to
        // the same mode, would move ctime.
        std::thread::sleep(std::time::Duration::from_millis(50));
        ensure_private_dir(&dir, uid).unwrap();
        assert_eq!(ctime(&dir), before);
    }
}
