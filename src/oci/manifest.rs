//! OCI and Docker manifests, read into `oci-spec`'s types: the media types
//! mkt takes, indexes and image manifests as a registry sends them,
//! platforms, and image configs.

use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, Os, Platform};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1";

/// Manifest media types mkt can use, most wanted first: indexes, then
/// image manifests.
pub(crate) const KNOWN: [&str; 4] = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// The `Accept` header for manifest requests.
pub(crate) fn accept_header() -> String {
    KNOWN.join(", ")
}

/// `os/arch[/variant]`, as `--platform` takes it.
pub(crate) fn parse_platform(s: &str) -> Result<Platform, String> {
    let parts: Vec<&str> = s.split('/').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "platform {s:?} is not os/arch[/variant], e.g. linux/amd64"
        ));
    }
    let mut p = Platform::default();
    p.set_os(Os::from(parts[0]))
        .set_architecture(Arch::from(parts[1]))
        .set_variant(parts.get(2).map(|v| v.to_string()));
    Ok(p)
}

/// `os/arch[/variant]`, for messages and the store's records.
pub(crate) fn platform_name(p: &Platform) -> String {
    let variant = p.variant().as_ref().map(|v| format!("/{v}"));
    format!(
        "{}/{}{}",
        p.os(),
        p.architecture(),
        variant.unwrap_or_default()
    )
}

/// A manifest as fetched: an index to choose from, or an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    Index(Box<ImageIndex>),
    Image(Box<ImageManifest>),
}

/// What tells a manifest's kind, read before its fields.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u32>,
    #[serde(default)]
    manifests: Option<IgnoredAny>,
    #[serde(default)]
    config: Option<IgnoredAny>,
    #[serde(default)]
    layers: Option<IgnoredAny>,
}

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
    let not_json = |e: serde_json::Error| format!("not a JSON manifest: {e}");
    let mut v: Value = serde_json::from_slice(body).map_err(not_json)?;
    let p = Probe::deserialize(&v).map_err(not_json)?;
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
    fill_defaults(&mut v);
    match (p.manifests, p.config, p.layers) {
        (Some(_), _, _) if index || media.is_empty() => serde_json::from_value(v)
            .map(Manifest::Index)
            .map_err(not_json),
        // A field the image manifest does not define is ignored, as OCI says.
        (_, Some(_), Some(_)) if !index => serde_json::from_value(v)
            .map(Manifest::Image)
            .map_err(not_json),
        _ if media.is_empty() => Err("neither an image manifest nor an index".into()),
        _ => Err(format!("it does not have the fields of a {media}")),
    }
}

/// OCI and Docker require a manifest's `schemaVersion` and a descriptor's
/// `mediaType`, and so do oci-spec's types; mkt has always taken them
/// missing (a layer's compression is sniffed), as version 2 and empty.
fn fill_defaults(v: &mut Value) {
    let Some(m) = v.as_object_mut() else { return };
    m.entry("schemaVersion").or_insert(2.into());
    for key in ["config", "layers", "manifests", "subject"] {
        let descriptors: Vec<&mut Value> = match m.get_mut(key) {
            Some(Value::Array(a)) => a.iter_mut().collect(),
            Some(d) => vec![d],
            None => vec![],
        };
        for d in descriptors.into_iter().filter_map(Value::as_object_mut) {
            d.entry("mediaType").or_insert("".into());
        }
    }
}

/// Layer media types mkt unpacks (the compression is also sniffed).
pub(crate) fn is_layer(media_type: &str) -> bool {
    media_type.is_empty()
        || media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.diff.tar")
}

/// Config media types of images (an artifact has its own).
pub(crate) fn is_config(media_type: &str) -> bool {
    media_type.is_empty()
        || media_type == "application/vnd.oci.image.config.v1+json"
        || media_type == "application/vnd.docker.container.image.v1+json"
}

/// Parses an image config: a JSON object that names its platform, as
/// both the OCI and Docker formats require.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfiguration, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("it is not JSON: {e}"))?;
    let Some(m) = v.as_object() else {
        return Err("it is not a JSON object".into());
    };
    // Asked before the fields are read: oci-spec's would call them missing.
    let says = |k: &str| {
        m.get(k)
            .is_some_and(|x| !x.is_null() && x.as_str() != Some(""))
    };
    if !says("os") || !says("architecture") {
        return Err("it does not say the image's os and architecture".into());
    }
    serde_json::from_value(v).map_err(|e| format!("bad field: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_syntax() {
        assert!(parse_platform("linux").is_err());
        assert!(parse_platform("linux//x").is_err());
        assert_eq!(
            platform_name(&parse_platform("linux/arm64/v8").unwrap()),
            "linux/arm64/v8"
        );
    }

    #[test]
    fn parses_each_manifest_kind() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
            "manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":3,
            "platform":{"architecture":"amd64","os":"linux"}}]}"#;
        assert!(
            matches!(parse(index, None).unwrap(), Manifest::Index(m) if m.manifests().len() == 1)
        );
        let image = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":1},
            "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","size":2}]}"#;
        match parse(image, Some(DOCKER_MANIFEST)).unwrap() {
            Manifest::Image(m) => assert_eq!(m.layers()[0].size(), 2),
            m => panic!("{m:?}"),
        }
        let v1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(parse(v1, None).unwrap_err().contains("schema 1"));
        assert!(parse(b"<html>", None).unwrap_err().contains("JSON"));
    }

    #[test]
    fn unknown_manifest_media_types_are_refused() {
        let shape = r#""schemaVersion":2,"config":{"digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":1},"layers":[]"#;
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
    fn configs_must_be_json_objects_naming_their_platform() {
        let ok = parse_config(
            br#"{"os":"linux","architecture":"amd64","created":"2024-01-01T00:00:00Z",
            "rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(ok.architecture().to_string(), "amd64");
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
            r#"{{"mediaType":"{OCI_MANIFEST}","manifests":[],"config":{{"digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":1}},"layers":[]}}"#
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

    const D: &str = r#"{"digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":1}"#;

    #[test]
    fn missing_versions_and_descriptor_media_types_read_as_2_and_empty() {
        let image = format!(r#"{{"config":{D},"layers":[{D}],"subject":{D}}}"#);
        match parse(image.as_bytes(), None).unwrap() {
            Manifest::Image(m) => {
                assert_eq!(m.schema_version(), 2);
                assert_eq!(m.layers()[0].media_type().as_ref(), "");
                assert_eq!(m.subject().as_ref().unwrap().media_type().as_ref(), "");
            }
            m => panic!("{m:?}"),
        }
        let index = format!(r#"{{"schemaVersion":2,"manifests":[{D}]}}"#);
        match parse(index.as_bytes(), None).unwrap() {
            Manifest::Index(i) => assert_eq!(i.manifests()[0].media_type().as_ref(), ""),
            m => panic!("{m:?}"),
        }
        // A version that is there is kept; a malformed digest is no manifest.
        let v3 = format!(r#"{{"schemaVersion":3,"config":{D},"layers":[]}}"#);
        assert!(
            matches!(parse(v3.as_bytes(), None), Ok(Manifest::Image(m)) if m.schema_version() == 3)
        );
        let bad = r#"{"config":{"digest":"sha256:../x","size":1},"layers":[]}"#;
        let e = parse(bad.as_bytes(), None).unwrap_err();
        assert!(e.starts_with("not a JSON manifest: "), "{e}");
    }

    #[test]
    fn a_config_must_say_its_platform_before_its_fields_are_read() {
        for bad in [
            r#"{"os":null,"architecture":"amd64"}"#,
            r#"{"os":"linux","architecture":""}"#,
            r#"{"architecture":"amd64","rootfs":{"type":"layers","diff_ids":[]}}"#,
        ] {
            let e = parse_config(bad.as_bytes()).unwrap_err();
            assert_eq!(
                e, "it does not say the image's os and architecture",
                "{bad}"
            );
        }
        // Both formats require the rootfs (mkt does not use it).
        let e = parse_config(br#"{"os":"linux","architecture":"amd64"}"#).unwrap_err();
        assert!(e.starts_with("bad field: missing field `rootfs`"), "{e}");
    }
}
