//! Image references as users write them (`fedora:41`, `quay.io/x/y@sha256:…`,
//! `127.0.0.1:5000/a/b:t`), normalised the way Docker does.

use std::fmt;

/// Docker Hub's name in references and its API host.
pub(crate) const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry as named in references: `docker.io`, `quay.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path: `library/fedora`.
    pub repository: String,
    /// Tag, when given (or `latest` when neither tag nor digest was).
    pub tag: Option<String>,
    /// `sha256:<hex>`, when given; it wins over the tag.
    pub digest: Option<String>,
}

/// Why a reference does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let err = |reason: &str| ReferenceError {
            input: input.into(),
            reason: reason.into(),
        };
        if input.is_empty() {
            return Err(err("empty"));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("contains whitespace"));
        }
        let (name, digest) = match input.split_once('@') {
            Some((n, d)) => {
                check_digest(d).map_err(|r| err(&r))?;
                (n, Some(d.to_string()))
            }
            None => (input, None),
        };
        // The first component is a registry when it looks like a host.
        let (registry, rest) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest)
            }
            _ => (DOCKER_HUB.to_string(), name),
        };
        let registry = if registry == "index.docker.io" || registry == DOCKER_HUB_API {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        check_registry(&registry).map_err(|r| err(&r))?;
        // A tag is after the last ':' that follows the last '/'.
        let (repo, tag) = match rest.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (rest, None),
        };
        if let Some(t) = &tag {
            check_tag(t).map_err(|r| err(&r))?;
        }
        check_repository(repo).map_err(|r| err(&r))?;
        let repository = if registry == DOCKER_HUB && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_string()
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) the registry API is served on.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// Loopback registries (`localhost`, `127.x.x.x`, `[::1]`) are spoken to
    /// over plain HTTP, as Docker does; everything else needs `--insecure`.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => self.registry.split(':').next().unwrap_or(""),
        };
        host == "localhost"
            || host == "::1"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback())
    }

    /// What goes into `/v2/<repo>/manifests/<here>`: the digest, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// A store name for the tree: last repository component and the tag
    /// (or the digest's first 12 hex digits): `fedora-41`.
    pub fn default_name(&self) -> String {
        let base = self.repository.rsplit('/').next().unwrap_or("image");
        let suffix = match (&self.tag, &self.digest) {
            (_, Some(d)) if self.tag.is_none() => {
                d.split(':').nth(1).unwrap_or("")[..12].to_string()
            }
            (Some(t), _) => t.clone(),
            _ => "latest".into(),
        };
        let name: String = format!("{base}-{suffix}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        name.trim_start_matches(['.', '-']).to_string()
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `sha256:` and 64 lowercase hex digits: the only digest mkt stores, and
/// safe to use as a file name.
pub(crate) fn check_digest(d: &str) -> Result<(), String> {
    let Some(hex) = d.strip_prefix("sha256:") else {
        return Err(format!(
            "digest {d:?} is not sha256:<64 hex digits> (only sha256 is supported)"
        ));
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "digest {d:?} is not sha256:<64 lowercase hex digits>"
        ));
    }
    Ok(())
}

fn check_registry(r: &str) -> Result<(), String> {
    let ok = if let Some(v6) = r.strip_prefix('[') {
        v6.contains(']')
    } else {
        let (host, port) = r.split_once(':').unwrap_or((r, ""));
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && port.bytes().all(|b| b.is_ascii_digit())
            && (port.is_empty() != r.contains(':'))
    };
    if ok {
        Ok(())
    } else {
        Err(format!("bad registry {r:?}"))
    }
}

fn check_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() {
        return Err("no repository".into());
    }
    for comp in repo.split('/') {
        if comp.is_empty() {
            return Err(format!("empty path component in {repo:?}"));
        }
        if comp.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("repository {repo:?} must be lowercase"));
        }
        let ok = comp
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && comp.as_bytes()[0].is_ascii_alphanumeric()
            && comp.as_bytes()[comp.len() - 1].is_ascii_alphanumeric();
        if !ok {
            return Err(format!("bad repository component {comp:?}"));
        }
    }
    Ok(())
}

fn check_tag(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("bad tag {t:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// input, registry, repository, tag, digest, api host, loopback, name
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        &'a str,
        bool,
        &'a str,
    );

    #[test]
    fn parses_references_as_users_write_them() {
        let d = Some(D);
        let cases: &[Case] = &[
            (
                "fedora:41",
                "docker.io",
                "library/fedora",
                Some("41"),
                None,
                "registry-1.docker.io",
                false,
                "fedora-41",
            ),
            (
                "fedora",
                "docker.io",
                "library/fedora",
                Some("latest"),
                None,
                "registry-1.docker.io",
                false,
                "fedora-latest",
            ),
            (
                "docker.io/library/debian:bookworm",
                "docker.io",
                "library/debian",
                Some("bookworm"),
                None,
                "registry-1.docker.io",
                false,
                "debian-bookworm",
            ),
            (
                "index.docker.io/x/y:1",
                "docker.io",
                "x/y",
                Some("1"),
                None,
                "registry-1.docker.io",
                false,
                "y-1",
            ),
            (
                "user/img:v1.2",
                "docker.io",
                "user/img",
                Some("v1.2"),
                None,
                "registry-1.docker.io",
                false,
                "img-v1.2",
            ),
            (
                &format!("quay.io/x/y@{D}"),
                "quay.io",
                "x/y",
                None,
                d,
                "quay.io",
                false,
                "y-0123456789ab",
            ),
            (
                &format!("quay.io/x/y:t@{D}"),
                "quay.io",
                "x/y",
                Some("t"),
                d,
                "quay.io",
                false,
                "y-t",
            ),
            (
                "127.0.0.1:5000/a/b:t",
                "127.0.0.1:5000",
                "a/b",
                Some("t"),
                None,
                "127.0.0.1:5000",
                true,
                "b-t",
            ),
            (
                "localhost/a",
                "localhost",
                "a",
                Some("latest"),
                None,
                "localhost",
                true,
                "a-latest",
            ),
            (
                "localhost:5000/a:1",
                "localhost:5000",
                "a",
                Some("1"),
                None,
                "localhost:5000",
                true,
                "a-1",
            ),
            (
                "[::1]:5000/a:1",
                "[::1]:5000",
                "a",
                Some("1"),
                None,
                "[::1]:5000",
                true,
                "a-1",
            ),
            (
                "ghcr.io/o/p/q:2024.1_x",
                "ghcr.io",
                "o/p/q",
                Some("2024.1_x"),
                None,
                "ghcr.io",
                false,
                "q-2024.1_x",
            ),
            (
                "10.1.2.3:443/n",
                "10.1.2.3:443",
                "n",
                Some("latest"),
                None,
                "10.1.2.3:443",
                false,
                "n-latest",
            ),
        ];
        for (input, reg, repo, tag, digest, api, lo, name) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry, *reg, "{input}");
            assert_eq!(r.repository, *repo, "{input}");
            assert_eq!(r.tag.as_deref(), *tag, "{input}");
            assert_eq!(r.digest.as_deref(), *digest, "{input}");
            assert_eq!(r.api_host(), *api, "{input}");
            assert_eq!(r.is_loopback(), *lo, "{input}");
            assert_eq!(r.default_name(), *name, "{input}");
        }
    }

    #[test]
    fn digest_wins_over_tag_for_the_manifest() {
        let r = Reference::parse(&format!("quay.io/x/y:t@{D}")).unwrap();
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.to_string(), format!("quay.io/x/y:t@{D}"));
        assert_eq!(Reference::parse("fedora").unwrap().manifest_ref(), "latest");
    }

    /// What mutation testing found no test for: a registry host with a
    /// port or a `-` (and not a `_`), repository components with digits and `._-`, and a `:` that is
    /// not a tag's (a `/` follows it).
    #[test]
    fn ports_component_characters_and_colons_inside_the_path() {
        let r = Reference::parse("registry.example:5000/my_team/app-2.x:v1").unwrap();
        assert_eq!(r.registry, "registry.example:5000");
        assert_eq!(r.repository, "my_team/app-2.x");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let r = Reference::parse("my-registry.example/a").unwrap();
        assert_eq!(r.registry, "my-registry.example");
        let e = Reference::parse("my_registry.example/a").unwrap_err();
        assert!(e.reason.contains("bad registry"), "{e:?}");
        let e = Reference::parse("registry.example:/a").unwrap_err();
        assert!(e.reason.contains("bad registry"), "{e:?}");
        let e = Reference::parse("registry.example/a:b/c").unwrap_err();
        assert!(e.reason.contains("bad repository component"), "{e:?}");
    }

    #[test]
    fn rejects_bad_references_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("Fedora:41", "lowercase"),
            ("fedora:", "bad tag"),
            ("fedora:a b", "whitespace"),
            ("quay.io/x/y@sha256:abc", "64"),
            ("quay.io/x/y@md5:0123", "only sha256"),
            ("quay.io//y", "empty path component"),
            ("quay.io/", "no repository"),
            ("host:port/x", "bad registry"),
            ("a/-b", "bad repository component"),
            ("x:-t", "bad tag"),
        ];
        for (input, want) in cases {
            let e = Reference::parse(input).expect_err(input);
            assert!(e.to_string().contains(want), "{input}: {e}");
            assert!(e.to_string().contains(&format!("{input:?}")), "{e}");
        }
    }
}
