//! Rootfs recipes: `rootfs-recipes/NAME.toml`, a base (a Debian/Ubuntu
//! bootstrap or an OCI image), packages, files and setup commands.
//!
//! The recipes shipped in `rootfs-recipes/` are compiled into mkt, so an
//! installed binary can build them anywhere; a file in
//! `$XDG_CONFIG_HOME/mkt/recipes/NAME.toml` overrides a shipped one, and a
//! path (`./mine.toml`) names any file.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The recipes compiled in: (name, text).
pub(crate) const SHIPPED: &[(&str, &str)] = &[
    (
        "debian-bookworm",
        include_str!("../../rootfs-recipes/debian-bookworm.toml"),
    ),
    (
        "ubuntu-24.04",
        include_str!("../../rootfs-recipes/ubuntu-24.04.toml"),
    ),
    ("fc30", include_str!("../../rootfs-recipes/fc30.toml")),
    ("fc41", include_str!("../../rootfs-recipes/fc41.toml")),
];

/// What `mkt run` uses with no --rootfs and no config: the recipe that can
/// be built where only Debian's mirrors are reachable, with a kernel inside.
pub const DEFAULT: &str = "debian-bookworm";

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("no recipe named {name} (shipped: {shipped}; or give a path to a .toml file)")]
    Unknown { name: String, shipped: String },
}

/// A parsed recipe.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// One line for `mkt rootfs list`.
    #[serde(default)]
    pub description: String,
    pub base: Base,
    /// Installed in the same step as the base (Debian) or by `install`.
    #[serde(default)]
    pub packages: Vec<String>,
    /// How to install `packages` on an image base: a shell command with
    /// `{packages}` (default: by the image's package manager, found in it).
    #[serde(default)]
    pub install: Option<String>,
    /// Files written into the tree (absolute path inside → content), mode
    /// 0644 owned by root; `setup` can change that.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Shell commands run in the tree as its root, with the host network,
    /// after the packages and files.
    #[serde(default)]
    pub setup: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    /// An OCI image (`fedora:41`): pulled, then `install` runs inside.
    #[serde(default)]
    pub image: Option<String>,
    /// A Debian or Ubuntu suite bootstrapped with mmdebstrap (`bookworm`).
    #[serde(default)]
    pub suite: Option<String>,
    #[serde(default)]
    pub mirror: Option<String>,
    #[serde(default)]
    pub components: Vec<String>,
    /// mmdebstrap's variant [default: apt: Essential + apt].
    #[serde(default)]
    pub variant: Option<String>,
    /// A keyring file for the suite's signatures (Ubuntu on Debian hosts).
    #[serde(default)]
    pub keyring: Option<String>,
    /// Extra apt options (mmdebstrap `--aptopt`), e.g. a proxy.
    #[serde(default)]
    pub aptopt: Vec<String>,
}

/// Where a recipe came from, for messages and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub name: String,
    /// `shipped` or the file's path.
    pub origin: String,
    pub recipe: Recipe,
    pub text: String,
}

impl Recipe {
    pub fn parse(text: &str, origin: &str) -> Result<Recipe, RecipeError> {
        let r: Recipe = toml::from_str(text).map_err(|e| RecipeError::Parse {
            origin: origin.into(),
            message: e.to_string().trim().to_string(),
        })?;
        let perr = |message: String| RecipeError::Parse {
            origin: origin.into(),
            message,
        };
        match (&r.base.image, &r.base.suite) {
            (Some(_), Some(_)) => {
                return Err(perr("[base] has both `image` and `suite`: give one".into()));
            }
            (None, None) => {
                return Err(perr(
                    "[base] needs `image` (an OCI image) or `suite` (a Debian/Ubuntu suite)".into(),
                ));
            }
            _ => {}
        }
        if r.base.image.is_some()
            && (r.base.mirror.is_some()
                || r.base.variant.is_some()
                || !r.base.components.is_empty())
        {
            return Err(perr(
                "[base] `mirror`, `variant` and `components` are for a `suite`, not an `image`"
                    .into(),
            ));
        }
        for p in r.files.keys() {
            let path = Path::new(p);
            if !path.is_absolute()
                || path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(perr(format!(
                    "[files] key {p:?} must be an absolute path without `..`"
                )));
            }
        }
        for p in &r.packages {
            if p.is_empty() || p.starts_with('-') || p.contains(char::is_whitespace) {
                return Err(perr(format!("bad package name {p:?} in `packages`")));
            }
        }
        if let Some(i) = &r.install
            && !i.contains("{packages}")
        {
            return Err(perr("`install` must contain {packages}".into()));
        }
        Ok(r)
    }

    /// A digest of what the base step makes (base + packages for a suite,
    /// the image for an image base): an unchanged recipe reuses it.
    pub fn base_key(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"mkt-recipe-base-v1\0");
        h.update(serde_json::to_vec(&self.base).expect("serialisable"));
        if self.base.suite.is_some() {
            h.update(serde_json::to_vec(&self.packages).expect("serialisable"));
        }
        crate::oci::hex(&h.finalize())
    }

    /// A digest of the whole recipe.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(self).expect("serialisable"));
        format!("sha256:{}", crate::oci::hex(&h.finalize()))
    }

    /// The command that installs `packages` on an image base, or `None`
    /// when there is nothing to install. `pm` is the package manager found
    /// in the tree when the recipe does not say.
    pub fn install_command(&self, pm: Option<&str>) -> Option<Result<String, String>> {
        if self.packages.is_empty() || self.base.suite.is_some() {
            return None;
        }
        let list = self.packages.join(" ");
        let template = match (&self.install, pm) {
            (Some(i), _) => i.clone(),
            (None, Some("dnf")) => {
                "dnf -y install --setopt=install_weak_deps=False {packages} && dnf clean all".into()
            }
            (None, Some("yum")) => "yum -y install {packages} && yum clean all".into(),
            (None, Some("apt-get")) => "apt-get update && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y --no-install-recommends {packages} && apt-get clean"
                .into(),
            (None, Some("apk")) => "apk add --no-cache {packages}".into(),
            (None, Some("zypper")) => "zypper --non-interactive install {packages}".into(),
            (None, _) => {
                return Some(Err(
                    "no package manager (dnf, yum, apt-get, apk, zypper) found in the image; \
                     set `install` in the recipe"
                        .into(),
                ));
            }
        };
        Some(Ok(template.replace("{packages}", &list)))
    }

    /// The mmdebstrap command line (without the output path) for a suite base.
    pub fn mmdebstrap_args(&self, mode: &str, out: &Path) -> Vec<String> {
        let b = &self.base;
        let mut a = vec![
            format!("--mode={mode}"),
            format!("--variant={}", b.variant.as_deref().unwrap_or("apt")),
            "--format=tar".into(),
        ];
        if !b.components.is_empty() {
            a.push(format!("--components={}", b.components.join(",")));
        }
        if !self.packages.is_empty() {
            a.push(format!("--include={}", self.packages.join(",")));
        }
        if let Some(k) = &b.keyring {
            a.push(format!("--keyring={k}"));
        }
        // A download that fails once (a mirror's hiccup) is tried again,
        // as apt does not by default; the recipe's own options come after
        // and win.
        a.push("--aptopt=Acquire::Retries \"3\"".into());
        for o in &b.aptopt {
            a.push(format!("--aptopt={o}"));
        }
        a.push(b.suite.clone().unwrap_or_default());
        a.push(out.display().to_string());
        if let Some(m) = &b.mirror {
            a.push(m.clone());
        }
        a
    }
}

/// Finds a recipe: a path (anything with a `/` or ending in `.toml`), else
/// the user's recipes dir, else the shipped ones.
pub fn find(name_or_path: &str, user_dir: &Path) -> Result<Found, RecipeError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.into(),
            source,
        })
    };
    if name_or_path.contains('/') || name_or_path.ends_with(".toml") {
        let path = Path::new(name_or_path);
        let text = read(path)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "recipe".into());
        let origin = path.display().to_string();
        let recipe = Recipe::parse(&text, &origin)?;
        return Ok(Found {
            name,
            origin,
            recipe,
            text,
        });
    }
    let user = user_dir.join(format!("{name_or_path}.toml"));
    if user.is_file() {
        let text = read(&user)?;
        let origin = user.display().to_string();
        let recipe = Recipe::parse(&text, &origin)?;
        return Ok(Found {
            name: name_or_path.into(),
            origin,
            recipe,
            text,
        });
    }
    match SHIPPED.iter().find(|(n, _)| *n == name_or_path) {
        Some((n, text)) => {
            let origin = format!("rootfs-recipes/{n}.toml (shipped)");
            let recipe = Recipe::parse(text, &origin)?;
            Ok(Found {
                name: (*n).into(),
                origin,
                recipe,
                text: (*text).into(),
            })
        }
        None => Err(RecipeError::Unknown {
            name: name_or_path.into(),
            shipped: SHIPPED
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Is there a recipe of this name (user's or shipped)?
pub fn exists(name: &str, user_dir: &Path) -> bool {
    user_dir.join(format!("{name}.toml")).is_file() || SHIPPED.iter().any(|(n, _)| *n == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_recipes_parse() {
        for (name, text) in SHIPPED {
            let r = Recipe::parse(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!r.description.is_empty(), "{name}");
        }
        let d = Recipe::parse(SHIPPED[0].1, "d").unwrap();
        assert_eq!(d.base.suite.as_deref(), Some("bookworm"));
        assert!(d.packages.iter().any(|p| p == "linux-image-cloud-amd64"));
        let f = Recipe::parse(SHIPPED[3].1, "f").unwrap();
        assert_eq!(f.base.image.as_deref(), Some("fedora:41"));
    }

    #[test]
    fn bad_recipes_name_the_problem() {
        let cases = [
            ("", "missing field `base`"),
            ("[base]\n", "needs `image`"),
            ("[base]\nimage='a'\nsuite='b'\n", "both `image` and `suite`"),
            ("[base]\nimage='a'\nmirror='m'\n", "are for a `suite`"),
            ("[base]\nsuite='b'\nwhat=1\n", "unknown field `what`"),
            (
                "[base]\nsuite='b'\n[files]\n'etc/x'='y'\n",
                "\"etc/x\" must be an absolute",
            ),
            (
                "[base]\nsuite='b'\n[files]\n'/a/../x'='y'\n",
                "without `..`",
            ),
            (
                "packages=['-x']\n[base]\nsuite='b'\n",
                "bad package name \"-x\"",
            ),
            (
                "install='dnf'\n[base]\nimage='a'\n",
                "must contain {packages}",
            ),
        ];
        for (text, want) in cases {
            let e = Recipe::parse(text, "t.toml").unwrap_err().to_string();
            assert!(e.starts_with("recipe t.toml: "), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn base_key_ignores_setup_but_not_packages() {
        let a = Recipe::parse("packages=['a']\nsetup=['x']\n[base]\nsuite='s'\n", "a").unwrap();
        let b = Recipe::parse("packages=['a']\nsetup=['y']\n[base]\nsuite='s'\n", "b").unwrap();
        let c = Recipe::parse("packages=['b']\n[base]\nsuite='s'\n", "c").unwrap();
        assert_eq!(a.base_key(), b.base_key());
        assert_ne!(a.base_key(), c.base_key());
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn commands() {
        let r = Recipe::parse(
            "packages=['a','b']\n[base]\nsuite='bookworm'\nmirror='http://m/debian'\ncomponents=['main','contrib']\n",
            "r",
        )
        .unwrap();
        assert_eq!(
            r.mmdebstrap_args("unshare", Path::new("/o.tar")),
            [
                "--mode=unshare",
                "--variant=apt",
                "--format=tar",
                "--components=main,contrib",
                "--include=a,b",
                "--aptopt=Acquire::Retries \"3\"",
                "bookworm",
                "/o.tar",
                "http://m/debian"
            ]
        );
        assert!(r.install_command(Some("dnf")).is_none());
        let i = Recipe::parse("packages=['a','b']\n[base]\nimage='x'\n", "i").unwrap();
        assert_eq!(
            i.install_command(Some("apk")),
            Some(Ok("apk add --no-cache a b".into()))
        );
        assert!(i.install_command(None).unwrap().is_err());
        let j = Recipe::parse(
            "packages=['a']\ninstall='pm get {packages}'\n[base]\nimage='x'\n",
            "j",
        )
        .unwrap();
        assert_eq!(j.install_command(None), Some(Ok("pm get a".into())));
    }

    #[test]
    fn find_prefers_paths_then_user_then_shipped() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(find("fc41", d.path()).unwrap().name, "fc41");
        std::fs::write(
            d.path().join("fc41.toml"),
            "description='mine'\n[base]\nimage='x'\n",
        )
        .unwrap();
        assert_eq!(find("fc41", d.path()).unwrap().recipe.description, "mine");
        let p = d.path().join("other.toml");
        std::fs::write(&p, "[base]\nsuite='s'\n").unwrap();
        let f = find(p.to_str().unwrap(), Path::new("/nonexistent")).unwrap();
        assert_eq!(f.name, "other");
        let e = find("nope", d.path()).unwrap_err().to_string();
        assert!(
            e.contains("no recipe named nope") && e.contains("debian-bookworm"),
            "{e}"
        );
    }
}
