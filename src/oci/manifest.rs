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

/// Manifest media types mkt can use: image manifests and indexes.
pub const KNOWN: [&str; 4] = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// Content types that say nothing about what a manifest is.
fn is_generic(content_type: &str) -> bool {
    matches!(
        content_type,
        "" | "application/json" | "application/octet-stream" | "text/plain"
    )
}

/// Parses a manifest body; `content_type` is the response's header. The
/// body's own `mediaType` (else the header) must be one of [`KNOWN`]; only
/// when neither says anything does the body's shape decide.
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<Manifest, String> {
    let p: Probe = serde_json::from_slice(body).map_err(|e| format!("not a JSON manifest: {e}"))?;
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .filter(|c| !is_generic(c));
    let media = p.media_type.clone().or(header).unwrap_or_default();
    if media.starts_with(DOCKER_SCHEMA1) || p.schema_version == Some(1) {
        return Err("Docker schema 1 manifests are not supported".into());
    }
    if !media.is_empty() && !KNOWN.contains(&media.as_str()) {
        return Err(format!(
            "its media type {media:?} is not an image manifest or index (mkt takes {})",
            KNOWN.join(", ")
        ));
    }
    let index = media == OCI_INDEX || media == DOCKER_LIST;
    match (p.manifests, p.config, p.layers) {
        (Some(m), _, _) if index || media.is_empty() => Ok(Manifest::Index(m)),
        // A field the image manifest does not define is ignored, as OCI says.
        (_, Some(config), Some(layers)) if !index => {
            Ok(Manifest::Image(ImageManifest { config, layers }))
        }
        _ if media.is_empty() => Err("neither an image manifest nor an index".into()),
        _ => Err(format!("it does not have the fields of a {media}")),
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
    let for_platform: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| !is_attestation(d))
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == want.os && p.architecture == want.architecture)
        })
        .collect();
    // An entry of another media type (an artifact) is no image to unpack.
    let (candidates, others): (Vec<&Descriptor>, Vec<&Descriptor>) = for_platform
        .into_iter()
        .partition(|d| d.media_type.is_empty() || KNOWN.contains(&d.media_type.as_str()));
    if candidates.is_empty()
        && let Some(d) = others.first()
    {
        return Err(format!(
            "the index's {want} entry {} has media type {:?}, which is not an image manifest (mkt takes {})",
            d.digest,
            d.media_type,
            KNOWN.join(", ")
        ));
    }
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

/// Config media types of images (an artifact has its own).
pub fn is_config(media_type: &str) -> bool {
    media_type.is_empty()
        || media_type == "application/vnd.oci.image.config.v1+json"
        || media_type == "application/vnd.docker.container.image.v1+json"
}

/// Parses an image config: a JSON object that names its platform, as
/// both the OCI and Docker formats require.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("it is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("it is not a JSON object".into());
    }
    let c: ImageConfig = serde_json::from_value(v).map_err(|e| format!("bad field: {e}"))?;
    if c.os.as_deref().unwrap_or("").is_empty()
        || c.architecture.as_deref().unwrap_or("").is_empty()
    {
        return Err("it does not say the image's os and architecture".into());
    }
    Ok(c)
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

    #[test]
    fn unknown_manifest_media_types_are_refused() {
        let shape = r#""schemaVersion":2,"config":{"digest":"sha256:bb","size":1},"layers":[]"#;
        let unknown = "application/vnd.example.thing.v1+json";
        // Said by the body, or (the body silent) by the response header.
        let body = format!(r#"{{"mediaType":"{unknown}",{shape}}}"#);
        let e = parse(body.as_bytes(), Some(OCI_MANIFEST)).unwrap_err();
        assert!(e.contains(&format!("media type {unknown:?}")), "{e}");
        let bare = format!("{{{shape}}}");
        let e = parse(bare.as_bytes(), Some(&format!("{unknown}; charset=utf-8"))).unwrap_err();
        assert!(e.contains("is not an image manifest or index"), "{e}");
        // A header that says nothing leaves it to the shape.
        assert!(matches!(
            parse(bare.as_bytes(), Some("application/json")),
            Ok(Manifest::Image(_))
        ));
        // A known type must come with its fields.
        let wrong = format!(r#"{{"mediaType":"{OCI_INDEX}",{shape}}}"#);
        assert!(parse(wrong.as_bytes(), None).is_err());
    }

    #[test]
    fn index_entries_of_other_media_types_are_not_images() {
        let mut art = desc("linux", "amd64", None, 7);
        art.media_type = "application/vnd.example.artifact+json".into();
        let amd = Platform::parse("linux/amd64").unwrap();
        let e = select(std::slice::from_ref(&art), &amd).unwrap_err();
        assert!(
            e.contains(&art.digest) && e.contains("application/vnd.example.artifact+json"),
            "{e}"
        );
        // Beside a real image, the artifact is passed over.
        let img = desc("linux", "amd64", None, 8);
        assert_eq!(select(&[art, img.clone()], &amd).unwrap(), &img);
    }

    #[test]
    fn configs_must_be_json_objects_naming_their_platform() {
        let ok = parse_config(
            br#"{"os":"linux","architecture":"amd64","created":"2024-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(ok.architecture.as_deref(), Some("amd64"));
        for (bad, want) in [
            (&b"\x7fELF"[..], "not JSON"),
            (b"[\"linux\",\"amd64\"]", "not a JSON object"),
            (br#"{"os":"linux"}"#, "os and architecture"),
            (br#"{"os":1,"architecture":"amd64"}"#, "bad field"),
        ] {
            let e = parse_config(bad).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert!(is_config("application/vnd.oci.image.config.v1+json"));
        assert!(!is_config("application/vnd.cncf.helm.config.v1+json"));
    }

    #[test]
    fn accept_header_asks_for_indexes_first() {
        assert_eq!(
            accept_header(),
            format!("{OCI_INDEX}, {DOCKER_LIST}, {OCI_MANIFEST}, {DOCKER_MANIFEST}")
        );
    }

    #[test]
    fn the_media_type_decides_between_index_and_image() {
        // An image manifest that also carries a `manifests` field stays an image.
        let both = format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","manifests":[],"config":{{"digest":"sha256:bb","size":1}},"layers":[]}}"#
        );
        assert!(matches!(
            parse(both.as_bytes(), None),
            Ok(Manifest::Image(_))
        ));
        // A known type without its fields, and a body with no type and no shape.
        let e = parse(
            format!(r#"{{"mediaType":"{OCI_MANIFEST}"}}"#).as_bytes(),
            None,
        )
        .unwrap_err();
        assert_eq!(
            e,
            format!("it does not have the fields of a {OCI_MANIFEST}")
        );
        let e = parse(br#"{"schemaVersion":2}"#, None).unwrap_err();
        assert_eq!(e, "neither an image manifest nor an index");
    }

    #[test]
    fn attestations_are_told_by_platform_or_annotation() {
        let amd = Platform::parse("linux/amd64").unwrap();
        let half = desc("linux", "unknown", None, 1);
        assert!(is_attestation(&half));
        assert!(is_attestation(&desc("unknown", "amd64", None, 1)));
        let mut att = desc("linux", "amd64", None, 2);
        let note =
            |v: &str| Some([("vnd.docker.reference.type".to_string(), v.to_string())].into());
        att.annotations = note("attestation-manifest");
        assert!(is_attestation(&att));
        assert!(select(std::slice::from_ref(&att), &amd).is_err());
        let mut other = desc("linux", "amd64", None, 3);
        other.annotations = note("something-else");
        assert!(!is_attestation(&other));
        assert_eq!(select(&[att, other.clone()], &amd).unwrap(), &other);
    }

    #[test]
    fn arm64_without_a_variant_prefers_v8() {
        let list = vec![
            desc("linux", "arm64", Some("v9"), 1),
            desc("linux", "arm64", Some("v8"), 2),
        ];
        let got = select(&list, &Platform::parse("linux/arm64").unwrap()).unwrap();
        assert_eq!(got, &list[1]);
    }

    #[test]
    fn layer_media_types() {
        for ok in [
            "",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ] {
            assert!(is_layer(ok), "{ok}");
        }
        for bad in [
            "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
            "application/vnd.oci.image.config.v1+json",
        ] {
            assert!(!is_layer(bad), "{bad}");
        }
    }
}
