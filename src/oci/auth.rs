//! Registry credentials from the files users already have, and the
//! `WWW-Authenticate` challenges registries answer with.

use base64::Engine;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// The file they came from, for error messages.
    pub source: PathBuf,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Why an auth file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read registry credentials file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry credentials file {} is not valid JSON", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("registry credentials file {}: entry {key:?}: {reason}", .path.display())]
    Entry {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// Where credentials are looked for, in podman's order: `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`,
/// `~/.docker/config.json` (or `$DOCKER_CONFIG/config.json`).
pub(crate) fn auth_files(env: impl Fn(&str) -> Option<String>, home: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(f) = env("REGISTRY_AUTH_FILE").filter(|s| !s.is_empty()) {
        v.push(PathBuf::from(f));
    }
    if let Some(r) = env("XDG_RUNTIME_DIR").filter(|s| !s.is_empty()) {
        v.push(Path::new(&r).join("containers/auth.json"));
    }
    let config = env("XDG_CONFIG_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".config"));
    v.push(config.join("containers/auth.json"));
    match env("DOCKER_CONFIG").filter(|s| !s.is_empty()) {
        Some(d) => v.push(Path::new(&d).join("config.json")),
        None => v.push(home.join(".docker/config.json")),
    }
    v
}

/// The credentials for `registry`/`repository` from the first file that has
/// an entry for them. Missing files are skipped; broken ones are errors.
pub fn lookup(
    files: &[PathBuf],
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>, AuthFileError> {
    for path in files {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(AuthFileError::Read {
                    path: path.clone(),
                    source,
                });
            }
        };
        if let Some(c) = lookup_in(&text, path, registry, repository)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

#[derive(serde::Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// One file's entry for `registry`/`repository`: the most specific key wins
/// (`quay.io/x/y`, then `quay.io/x`, then `quay.io`).
pub(crate) fn lookup_in(
    text: &str,
    path: &Path,
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>, AuthFileError> {
    let file: AuthFile = serde_json::from_str(text).map_err(|source| AuthFileError::Parse {
        path: path.into(),
        source,
    })?;
    let mut by_key: BTreeMap<String, (&String, &AuthEntry)> = BTreeMap::new();
    for (key, entry) in &file.auths {
        by_key.insert(normalize_key(key), (key, entry));
    }
    let registry = normalize_key(registry);
    let mut candidates: Vec<String> = Vec::new();
    let comps: Vec<&str> = repository.split('/').collect();
    for n in (1..=comps.len()).rev() {
        candidates.push(format!("{registry}/{}", comps[..n].join("/")));
    }
    candidates.push(registry);
    for c in candidates {
        let Some((key, entry)) = by_key.get(&c) else {
            continue;
        };
        let bad = |reason: &str| AuthFileError::Entry {
            path: path.into(),
            key: (*key).clone(),
            reason: reason.into(),
        };
        let (username, password) = match (&entry.auth, &entry.username, &entry.password) {
            (Some(a), _, _) if !a.is_empty() => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .map_err(|_| bad("\"auth\" is not base64"))?;
                let s = String::from_utf8(raw).map_err(|_| bad("\"auth\" is not UTF-8"))?;
                let (u, p) = s
                    .split_once(':')
                    .ok_or_else(|| bad("\"auth\" is not base64 of user:password"))?;
                (u.to_string(), p.to_string())
            }
            (_, Some(u), Some(p)) => (u.clone(), p.clone()),
            // An entry without a secret (credential helpers): not usable.
            _ => continue,
        };
        return Ok(Some(Credentials {
            username,
            password,
            source: path.into(),
        }));
    }
    Ok(None)
}

/// Docker writes `https://index.docker.io/v1/`; podman writes `docker.io`
/// or `quay.io/namespace`. Both become `host[/namespace]`.
fn normalize_key(key: &str) -> String {
    let (had_scheme, rest) = match key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
    {
        Some(r) => (true, r),
        None => (false, key),
    };
    let rest = rest.trim_end_matches('/');
    // With a scheme (Docker's style) the path is an API version, not a namespace.
    let rest = if had_scheme {
        rest.split('/').next().unwrap_or("")
    } else {
        rest
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
        h => h,
    };
    if path.is_empty() {
        host.to_string()
    } else {
        format!("{host}/{path}")
    }
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// Fetch a token from `realm` (with `service` and `scope`), then retry.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    /// Send the credentials with every request.
    Basic,
}

/// Parses a `WWW-Authenticate` value; `None` for a scheme mkt cannot answer.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let p = parse_params(params);
            Some(Challenge::Bearer {
                realm: p.get("realm")?.clone(),
                service: p.get("service").cloned(),
                scope: p.get("scope").cloned(),
            })
        }
        _ => None,
    }
}

/// `key="quoted, value",key2=token` into a map (keys lowercased).
fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn docker_and_podman_keys_match_the_registry() {
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "quay.io": {{"auth": "{}"}},
                "quay.io/team": {{"auth": "{}"}},
                "127.0.0.1:5000": {{"username": "u", "password": "p:w"}},
                "ghcr.io": {{}}
            }}, "credsStore": "desktop"}}"#,
            b64("hub:hubpw"),
            b64("q:qpw"),
            b64("team:teampw:with:colons"),
        );
        let p = Path::new("/x/config.json");
        let get = |reg: &str, repo: &str| {
            lookup_in(&text, p, reg, repo)
                .unwrap()
                .map(|c| (c.username, c.password))
        };
        assert_eq!(
            get("docker.io", "library/fedora"),
            Some(("hub".into(), "hubpw".into()))
        );
        assert_eq!(get("quay.io", "other/y"), Some(("q".into(), "qpw".into())));
        assert_eq!(
            get("quay.io", "team/y"),
            Some(("team".into(), "teampw:with:colons".into()))
        );
        assert_eq!(
            get("127.0.0.1:5000", "a/b"),
            Some(("u".into(), "p:w".into()))
        );
        assert_eq!(get("ghcr.io", "a"), None);
        assert_eq!(get("example.com", "a"), None);
    }

    #[test]
    fn broken_files_name_the_file_and_entry() {
        let p = Path::new("/x/auth.json");
        let e = lookup_in("{", p, "quay.io", "a").unwrap_err();
        assert!(e.to_string().contains("/x/auth.json"), "{e}");
        let e = lookup_in(r#"{"auths":{"quay.io":{"auth":"!!"}}}"#, p, "quay.io", "a").unwrap_err();
        assert!(e.to_string().contains("\"quay.io\""), "{e}");
        assert!(e.to_string().contains("base64"), "{e}");
    }

    #[test]
    fn files_are_searched_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        std::fs::write(
            &b,
            format!(r#"{{"auths":{{"r.io":{{"auth":"{}"}}}}}}"#, b64("b:1")),
        )
        .unwrap();
        let files = [dir.path().join("missing.json"), a.clone(), b.clone()];
        let c = lookup(&files, "r.io", "x").unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.source.as_path()),
            ("b", b.as_path())
        );
        std::fs::write(
            &a,
            format!(
                r#"{{"auths":{{"r.io":{{"auth":"{}"}}}}}}"#,
                b64("a:pw-s3cr3t")
            ),
        )
        .unwrap();
        let c = lookup(&files, "r.io", "x").unwrap().unwrap();
        assert_eq!(c.username, "a");
        // (Not a digit: the temp dir's random name may contain any.)
        assert!(
            !format!("{c:?}").contains("s3cr3t"),
            "Debug must not show the password"
        );
    }

    #[test]
    fn auth_file_locations() {
        let env = |k: &str| match k {
            "XDG_RUNTIME_DIR" => Some("/run/user/1000".to_string()),
            _ => None,
        };
        assert_eq!(
            auth_files(env, Path::new("/home/u")),
            vec![
                PathBuf::from("/run/user/1000/containers/auth.json"),
                PathBuf::from("/home/u/.config/containers/auth.json"),
                PathBuf::from("/home/u/.docker/config.json"),
            ]
        );
    }

    #[test]
    fn parses_challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/fedora:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/fedora:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm=http://127.0.0.1:1/t"#),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
    }
}
