//! The one way from a reference to the image manifest a pull unpacks: the
//! index (when there is one), its entry for the platform, the image
//! manifest, and its layers and config checked, before any download,
//! against what mkt can unpack and the size limits.

use super::manifest::{self, KNOWN, Manifest, platform_name};
use super::{Limits, OciError, Reference, Registry, human, reference::check_digest, show_limit};
use oci_spec::image::{Descriptor, ImageManifest, Platform};

/// Why a reference leads to no image mkt pulls.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The registry failed, or sent a manifest that is none.
    #[error(transparent)]
    Registry(#[from] OciError),
    /// The image is not one mkt can pull: platform, media types, sizes.
    #[error("{0}")]
    Image(String),
}

/// The image manifest a reference and platform lead to.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub index_digest: Option<String>,
    pub manifest_digest: String,
    pub manifest: ImageManifest,
}

/// The image manifest of `reference` for `platform`, through an index
/// when there is one, checked.
pub(crate) fn resolve(
    reg: &Registry,
    reference: &Reference,
    platform: &Platform,
    limits: &Limits,
) -> Result<Resolved, ResolveError> {
    let shown = reference.to_string();
    let bad = |reference: &str, reason| OciError::Manifest {
        image: shown.clone(),
        reference: reference.into(),
        reason,
    };
    let (body, ctype, digest) = reg.manifest(reference.manifest_ref(), &shown)?;
    let parsed = manifest::parse(&body, ctype.as_deref());
    let (index_digest, manifest_digest, img) =
        match parsed.map_err(|reason| bad(reference.manifest_ref(), reason))? {
            Manifest::Image(img) => (None, digest, img),
            Manifest::Index(index) => {
                let chosen = select(index.manifests(), platform)
                    .map_err(ResolveError::Image)?
                    .digest()
                    .to_string();
                check_digest(&chosen).map_err(ResolveError::Image)?;
                tracing::info!("{shown}: {} is {chosen}", platform_name(platform));
                let (body, ctype, d) = reg.manifest(&chosen, &shown)?;
                match manifest::parse(&body, ctype.as_deref()) {
                    Ok(Manifest::Image(img)) => (Some(digest), d, img),
                    Ok(Manifest::Index(_)) => {
                        return Err(ResolveError::Image(format!(
                            "{chosen} is a nested index, which mkt does not follow"
                        )));
                    }
                    Err(reason) => return Err(bad(&chosen, reason).into()),
                }
            }
        };
    check(&img, limits).map_err(ResolveError::Image)?;
    Ok(Resolved {
        index_digest,
        manifest_digest,
        manifest: *img,
    })
}

/// Attestations and other non-images sit in indexes as `unknown/unknown`.
fn is_attestation(d: &Descriptor) -> bool {
    d.platform().as_ref().is_some_and(|p| {
        p.os().to_string() == "unknown" || p.architecture().to_string() == "unknown"
    }) || d
        .annotations()
        .as_ref()
        .and_then(|a| a.get("vnd.docker.reference.type"))
        .is_some_and(|t| t == "attestation-manifest")
}

/// The index entry for `want`. Without a wanted variant, an entry without
/// one (or arm64's `v8`) is preferred over other variants.
pub(crate) fn select<'a>(
    entries: &'a [Descriptor],
    want: &Platform,
) -> Result<&'a Descriptor, String> {
    let name = platform_name(want);
    let images: Vec<&Descriptor> = entries.iter().filter(|d| !is_attestation(d)).collect();
    let for_platform = images.iter().copied().filter(|d| {
        (d.platform().as_ref())
            .is_some_and(|p| p.os() == want.os() && p.architecture() == want.architecture())
    });
    // An entry of another media type (an artifact) is no image to unpack.
    let (candidates, others): (Vec<&Descriptor>, Vec<&Descriptor>) = for_platform.partition(|d| {
        let m = d.media_type().as_ref();
        m.is_empty() || KNOWN.contains(&m)
    });
    if candidates.is_empty()
        && let Some(d) = others.first()
    {
        return Err(format!(
            "the index's {name} entry {} has media type {:?}, which is not an image manifest (mkt takes {})",
            d.digest(),
            d.media_type().as_ref(),
            KNOWN.join(", ")
        ));
    }
    fn variant(d: &Descriptor) -> Option<&str> {
        d.platform().as_ref()?.variant().as_deref()
    }
    let chosen = match want.variant() {
        Some(v) => candidates.iter().find(|d| variant(d) == Some(v)),
        None => (candidates.iter().find(|d| variant(d).is_none()))
            .or_else(|| candidates.iter().find(|d| variant(d) == Some("v8")))
            .or(candidates.first()),
    };
    chosen.copied().ok_or_else(|| {
        let have: Vec<String> = (images.iter())
            .filter_map(|d| d.platform().as_ref().map(platform_name))
            .collect();
        let have = if have.is_empty() {
            "none".into()
        } else {
            have.join(", ")
        };
        format!("no {name} image in the index (it has: {have})")
    })
}

/// Refuses layers mkt cannot unpack and sizes the manifest announces over
/// a limit (the blobs are verified to have them; compressed layers are
/// rarely bigger than the files they hold).
fn check(img: &ImageManifest, limits: &Limits) -> Result<(), String> {
    for l in img.layers() {
        let (digest, media) = (l.digest().as_ref(), l.media_type().as_ref());
        check_digest(digest)?;
        if !manifest::is_layer(media) {
            return Err(format!(
                "layer {digest} has media type {media:?}, which is not a layer mkt can unpack"
            ));
        }
        if l.urls().as_ref().is_some_and(|u| !u.is_empty()) && media.contains("foreign") {
            return Err(format!("layer {digest} is a foreign layer"));
        }
    }
    let config = img.config();
    let (digest, media) = (config.digest().as_ref(), config.media_type().as_ref());
    check_digest(digest)?;
    if !manifest::is_config(media) {
        return Err(format!(
            "its config {digest} has media type {media:?}: it is not an image (an artifact?)"
        ));
    }
    let over = |size: u64, key: &str, limit: u64, what: &str, to_download: &str| {
        if size <= limit {
            return Ok(());
        }
        Err(format!(
            "{what} {}{to_download}, more than the limit of {} per {key} (`{key}` in the config's [limits])",
            human(size),
            show_limit(limit)
        ))
    };
    let what = format!("its config {digest} is");
    over(config.size(), "config", limits.config, &what, "")?;
    for l in img.layers() {
        let what = format!("layer {} is", l.digest());
        over(l.size(), "layer", limits.layer, &what, " to download")?;
    }
    let compressed = (img.layers().iter()).fold(0u64, |a, l| a.saturating_add(l.size()));
    over(
        compressed,
        "image",
        limits.image,
        "its layers are",
        " to download",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::manifest::{OCI_MANIFEST, parse_platform};
    use oci_spec::image::{Digest, ImageManifestBuilder};

    fn digest(n: u8) -> Digest {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
            .parse()
            .unwrap()
    }

    fn desc(os: &str, arch: &str, variant: Option<&str>, n: u8) -> Descriptor {
        let mut d = Descriptor::new(OCI_MANIFEST.into(), 1, digest(n));
        let mut p = parse_platform(&format!("{os}/{arch}")).unwrap();
        p.set_variant(variant.map(Into::into));
        d.set_platform(Some(p));
        d
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
        let pick = |s: &str| select(&list, &parse_platform(s).unwrap()).map(|d| d.digest().clone());
        assert_eq!(pick("linux/amd64").unwrap(), *list[3].digest());
        assert_eq!(pick("linux/arm64").unwrap(), *list[2].digest());
        assert_eq!(pick("linux/arm/v6").unwrap(), *list[4].digest());
        let e = pick("linux/s390x").unwrap_err();
        assert!(e.contains("linux/s390x"), "{e}");
        assert!(
            e.contains("linux/arm/v7, linux/arm64/v8, linux/amd64"),
            "{e}"
        );
        assert!(!e.contains("unknown"), "{e}");
        // Only an attestation for amd64: nothing to pick.
        let only = vec![desc("unknown", "unknown", None, 9)];
        assert!(select(&only, &parse_platform("linux/amd64").unwrap()).is_err());
    }

    #[test]
    fn index_entries_of_other_media_types_are_not_images() {
        let mut art = desc("linux", "amd64", None, 7);
        art.set_media_type("application/vnd.example.artifact+json".into());
        let amd = parse_platform("linux/amd64").unwrap();
        let e = select(std::slice::from_ref(&art), &amd).unwrap_err();
        assert!(
            e.contains(art.digest().as_ref())
                && e.contains("application/vnd.example.artifact+json"),
            "{e}"
        );
        // Beside a real image, the artifact is passed over.
        let img = desc("linux", "amd64", None, 8);
        assert_eq!(select(&[art, img.clone()], &amd).unwrap(), &img);
    }

    #[test]
    fn attestations_are_told_by_platform_or_annotation() {
        let amd = parse_platform("linux/amd64").unwrap();
        let half = desc("linux", "unknown", None, 1);
        assert!(is_attestation(&half));
        assert!(is_attestation(&desc("unknown", "amd64", None, 1)));
        let mut att = desc("linux", "amd64", None, 2);
        let note =
            |v: &str| Some([("vnd.docker.reference.type".to_string(), v.to_string())].into());
        att.set_annotations(note("attestation-manifest"));
        assert!(is_attestation(&att));
        assert!(select(std::slice::from_ref(&att), &amd).is_err());
        let mut other = desc("linux", "amd64", None, 3);
        other.set_annotations(note("something-else"));
        assert!(!is_attestation(&other));
        assert_eq!(select(&[att, other.clone()], &amd).unwrap(), &other);
    }

    #[test]
    fn arm64_without_a_variant_prefers_v8() {
        let list = vec![
            desc("linux", "arm64", Some("v9"), 1),
            desc("linux", "arm64", Some("v8"), 2),
        ];
        let got = select(&list, &parse_platform("linux/arm64").unwrap()).unwrap();
        assert_eq!(got, &list[1]);
    }

    /// An image manifest of `layers` (media type, size, urls) and a config
    /// of `config` (media type, size).
    fn image(layers: &[(&str, u64, bool)], config: (&str, u64)) -> ImageManifest {
        let layers: Vec<Descriptor> = (layers.iter().enumerate())
            .map(|(i, &(media, size, foreign))| {
                let mut d = Descriptor::new(media.into(), size, digest(i as u8 + 1));
                if foreign {
                    d.set_urls(Some(vec!["https://example.com/l".into()]));
                }
                d
            })
            .collect();
        let config = Descriptor::new(config.0.into(), config.1, digest(0xcc));
        ImageManifestBuilder::default()
            .schema_version(2u32)
            .config(config)
            .layers(layers)
            .build()
            .unwrap()
    }

    #[test]
    fn layers_and_config_are_checked_against_media_types_and_limits() {
        const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
        const CONF: &str = "application/vnd.oci.image.config.v1+json";
        let limits = Limits {
            manifest: 1 << 20,
            config: 1 << 10,
            layer: 1 << 20,
            image: 3 << 19,
        };
        let l1 = digest(1).to_string();
        let cfg = digest(0xcc).to_string();
        let c = |img: ImageManifest| check(&img, &limits);
        assert_eq!(
            c(image(
                &[(GZ, 1 << 20, false), ("", 1 << 19, false)],
                (CONF, 1 << 10)
            )),
            Ok(())
        );
        assert_eq!(c(image(&[], ("", 1))), Ok(()));
        let helm = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";
        assert_eq!(
            c(image(&[(helm, 1, false)], (CONF, 1))).unwrap_err(),
            format!("layer {l1} has media type \"{helm}\", which is not a layer mkt can unpack")
        );
        // Docker's foreign layers are no layer type mkt takes; a layer type
        // that says "foreign" is refused when it points elsewhere.
        let docker = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
        let e = c(image(&[(docker, 1, true)], (CONF, 1))).unwrap_err();
        assert!(e.ends_with("which is not a layer mkt can unpack"), "{e}");
        let foreign = "application/vnd.oci.image.layer.foreign.v1.tar";
        assert_eq!(
            c(image(&[(foreign, 1, true)], (CONF, 1))).unwrap_err(),
            format!("layer {l1} is a foreign layer")
        );
        // Without urls it is fetched from the registry like any layer.
        assert_eq!(c(image(&[(foreign, 1, false)], (CONF, 1))), Ok(()));
        let helm_config = "application/vnd.cncf.helm.config.v1+json";
        assert_eq!(
            c(image(&[], (helm_config, 1))).unwrap_err(),
            format!(
                "its config {cfg} has media type \"{helm_config}\": it is not an image (an artifact?)"
            )
        );
        assert_eq!(
            c(image(&[], (CONF, (1 << 10) + 1))).unwrap_err(),
            format!(
                "its config {cfg} is 1.0 KiB, more than the limit of 1 KiB per config (`config` in the config's [limits])"
            )
        );
        assert_eq!(
            c(image(&[(GZ, (1 << 20) + 1, false)], (CONF, 1))).unwrap_err(),
            format!(
                "layer {l1} is 1.0 MiB to download, more than the limit of 1 MiB per layer (`layer` in the config's [limits])"
            )
        );
        assert_eq!(
            c(image(
                &[(GZ, 1 << 20, false), (GZ, (1 << 19) + 1, false)],
                (CONF, 1)
            ))
            .unwrap_err(),
            "its layers are 1.5 MiB to download, more than the limit of 1536 KiB per image (`image` in the config's [limits])"
        );
        // Sizes that would overflow a sum still count as too much.
        let huge = Limits {
            layer: u64::MAX,
            image: u64::MAX - 1,
            ..limits
        };
        let e = check(
            &image(&[(GZ, u64::MAX, false), (GZ, 1, false)], (CONF, 1)),
            &huge,
        );
        assert!(e.unwrap_err().starts_with("its layers are"));
    }

    #[test]
    fn only_sha256_digests_are_taken() {
        let mut img = image(&[], ("", 1));
        let sha512: Digest = format!("sha512:{}", "a".repeat(128)).parse().unwrap();
        let mut config = img.config().clone();
        config.set_digest(sha512.clone());
        img.set_config(config);
        let e = check(&img, &Limits::default()).unwrap_err();
        assert!(e.contains("only sha256 is supported"), "{e}");
        let mut img = image(&[("", 1, false)], ("", 1));
        img.layers_mut()[0].set_digest(sha512);
        let e = check(&img, &Limits::default()).unwrap_err();
        assert!(e.contains("only sha256 is supported"), "{e}");
    }
}
