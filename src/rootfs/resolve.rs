//! Which rootfs a command uses: one rule for `run`, `build`, `ci` and
//! `rootfs shell`. `--rootfs`, else the setup's `rootfs`, else the config's
//! `defaults.rootfs`, else the default recipe's tree ([`recipe::DEFAULT`]).
//!
//! A value with a `/` is a directory (`./tree`, `/srv/rootfs`, `~/fs` from
//! the config); anything else is a name in the store, never a directory of
//! the current directory, and never the store's own internals (`.meta`,
//! `""`). A name with no tree yet that names a recipe is built on first
//! use.

use super::{RootfsError, builder, recipe};
use crate::config::{Config, Paths, Setup};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("rootfs {0}: not a directory")]
    NotADir(PathBuf, #[source] std::io::Error),
    #[error(
        "rootfs {0:?} is not a name in the store: names use letters, digits, '.', '_' and '-', \
         starting with a letter or digit; write a directory as a path (with a '/')"
    )]
    BadName(String),
    #[error("no rootfs {name:?} in {} (have: {known}) and no recipe of that name{hint}", .store.display())]
    NotFound {
        name: String,
        store: PathBuf,
        known: String,
        hint: String,
    },
    #[error("rootfs {0} is not built yet; run without --dry-run (or `mkt rootfs build {0}`) first")]
    WouldBuild(String),
    #[error("cannot build rootfs {0} from its recipe")]
    Build(String, #[source] Box<RootfsError>),
}

/// The value the rule picks: `--rootfs`, else the setup's, else the
/// config's, else the default recipe's name.
pub fn wanted(flag: Option<&str>, setup: Option<&Setup>, config: &Config) -> String {
    flag.map(str::to_string)
        .or_else(|| setup.and_then(|s| s.rootfs.clone()))
        .or_else(|| config.defaults.rootfs.clone())
        .unwrap_or_else(|| recipe::DEFAULT.to_string())
}

/// The config's default setup (`defaults.setup`), for commands that take
/// no SETUP argument (`build`, `ci`, `rootfs shell`).
pub(crate) fn default_setup(config: &Config) -> Option<&Setup> {
    config
        .defaults
        .setup
        .as_ref()
        .and_then(|n| config.setups.get(n))
}

/// What a rootfs value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A tree in the store: its name and directory.
    Stored(String, PathBuf),
    /// A directory given as a path (canonical).
    Dir(PathBuf),
    /// A recipe's name with no tree in the store yet.
    Recipe(String),
}

/// Looks `value` up, with no side effect.
pub fn lookup(paths: &Paths, value: &str) -> Result<Found, ResolveError> {
    if value.contains('/') {
        let p = Path::new(value);
        let c = std::fs::canonicalize(p).map_err(|e| ResolveError::NotADir(p.into(), e))?;
        if !c.is_dir() {
            return Err(ResolveError::NotADir(
                p.into(),
                std::io::Error::from(std::io::ErrorKind::NotADirectory),
            ));
        }
        return Ok(Found::Dir(c));
    }
    super::check_name(value).map_err(|_| ResolveError::BadName(value.into()))?;
    let stored = paths.rootfs_dir.join(value);
    // The store's own entry, not a symlink out of it.
    if stored.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return Ok(Found::Stored(value.into(), stored));
    }
    if recipe::exists(value, &builder::user_recipes(paths)) {
        return Ok(Found::Recipe(value.into()));
    }
    let known: Vec<String> = std::fs::read_dir(&paths.rootfs_dir)
        .map(|d| {
            let mut v: Vec<String> = d
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    let hint = if Path::new(value).is_dir() {
        format!("; for the directory {value} here, write ./{value}")
    } else {
        String::new()
    };
    Err(ResolveError::NotFound {
        name: value.into(),
        store: paths.rootfs_dir.clone(),
        known: if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        },
        hint,
    })
}

/// How a missing recipe tree is built on first use.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FirstUse {
    /// Refuse to build (`--dry-run`): [`ResolveError::WouldBuild`].
    pub dry_run: bool,
    pub quiet: bool,
    pub verbose: bool,
}

/// Looks `value` up and builds a recipe's tree when it is not in the store
/// yet; the result is never [`Found::Recipe`].
pub(crate) fn resolve(paths: &Paths, value: &str, first: FirstUse) -> Result<Found, ResolveError> {
    let name = match lookup(paths, value)? {
        Found::Recipe(name) => name,
        found => return Ok(found),
    };
    if first.dry_run {
        return Err(ResolveError::WouldBuild(name));
    }
    eprintln!(
        "mkt: no rootfs {name} in {}: building it from its recipe (once; `mkt rootfs build {name}`)",
        paths.rootfs_dir.display()
    );
    let built = builder::build(
        paths,
        &builder::BuildOptions {
            recipe: name.clone(),
            name: None,
            force: false,
            quiet: first.quiet,
            verbose: first.verbose,
        },
        &AtomicBool::new(false),
    );
    match built {
        Ok(b) => Ok(Found::Stored(name, b.path)),
        // Another mkt built it meanwhile: use that tree.
        Err(RootfsError::Exists { path, .. }) => Ok(Found::Stored(name, path)),
        Err(e) => Err(ResolveError::Build(name, Box::new(e))),
    }
}

impl Found {
    /// The tree's directory (a recipe's is where it would be stored).
    pub fn path(&self, paths: &Paths) -> PathBuf {
        match self {
            Found::Stored(_, p) | Found::Dir(p) => p.clone(),
            Found::Recipe(n) => paths.rootfs_dir.join(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(home: &Path) -> Paths {
        let env = |k: &str| match k {
            "HOME" => Some(home.to_string_lossy().into_owned()),
            _ => None,
        };
        Paths::from_env(env, 1000, None).unwrap()
    }

    #[test]
    fn names_are_store_names_and_paths_have_a_slash() {
        let home = tempfile::tempdir().unwrap();
        let p = paths(home.path());
        std::fs::create_dir_all(p.rootfs_dir.join("deb")).unwrap();
        std::fs::create_dir_all(p.rootfs_dir.join(".meta")).unwrap();
        assert_eq!(
            lookup(&p, "deb").unwrap(),
            Found::Stored("deb".into(), p.rootfs_dir.join("deb"))
        );
        let dir = home.path().join("tree");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(
            lookup(&p, dir.to_str().unwrap()).unwrap(),
            Found::Dir(std::fs::canonicalize(&dir).unwrap())
        );
        // The store's internals are not trees.
        for bad in ["", ".meta", ".", ".."] {
            let e = lookup(&p, bad).unwrap_err();
            assert!(matches!(e, ResolveError::BadName(_)), "{bad:?}: {e}");
        }
        // A shipped recipe's name with no tree yet.
        assert_eq!(
            lookup(&p, recipe::DEFAULT).unwrap(),
            Found::Recipe(recipe::DEFAULT.into())
        );
        let e = lookup(&p, "fc99").unwrap_err().to_string();
        assert!(
            e.contains("no rootfs \"fc99\"") && e.contains("have: deb"),
            "{e}"
        );
        let e = lookup(&p, "/nonexistent/x").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x: not a directory"), "{e}");
    }

    #[test]
    fn the_rule_flag_setup_config_default() {
        let mut c = Config::default();
        assert_eq!(wanted(None, None, &c), recipe::DEFAULT);
        c.defaults.rootfs = Some("cfg".into());
        assert_eq!(wanted(None, None, &c), "cfg");
        let s = Setup {
            rootfs: Some("set".into()),
            ..Default::default()
        };
        assert_eq!(wanted(None, Some(&s), &c), "set");
        assert_eq!(wanted(Some("flag"), Some(&s), &c), "flag");
        c.setups.insert("a".into(), s);
        assert!(default_setup(&c).is_none());
        c.defaults.setup = Some("a".into());
        assert_eq!(wanted(None, default_setup(&c), &c), "set");
    }
}
