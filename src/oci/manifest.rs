//! OCI and Docker manifests: indexes (manifest lists) with platform
//! selection, image manifests, and the few config fields mkt records.

use serde::{Deserialize, Serialize};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1";

/// The `Accept` header for manifest requests, most wanted first.
pub fn accept_header() -> String {
    [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// `os/arch[/variant]`, as `--platform` takes it.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "platform {s:?} is not os/arch[/variant], e.g. linux/amd64"
            ));
        }
        Ok(Platform {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

/// A manifest as fetched: an index to choose from, or an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    Index(Vec<Descriptor>),
    Image(ImageManifest),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u32>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// Parses a manifest body; `content_type` is the response's header. The
/// body's own `mediaType` (or its shape, for registries that omit both) decides.
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<Manifest, String> {
    let p: Probe = serde_json::from_slice(body).map_err(|e| format!("not a JSON manifest: {e}"))?;
    let media = p
        .media_type
        .clone()
        .or_else(|| content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    if media.starts_with(DOCKER_SCHEMA1) || p.schema_version == Some(1) {
        return Err("Docker schema 1 manifests are not supported".into());
    }
    match (p.manifests, p.config, p.layers) {
        (Some(m), _, _) => Ok(Manifest::Index(m)),
        (None, Some(config), Some(layers)) => Ok(Manifest::Image(ImageManifest { config, layers })),
        _ => Err(format!("unsupported manifest (media type {media:?})")),
    }
}

/// Attestations and other non-images sit in indexes as `unknown/unknown`.
fn is_attestation(d: &Descriptor) -> bool {
    d.platform
        .as_ref()
        .is_some_and(|p| p.os == "unknown" || p.architecture == "unknown")
        || d.annotations
            .as_ref()
            .and_then(|a| a.get("vnd.docker.reference.type"))
            .is_some_and(|t| t == "attestation-manifest")
}

/// The index entry for `want`. Without a wanted variant, an entry without
/// one (or arm64's `v8`) is preferred over other variants.
pub fn select<'a>(entries: &'a [Descriptor], want: &Platform) -> Result<&'a Descriptor, String> {
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| !is_attestation(d))
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == want.os && p.architecture == want.architecture)
        })
        .collect();
    let variant = |d: &&Descriptor| d.platform.as_ref().and_then(|p| p.variant.clone());
    let chosen = match &want.variant {
        Some(v) => candidates.iter().find(|d| variant(d).as_deref() == Some(v)),
        None => candidates
            .iter()
            .find(|d| variant(d).is_none())
            .or_else(|| {
                candidates
                    .iter()
                    .find(|d| variant(d).as_deref() == Some("v8"))
            })
            .or(candidates.first()),
    };
    chosen.copied().ok_or_else(|| {
        let have: Vec<String> = entries
            .iter()
            .filter(|d| !is_attestation(d))
            .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
            .collect();
        format!(
            "no {want} image in the index (it has: {})",
            if have.is_empty() {
                "none".into()
            } else {
                have.join(", ")
            }
        )
    })
}

/// Layer media types mkt unpacks (the compression is also sniffed).
pub fn is_layer(media_type: &str) -> bool {
    media_type.is_empty()
        || media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.diff.tar")
}

/// The fields of an image config mkt uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub variant: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(os: &str, arch: &str, variant: Option<&str>, n: u8) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            size: 1,
            platform: Some(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: variant.map(Into::into),
            }),
            urls: None,
            annotations: None,
        }
    }

    #[test]
    fn selects_the_platform_and_skips_attestations() {
        let list = vec![
            desc("unknown", "unknown", None, 9),
            desc("linux", "arm", Some("v7"), 1),
            desc("linux", "arm64", Some("v8"), 2),
            desc("linux", "amd64", None, 3),
            desc("linux", "arm", Some("v6"), 4),
        ];
        let pick = |s: &str| select(&list, &Platform::parse(s).unwrap()).map(|d| d.digest.clone());
        assert_eq!(pick("linux/amd64").unwrap(), list[3].digest);
        assert_eq!(pick("linux/arm64").unwrap(), list[2].digest);
        assert_eq!(pick("linux/arm/v6").unwrap(), list[4].digest);
        let e = pick("linux/s390x").unwrap_err();
        assert!(e.contains("linux/s390x"), "{e}");
        assert!(
            e.contains("linux/arm/v7, linux/arm64/v8, linux/amd64"),
            "{e}"
        );
        assert!(!e.contains("unknown"), "{e}");
        // Only an attestation for amd64: nothing to pick.
        let only = vec![desc("unknown", "unknown", None, 9)];
        assert!(select(&only, &Platform::parse("linux/amd64").unwrap()).is_err());
    }

    #[test]
    fn platform_syntax() {
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//x").is_err());
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
    }

    #[test]
    fn parses_each_manifest_kind() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
            "manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","size":3,
            "platform":{"architecture":"amd64","os":"linux"}}]}"#;
        assert!(matches!(parse(index, None).unwrap(), Manifest::Index(m) if m.len() == 1));
        let image = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:bb","size":1},
            "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:cc","size":2}]}"#;
        match parse(image, Some(DOCKER_MANIFEST)).unwrap() {
            Manifest::Image(m) => assert_eq!(m.layers[0].size, 2),
            m => panic!("{m:?}"),
        }
        let v1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(parse(v1, None).unwrap_err().contains("schema 1"));
        assert!(parse(b"<html>", None).unwrap_err().contains("JSON"));
    }
}
