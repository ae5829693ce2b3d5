//! HTTP to one repository of one registry: the auth dance (anonymous or
//! credentialed bearer tokens, Basic), manifests and blob responses.

use super::OciError;
use super::auth::{Challenge, Credentials, parse_challenge};
use super::manifest;
use super::reference::Reference;
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{ACCEPT, CONTENT_TYPE, RANGE, WWW_AUTHENTICATE};
use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

enum AuthState {
    Anonymous,
    Bearer(String),
    Basic,
}

/// A client for one repository; shared by the download threads.
pub struct Registry {
    http: Client,
    base: String,
    /// The registry as named in the reference (for messages).
    pub registry: String,
    pub repository: String,
    creds: Option<Credentials>,
    /// Where credentials were looked for, for the "denied" hint.
    searched: Vec<std::path::PathBuf>,
    auth: Mutex<AuthState>,
    /// Manifests larger than this are refused unparsed.
    pub max_manifest: u64,
}

impl Registry {
    /// HTTPS, or plain HTTP for `insecure` and loopback registries.
    pub fn new(
        r: &Reference,
        insecure: bool,
        creds: Option<Credentials>,
        searched: Vec<std::path::PathBuf>,
    ) -> Result<Self, OciError> {
        let scheme = if insecure || r.is_loopback() {
            "http"
        } else {
            "https"
        };
        Self::with_base(
            &format!("{scheme}://{}", r.api_host()),
            &r.registry,
            &r.repository,
            creds,
            searched,
        )
    }

    /// A client for `base` (`http://127.0.0.1:5000`), for tests and mirrors.
    pub fn with_base(
        base: &str,
        registry: &str,
        repository: &str,
        creds: Option<Credentials>,
        searched: Vec<std::path::PathBuf>,
    ) -> Result<Self, OciError> {
        // Installing twice is harmless; the first provider stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = Client::builder()
            .user_agent(concat!("mkt/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // Per read: a stalled transfer fails instead of hanging.
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(OciError::Client)?;
        Ok(Registry {
            http,
            base: base.trim_end_matches('/').to_string(),
            registry: registry.into(),
            repository: repository.into(),
            creds,
            searched,
            auth: Mutex::new(AuthState::Anonymous),
            max_manifest: super::Limits::default().manifest,
        })
    }

    fn url(&self, kind: &str, reference: &str) -> String {
        format!("{}/v2/{}/{kind}/{reference}", self.base, self.repository)
    }

    /// Sends a request, answering one 401 challenge and retrying.
    fn send(
        &self,
        url: &str,
        what: &str,
        build: impl Fn(&Client) -> RequestBuilder,
    ) -> Result<Response, OciError> {
        for attempt in 0..2 {
            let mut req = build(&self.http);
            match &*self.auth.lock().unwrap() {
                AuthState::Anonymous => {}
                AuthState::Bearer(t) => req = req.bearer_auth(t),
                AuthState::Basic => {
                    if let Some(c) = &self.creds {
                        req = req.basic_auth(&c.username, Some(&c.password));
                    }
                }
            }
            let resp = req.send().map_err(|source| OciError::Request {
                registry: self.registry.clone(),
                url: url.into(),
                source,
            })?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                return self.check(resp, what);
            }
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(parse_challenge)
                .collect();
            let bearer = challenges
                .iter()
                .find(|c| matches!(c, Challenge::Bearer { .. }));
            match bearer.or(challenges.first()) {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope,
                }) => {
                    let token = self.token(realm, service.as_deref(), scope.as_deref())?;
                    *self.auth.lock().unwrap() = AuthState::Bearer(token);
                }
                Some(Challenge::Basic) if self.creds.is_some() => {
                    *self.auth.lock().unwrap() = AuthState::Basic;
                }
                _ => return self.check(resp, what),
            }
        }
        unreachable!("the second attempt always returns")
    }

    fn denied_hint(&self) -> String {
        match &self.creds {
            Some(c) => format!(
                "the credentials for user {:?} from {} were refused",
                c.username,
                c.source.display()
            ),
            None => format!(
                "it needs credentials and none were found for it in {}",
                self.searched
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Turns error statuses into errors naming the registry and the object.
    fn check(&self, resp: Response, what: &str) -> Result<Response, OciError> {
        let status = resp.status();
        if status.is_success() || status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(resp);
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(OciError::Unauthorized {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                hint: self.denied_hint(),
            });
        }
        let mut body = Vec::new();
        let _ = resp.take(64 << 10).read_to_end(&mut body);
        Err(OciError::Status {
            registry: self.registry.clone(),
            what: what.into(),
            status: status.as_u16(),
            detail: error_detail(&body),
        })
    }

    /// Gets a token from `realm`, with the credentials when there are some.
    fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<String, OciError> {
        let scope = scope
            .map(str::to_string)
            .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let err = |detail: String, source| OciError::Token {
            realm: realm.into(),
            registry: self.registry.clone(),
            detail,
            source,
        };
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| err(format!(": the realm is not a URL ({e})"), None))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("scope", &scope);
            if let Some(s) = service {
                q.append_pair("service", s);
            }
        }
        let mut req = self.http.get(url);
        if let Some(c) = &self.creds {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req.send().map_err(|e| err(String::new(), Some(e)))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(OciError::Unauthorized {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                hint: format!(
                    "the token server {realm} answered HTTP {}: {}",
                    status.as_u16(),
                    self.denied_hint()
                ),
            });
        }
        if !status.is_success() {
            return Err(err(format!(": HTTP {}", status.as_u16()), None));
        }
        #[derive(serde::Deserialize)]
        struct TokenReply {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = resp
            .bytes()
            .map_err(|e| err(": cannot read the reply".into(), Some(e)))?;
        let reply: TokenReply = serde_json::from_slice(&body)
            .map_err(|e| err(format!(": the reply is not a token ({e})"), None))?;
        reply
            .token
            .or(reply.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err(": the reply has no token".into(), None))
    }

    /// The manifest `reference` (tag or digest): body, content type, digest.
    /// A manifest asked for by digest is verified against it.
    pub fn manifest(
        &self,
        reference: &str,
        image: &str,
    ) -> Result<(Vec<u8>, Option<String>, String), OciError> {
        let url = self.url("manifests", reference);
        let what = format!("manifest {reference} of {image}");
        let resp = self.send(&url, &what, |c| {
            c.get(&url).header(ACCEPT, manifest::accept_header())
        })?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let max = self.max_manifest;
        let mut body = Vec::new();
        resp.take(max.saturating_add(1))
            .read_to_end(&mut body)
            .map_err(|e| OciError::Manifest {
                image: image.into(),
                reference: reference.into(),
                reason: format!("cannot read it: {e}"),
            })?;
        if body.len() as u64 > max {
            return Err(OciError::Manifest {
                image: image.into(),
                reference: reference.into(),
                reason: format!(
                    "larger than the limit of {} for a manifest (`manifest` in the config's [limits])",
                    super::show_limit(max)
                ),
            });
        }
        let digest = super::sha256_digest(&body);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(OciError::Manifest {
                image: image.into(),
                reference: reference.into(),
                reason: format!("the content's digest is {digest}"),
            });
        }
        Ok((body, content_type, digest))
    }

    /// The blob `digest`, from byte `offset` on (a Range request when > 0).
    /// The caller checks for 206 vs 200 (servers may ignore Range) and 416.
    pub fn blob(&self, digest: &str, offset: u64) -> Result<Response, OciError> {
        let url = self.url("blobs", digest);
        let what = format!("blob {digest} of {}", self.repository);
        self.send(&url, &what, |c| {
            let r = c.get(&url);
            if offset > 0 {
                r.header(RANGE, format!("bytes={offset}-"))
            } else {
                r
            }
        })
    }
}

/// The registry's own error message (`{"errors":[{"message":…}]}`), if any.
fn error_detail(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let text = |i: &serde_json::Value, k: &str| i[k].as_str().unwrap_or("").to_string();
    let items: Vec<String> = (v["errors"].as_array().into_iter().flatten())
        .map(|i| {
            format!("{} {}", text(i, "code"), text(i, "message"))
                .trim()
                .to_string()
        })
        .collect();
    if items.is_empty() {
        return String::new();
    }
    format!(": {}", items.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::test_http::{self, response as reply};
    use std::sync::mpsc;

    /// A registry: `respond(path, authorization, port)` answers each of `n`
    /// requests; every (path, authorization) is reported.
    fn serve(
        n: usize,
        respond: impl Fn(&str, Option<&str>, u16) -> Vec<u8> + Send + 'static,
    ) -> (u16, mpsc::Receiver<(String, Option<String>)>) {
        test_http::serve(n, move |r, port| {
            let auth = r.header("authorization");
            let bytes = respond(&r.path, auth, port);
            ((r.path.clone(), auth.map(str::to_string)), bytes)
        })
    }

    const MANIFEST: &str =
        r#"{"schemaVersion":2,"config":{"digest":"sha256:aa","size":1},"layers":[]}"#;

    fn creds(user: &str, pw: &str) -> Option<Credentials> {
        Some(Credentials {
            username: user.into(),
            password: pw.into(),
            source: "/home/u/.docker/config.json".into(),
        })
    }

    /// Bearer flow: 401 with a challenge, a token from the realm (asked
    /// with the scope, and with Basic credentials when there are some), retry.
    fn bearer(c: Option<Credentials>) -> Vec<(String, Option<String>)> {
        let (port, rx) = serve(3, |path, auth, port| {
            if path.starts_with("/token?") {
                return if auth.is_none() || auth == Some("Basic dTpwdw==") {
                    reply("200 OK", "", r#"{"token":"tok-1"}"#)
                } else {
                    reply("401 Unauthorized", "", "")
                };
            }
            if auth == Some("Bearer tok-1") {
                return reply(
                    "200 OK",
                    "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n",
                    MANIFEST,
                );
            }
            reply(
                "401 Unauthorized",
                &format!(
                    "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"reg\",scope=\"repository:x/y:pull\"\r\n"
                ),
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            )
        });
        let reg = Registry::with_base(&format!("http://127.0.0.1:{port}"), "reg", "x/y", c, vec![])
            .unwrap();
        let (body, ct, digest) = reg.manifest("t", "reg/x/y:t").unwrap();
        assert_eq!(body, MANIFEST.as_bytes());
        assert_eq!(
            ct.as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        assert_eq!(digest, crate::oci::sha256_digest(MANIFEST.as_bytes()));
        rx.try_iter().collect()
    }

    #[test]
    fn anonymous_bearer_token_flow() {
        let seen = bearer(None);
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0], ("/v2/x/y/manifests/t".into(), None));
        assert!(
            seen[1].0.contains("scope=repository%3Ax%2Fy%3Apull"),
            "{seen:?}"
        );
        assert!(seen[1].0.contains("service=reg"), "{seen:?}");
        assert_eq!(seen[1].1, None);
        assert_eq!(
            seen[2],
            ("/v2/x/y/manifests/t".into(), Some("Bearer tok-1".into()))
        );
    }

    #[test]
    fn credentialed_bearer_token_flow() {
        let seen = bearer(creds("u", "pw"));
        assert_eq!(seen[1].1.as_deref(), Some("Basic dTpwdw=="));
    }

    #[test]
    fn token_server_refusing_the_password_names_the_credentials_file() {
        let (port, _rx) = serve(2, |path, _, port| {
            if path.starts_with("/token") {
                reply("401 Unauthorized", "", "")
            } else {
                reply(
                    "401 Unauthorized",
                    &format!(
                        "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\"\r\n"
                    ),
                    "",
                )
            }
        });
        let reg = Registry::with_base(
            &format!("http://127.0.0.1:{port}"),
            "reg",
            "x/y",
            creds("u", "bad"),
            vec![],
        )
        .unwrap();
        let e = reg.manifest("t", "reg/x/y:t").unwrap_err().to_string();
        assert!(e.contains("registry reg denied access to x/y"), "{e}");
        assert!(
            e.contains("\"u\"") && e.contains("/home/u/.docker/config.json"),
            "{e}"
        );
    }

    #[test]
    fn basic_auth_and_a_wrong_password() {
        let handler = |_: &str, auth: Option<&str>, _| {
            if auth == Some("Basic dTpwdw==") {
                reply("200 OK", "", MANIFEST)
            } else {
                reply(
                    "401 Unauthorized",
                    "WWW-Authenticate: Basic realm=\"r\"\r\n",
                    "",
                )
            }
        };
        let (port, rx) = serve(2, handler);
        let base = format!("http://127.0.0.1:{port}");
        let reg = Registry::with_base(&base, "reg", "x/y", creds("u", "pw"), vec![]).unwrap();
        reg.manifest("t", "reg/x/y:t").unwrap();
        let seen: Vec<_> = rx.try_iter().collect();
        assert_eq!(seen[1].1.as_deref(), Some("Basic dTpwdw=="));

        let (port, _rx) = serve(2, handler);
        let base = format!("http://127.0.0.1:{port}");
        let reg = Registry::with_base(&base, "reg", "x/y", creds("u", "wrong"), vec![]).unwrap();
        let e = reg.manifest("t", "reg/x/y:t").unwrap_err().to_string();
        assert!(
            e.contains("credentials for user \"u\" from /home/u/.docker/config.json were refused"),
            "{e}"
        );

        // No credentials at all: say where they were looked for.
        let (port, _rx) = serve(1, handler);
        let base = format!("http://127.0.0.1:{port}");
        let reg =
            Registry::with_base(&base, "reg", "x/y", None, vec!["/a/auth.json".into()]).unwrap();
        let e = reg.manifest("t", "reg/x/y:t").unwrap_err().to_string();
        assert!(e.contains("none were found for it in /a/auth.json"), "{e}");
    }

    #[test]
    fn a_manifest_asked_by_digest_is_verified() {
        let (port, _rx) = serve(1, |_, _, _| reply("200 OK", "", MANIFEST));
        let reg = Registry::with_base(
            &format!("http://127.0.0.1:{port}"),
            "reg",
            "x/y",
            None,
            vec![],
        )
        .unwrap();
        let want = format!("sha256:{}", "0".repeat(64));
        let e = reg.manifest(&want, "reg/x/y").unwrap_err().to_string();
        assert!(
            e.contains(&want) && e.contains("the content's digest is sha256:"),
            "{e}"
        );
    }

    #[test]
    fn registry_errors_name_the_object_and_carry_the_registrys_message() {
        let (port, _rx) = serve(1, |_, _, _| {
            reply(
                "404 Not Found",
                "",
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
            )
        });
        let reg = Registry::with_base(
            &format!("http://127.0.0.1:{port}"),
            "reg",
            "x/y",
            None,
            vec![],
        )
        .unwrap();
        let e = reg
            .manifest("nope", "reg/x/y:nope")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "registry reg answered HTTP 404 for manifest nope of reg/x/y:nope: MANIFEST_UNKNOWN manifest unknown"
        );
    }

    #[test]
    fn registry_error_bodies_become_details() {
        let b =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(
            super::error_detail(b),
            ": MANIFEST_UNKNOWN manifest unknown"
        );
        assert_eq!(super::error_detail(b"404 page not found"), "");
    }

    #[test]
    fn a_manifest_over_the_limit_is_refused_naming_the_limit() {
        let (port, _rx) = serve(1, |_, _, _| reply("200 OK", "", MANIFEST));
        let mut reg = Registry::with_base(
            &format!("http://127.0.0.1:{port}"),
            "reg",
            "x/y",
            None,
            vec![],
        )
        .unwrap();
        reg.max_manifest = 64;
        let e = reg.manifest("t", "reg/x/y:t").unwrap_err().to_string();
        assert!(
            e.contains("manifest t of reg/x/y:t")
                && e.contains("larger than the limit of 64 bytes")
                && e.contains("[limits]"),
            "{e}"
        );
    }
}
