//! The git side of `mkt ci`, through the `git` program: the revision to
//! check, what it changed, and the scratch tree it is checked out in (a
//! repository of its own that borrows the source repository's objects
//! through `objects/info/alternates`, so nothing is copied and the
//! developer's working tree and index are never touched).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::CiError;

/// `git ARGS` in `dir`, its stdout on success. Variables a hook may have set
/// are cleared so they cannot redirect git to another repository.
pub fn git(dir: &Path, args: &[&str]) -> Result<String, CiError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .output()
        .map_err(|e| CiError::Spawn("git".into(), e))?;
    if !out.status.success() {
        return Err(CiError::Git {
            dir: dir.to_path_buf(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The source repository.
#[derive(Debug, Clone)]
pub struct Source {
    /// The top of its working tree (or the bare repository).
    pub top: PathBuf,
    /// Its object store (the common one, for worktrees).
    pub objects: PathBuf,
}

pub fn open(dir: &Path) -> Result<Source, CiError> {
    let common = git(
        dir,
        &["rev-parse", "--path-format=absolute", "--git-common-dir"],
    )?;
    let top = git(dir, &["rev-parse", "--show-toplevel"])
        .map(|s| PathBuf::from(s.trim()))
        .unwrap_or_else(|_| dir.to_path_buf());
    Ok(Source {
        top,
        objects: PathBuf::from(common.trim()).join("objects"),
    })
}

/// The commit REV names, as a full hash.
pub(crate) fn resolve(dir: &Path, rev: &str) -> Result<String, CiError> {
    let spec = format!("{rev}^{{commit}}");
    git(
        dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            &spec,
        ],
    )
    .map(|s| s.trim().to_string())
    .map_err(|_| CiError::BadRev(rev.to_string(), dir.to_path_buf()))
}

/// The first parent of `commit`, `None` for a root commit.
pub fn parent(dir: &Path, commit: &str) -> Result<Option<String>, CiError> {
    let spec = format!("{commit}^1^{{commit}}");
    match git(
        dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            &spec,
        ],
    ) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(_) => Ok(None),
    }
}

pub(crate) fn subject(dir: &Path, commit: &str) -> Result<String, CiError> {
    Ok(git(dir, &["log", "-1", "--format=%s", commit])?
        .trim()
        .to_string())
}

/// Files changed between `parent` (the empty tree when `None`) and
/// `commit`, renames as a delete and an add.
pub(crate) fn changed_files(
    dir: &Path,
    parent: Option<&str>,
    commit: &str,
) -> Result<Vec<String>, CiError> {
    let out = match parent {
        Some(p) => git(dir, &["diff", "--name-only", "--no-renames", p, commit])?,
        None => git(
            dir,
            &["show", "--name-only", "--format=", "--no-renames", commit],
        )?,
    };
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// `git diff -U0` between the two revisions (for the added lines).
pub(crate) fn diff_u0(dir: &Path, parent: Option<&str>, commit: &str) -> Result<String, CiError> {
    match parent {
        Some(p) => git(
            dir,
            &["diff", "-U0", "--no-renames", "--no-color", p, commit],
        ),
        None => git(dir, &["show", "-U0", "--format=", "--no-color", commit]),
    }
}

/// The object stores `objects` borrows from, recursively (so each can be
/// shown inside the rootfs, where git may run).
pub(crate) fn alternates_chain(objects: &Path) -> Vec<PathBuf> {
    let mut out = vec![objects.to_path_buf()];
    let mut i = 0;
    while i < out.len() && out.len() < 16 {
        let f = out[i].join("info/alternates");
        if let Ok(text) = std::fs::read_to_string(&f) {
            for l in text.lines().map(str::trim) {
                if l.is_empty() || l.starts_with('#') {
                    continue;
                }
                let p = if Path::new(l).is_absolute() {
                    PathBuf::from(l)
                } else {
                    out[i].join(l)
                };
                if let Ok(c) = std::fs::canonicalize(&p)
                    && !out.contains(&c)
                {
                    out.push(c);
                }
            }
        }
        i += 1;
    }
    out
}

/// Makes `tree` a repository borrowing `src`'s objects (kept across runs,
/// so builds there stay incremental).
pub(crate) fn prepare_scratch(tree: &Path, src: &Source) -> Result<(), CiError> {
    if !tree.join(".git").is_dir() {
        std::fs::create_dir_all(tree).map_err(|e| CiError::Create(tree.into(), e))?;
        git(tree, &["init", "-q"])?;
        // Objects live in the source repository: never gc or prune here.
        git(tree, &["config", "gc.auto", "0"])?;
        git(tree, &["config", "core.fsmonitor", "false"])?;
    }
    let alt = tree.join(".git/objects/info/alternates");
    let text = format!("{}\n", src.objects.display());
    if std::fs::read_to_string(&alt).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&alt, text).map_err(|e| CiError::Write(alt.clone(), e))?;
    }
    Ok(())
}

/// Checks `commit` out in the scratch tree, detached; files the last run
/// built stay (untracked), tracked files become exactly the commit's.
pub fn checkout(tree: &Path, commit: &str) -> Result<(), CiError> {
    git(
        tree,
        &[
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "-q",
            "--force",
            "--detach",
            commit,
        ],
    )?;
    Ok(())
}

/// `git format-patch` of `commit` (against its first parent), as text.
pub(crate) fn format_patch(tree: &Path, commit: &str) -> Result<String, CiError> {
    git(
        tree,
        &[
            "format-patch",
            "-1",
            "--stdout",
            "--no-signature",
            "--no-color",
            commit,
        ],
    )
}

/// `.c` files that include `inc` (e.g. `linux/skbuff.h`) at `commit`.
pub(crate) fn includers(tree: &Path, commit: &str, inc: &str) -> Vec<String> {
    let pat = format!("#include [<\"]{}[>\"]", regex_escape(inc));
    git(tree, &["grep", "-l", "-E", "-e", &pat, commit, "--", "*.c"])
        .map(|out| {
            out.lines()
                // `COMMIT:path`
                .filter_map(|l| l.split_once(':').map(|(_, p)| p.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc = ".+*?()[]{}|^$\\".contains(c);
            esc.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_include_paths() {
        assert_eq!(regex_escape("linux/a.b+c.h"), "linux/a\\.b\\+c\\.h");
    }
}
