//! `mkt rootfs pull`: an image reference to a tree of the store. The steps:
//! resolve (index → platform → manifest) and check the layers and sizes
//! against the limits before any download (`oci::resolve`), fetch and check the config,
//! then download the layers in parallel while unpacking them in order
//! (here, or in a user namespace with the user's subordinate ids).

use super::{
    How, Meta, Owners, PullOptions, Pulled, RootfsError, TempTree, bars, check_name, commit,
    ensure_store, how, human, lock, new_temp, short, store_err, sweep_stale, tree_size,
};
use crate::config::Paths;
use crate::oci::Limits;
use crate::oci::manifest::{self, platform_name};
use crate::oci::resolve::{self, ResolveError};
use crate::oci::{BlobStore, OciError, Reference, Registry, auth};
use crate::rootfs::unpack::{self, UnpackError, Unpacker};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use oci_spec::image::{ImageConfiguration, ImageManifest, Platform};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

/// Layers downloaded at once.
const PARALLEL: usize = 4;

/// Pulls `opts.image` into the store. `cancel` (set by a signal handler)
/// stops downloads and the unpack; whatever is half done is removed.
pub fn pull(paths: &Paths, opts: &PullOptions, cancel: &AtomicBool) -> Result<Pulled, RootfsError> {
    let started = Instant::now();
    // Keeps `rootfs gc` from deleting the layers until the tree is stored.
    let _blobs = lock::blobs_shared(&paths.blob_dir)?;
    let u = pull_unpacked(paths, opts, cancel)?;
    let target = paths.rootfs_dir.join(&u.meta.name);
    commit(paths, &u.meta.name.clone(), u.temp, &u.meta, opts.force)?;
    tracing::info!(
        "pulled {} in {:.1} s",
        opts.image,
        started.elapsed().as_secs_f64()
    );
    Ok(Pulled {
        path: target,
        meta: u.meta,
        downloaded: u.downloaded,
        skipped_xattrs: u.skipped_xattrs,
    })
}

/// A pulled image unpacked into a temp dir of the store, not yet in place.
pub(crate) struct Unpacked {
    pub temp: TempTree,
    pub meta: Meta,
    pub downloaded: u64,
    pub skipped_xattrs: Vec<String>,
}

/// The image one pull is about, for its error messages.
struct Job<'a> {
    image: &'a str,
    /// Where the tree will be.
    target: PathBuf,
}

impl Job<'_> {
    fn pull_err(&self, source: OciError) -> RootfsError {
        RootfsError::Pull {
            image: self.image.into(),
            source: Box::new(source),
        }
    }

    fn image_err(&self, reason: String) -> RootfsError {
        RootfsError::Image {
            image: self.image.into(),
            reason,
        }
    }

    fn resolve_err(&self, e: ResolveError) -> RootfsError {
        match e {
            ResolveError::Registry(e) => self.pull_err(e),
            ResolveError::Image(reason) => self.image_err(reason),
        }
    }

    fn unpack_err(&self, source: UnpackError) -> RootfsError {
        RootfsError::Unpack {
            image: self.image.into(),
            path: self.target.clone(),
            source: Box::new(source),
        }
    }
}

/// Downloads and unpacks `opts.image` into a temp dir of the store.
pub(crate) fn pull_unpacked(
    paths: &Paths,
    opts: &PullOptions,
    cancel: &AtomicBool,
) -> Result<Unpacked, RootfsError> {
    let reference = Reference::parse(&opts.image)?;
    let platform = manifest::parse_platform(&opts.platform).map_err(RootfsError::Platform)?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| reference.default_name());
    check_name(&name)?;
    let store = &paths.rootfs_dir;
    ensure_store(paths)?;
    std::fs::create_dir_all(&paths.blob_dir).map_err(store_err("create", &paths.blob_dir))?;
    sweep_stale(store);
    let target = store.join(&name);
    if target.symlink_metadata().is_ok() && !opts.force {
        return Err(RootfsError::Exists { name, path: target });
    }
    let job = Job {
        image: &opts.image,
        target,
    };
    let limits = paths.limits;
    let reg = registry(&job, paths, &reference, opts.insecure)?;
    let shown = reference.to_string();
    let chosen =
        resolve::resolve(&reg, &reference, &platform, &limits).map_err(|e| job.resolve_err(e))?;
    let config = fetch_config(&job, &reg, paths, &chosen.manifest, &platform, cancel)?;

    // Unpack into a temp dir while the layers download; the xattr probe in
    // Unpacker::new fails before any download on an unsuitable store.
    let temp = new_temp(store, "tmp", &name)?;
    let temp_path = temp.0.clone().expect("temp dir");
    let how = how(opts.owners, &name)?;
    let unpacker = match &how {
        How::Here(record, _) => {
            let mut u =
                Unpacker::with_record(&temp_path, *record).map_err(|e| job.unpack_err(e))?;
            u.set_limits(limits.layer, limits.image);
            Some(u)
        }
        How::Mapped(_) => None,
    };
    let progress = Progress::new(&chosen.manifest, opts.quiet);
    let fetched = download_and_unpack(
        &job,
        reg,
        paths,
        &chosen.manifest,
        unpacker,
        &progress,
        cancel,
    )?;
    let (stats, owners) = match (fetched.unpacker, &how) {
        (Some(u), How::Here(_, owners)) => (u.finish().map_err(|e| job.unpack_err(e))?, *owners),
        (_, How::Mapped(ids)) => {
            progress
                .total
                .set_message("unpacking with your subordinate ids");
            unpack_mapped(&job, &name, &temp_path, &limits, &fetched.later, ids)?;
            (unpack::Stats::default(), Owners::Mapped)
        }
        _ => unreachable!("an unpacker exactly when unpacking here"),
    };
    progress.clear();

    // What the tree holds now (layers overwrite and delete each other's files).
    let (size, entries) = tree_size(&temp_path);
    let meta = Meta {
        name: name.clone(),
        image: opts.image.clone(),
        reference: shown,
        manifest_digest: chosen.manifest_digest,
        index_digest: chosen.index_digest,
        config_digest: chosen.manifest.config().digest().to_string(),
        platform: platform_name(&platform),
        layers: (chosen.manifest.layers().iter())
            .map(|l| l.digest().to_string())
            .collect(),
        created: config.created().clone(),
        pulled: crate::util::time::rfc3339_now(),
        size,
        entries,
        recipe: None,
        owners,
    };
    Ok(Unpacked {
        temp,
        meta,
        downloaded: fetched.downloaded,
        skipped_xattrs: stats.skipped_xattrs,
    })
}

/// A client for the reference's registry, with the user's credentials.
fn registry(
    job: &Job,
    paths: &Paths,
    reference: &Reference,
    insecure: bool,
) -> Result<Registry, RootfsError> {
    let env = |k: &str| std::env::var(k).ok();
    let files = auth::auth_files(env, &paths.home);
    let creds = auth::lookup(&files, &reference.registry, &reference.repository)
        .map_err(|e| job.pull_err(OciError::AuthFile(e)))?;
    if let Some(c) = &creds {
        tracing::info!(
            "using credentials for {} from {}",
            reference.registry,
            c.source.display()
        );
    }
    let mut reg = Registry::new(reference, insecure, creds, files).map_err(|e| job.pull_err(e))?;
    reg.max_manifest = paths.limits.manifest;
    Ok(reg)
}

/// Downloads and reads the image config; it must be for `platform`.
fn fetch_config(
    job: &Job,
    reg: &Registry,
    paths: &Paths,
    img: &ImageManifest,
    platform: &Platform,
    cancel: &AtomicBool,
) -> Result<ImageConfiguration, RootfsError> {
    let limits = paths.limits;
    let blobs = BlobStore::new(&paths.blob_dir);
    let (config_path, _) = blobs
        .fetch(
            reg,
            img.config().digest().as_ref(),
            img.config().size(),
            &ProgressBar::hidden(),
            cancel,
        )
        .map_err(|e| job.pull_err(e))?;
    // Its size was checked before; read with a cap all the same.
    let mut config_bytes = Vec::new();
    {
        use std::io::Read;
        std::fs::File::open(&config_path)
            .map_err(store_err("open", &config_path))?
            .take(limits.config)
            .read_to_end(&mut config_bytes)
            .map_err(store_err("read", &config_path))?;
    }
    let config = manifest::parse_config(&config_bytes).map_err(|reason| {
        job.image_err(format!(
            "its config {} is not an image config: {reason}",
            img.config().digest()
        ))
    })?;
    let (os, arch) = (config.os(), config.architecture());
    if os != platform.os() || arch != platform.architecture() {
        return Err(job.image_err(format!(
            "the image is {os}/{arch}, not {} (use --platform {os}/{arch} to pull it anyway)",
            platform_name(platform)
        )));
    }
    Ok(config)
}

/// A bar per layer and one for the total (hidden when quiet or no terminal).
struct Progress {
    _multi: MultiProgress,
    layers: Vec<ProgressBar>,
    total: ProgressBar,
}

impl Progress {
    fn new(img: &ImageManifest, quiet: bool) -> Progress {
        let multi = bars(quiet);
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
        )
        .expect("static template")
        .progress_chars("=> ");
        let layers: Vec<ProgressBar> = img
            .layers()
            .iter()
            .map(|l| {
                let b = multi.add(ProgressBar::new(l.size()).with_style(style.clone()));
                b.set_prefix(short(l.digest().as_ref()).to_string());
                b
            })
            .collect();
        let total_size: u64 = img.layers().iter().map(|l| l.size()).sum();
        let total = multi.add(
            ProgressBar::new(img.layers().len() as u64).with_style(
                ProgressStyle::with_template("{prefix:>12} {pos}/{len} layers unpacked, {msg}")
                    .expect("static template"),
            ),
        );
        total.set_prefix("total");
        total.set_message(format!("{} to fetch", human(total_size)));
        Progress {
            _multi: multi,
            layers,
            total,
        }
    }

    fn clear(&self) {
        self.total.finish_and_clear();
        for b in &self.layers {
            b.finish_and_clear();
        }
    }
}

/// What the download phase leaves.
struct Fetched {
    /// The unpacker (when unpacking here), every layer in.
    unpacker: Option<Unpacker>,
    /// The layers' digests and blobs, for an unpack in a user namespace.
    later: Vec<(String, PathBuf)>,
    /// Bytes transferred (not already cached).
    downloaded: u64,
}

/// Downloads the layers, `PARALLEL` at a time, and unpacks each in order
/// as soon as it is in (or keeps it for a mapped unpack).
fn download_and_unpack(
    job: &Job,
    reg: Registry,
    paths: &Paths,
    img: &ImageManifest,
    mut unpacker: Option<Unpacker>,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Fetched, RootfsError> {
    let n = img.layers().len();
    let next = Arc::new(AtomicUsize::new(0));
    let downloaded = Arc::new(AtomicUsize::new(0));
    // The downloads are not scoped: after Ctrl-C or an error the pull
    // returns (and removes its temp dir) at once instead of waiting for a
    // request the registry stalls, up to the client's timeout; `stop` ends
    // them at their next read, or the process's exit does.
    let stop = Arc::new(AtomicBool::new(false));
    let reg = Arc::new(reg);
    let layers: Arc<Vec<(String, u64)>> = Arc::new(
        img.layers()
            .iter()
            .map(|l| (l.digest().to_string(), l.size()))
            .collect(),
    );
    let mut later: Vec<(String, PathBuf)> = Vec::new();
    let mut downloads = Vec::new();
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..PARALLEL.min(n) {
        let tx = tx.clone();
        let (reg, blobs, layers, next, layer_bars, downloaded, stop) = (
            reg.clone(),
            BlobStore::new(&paths.blob_dir),
            layers.clone(),
            next.clone(),
            progress.layers.clone(),
            downloaded.clone(),
            stop.clone(),
        );
        downloads.push(std::thread::spawn(move || {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || stop.load(Ordering::Relaxed) {
                    break;
                }
                let (digest, size) = &layers[i];
                let r = blobs.fetch(&reg, digest, *size, &layer_bars[i], &stop);
                if let Ok((_, f)) = &r {
                    downloaded.fetch_add(f.downloaded as usize, Ordering::Relaxed);
                    layer_bars[i].set_message("downloaded");
                }
                if tx.send((i, r)).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let mut ready: Vec<Option<PathBuf>> = vec![None; n];
    let mut run = || -> Result<(), RootfsError> {
        for (i, l) in img.layers().iter().enumerate() {
            while ready[i].is_none() {
                if cancel.load(Ordering::Relaxed) {
                    return Err(job.pull_err(OciError::Interrupted));
                }
                let wait = std::time::Duration::from_millis(200);
                match rx.recv_timeout(wait) {
                    Ok((j, r)) => ready[j] = Some(r.map_err(|e| job.pull_err(e))?.0),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(_) => return Err(job.pull_err(OciError::Interrupted)),
                }
            }
            let blob = ready[i].take().expect("just checked");
            let Some(unpacker) = unpacker.as_mut() else {
                later.push((l.digest().to_string(), blob));
                continue;
            };
            progress.layers[i].set_message("unpacking");
            unpacker
                .unpack_layer(&blob, l.digest().as_ref(), cancel)
                .map_err(|e| job.unpack_err(e))?;
            progress.layers[i].finish_with_message("unpacked");
            progress.total.inc(1);
        }
        Ok(())
    };
    if let Err(e) = run() {
        // Stop the other downloads; their partial files stay for a resume.
        cancel.store(true, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        return Err(e);
    }
    // Every layer is in: the downloads have ended or are about to.
    for d in downloads {
        let _ = d.join();
    }
    Ok(Fetched {
        unpacker,
        later,
        downloaded: downloaded.load(Ordering::Relaxed) as u64,
    })
}

/// Unpacks the downloaded layers with `mkt rootfs unpack-layers` as root of
/// a user namespace with the user's subordinate ids.
fn unpack_mapped(
    job: &Job,
    name: &str,
    into: &Path,
    limits: &Limits,
    layers: &[(String, PathBuf)],
    ids: &crate::sandbox::Ids,
) -> Result<(), RootfsError> {
    let exe = std::env::current_exe().map_err(store_err("find", Path::new("/proc/self/exe")))?;
    let mut argv: Vec<std::ffi::OsString> = vec![
        exe.into(),
        "rootfs".into(),
        "unpack-layers".into(),
        "--into".into(),
        into.into(),
        "--max-layer".into(),
        limits.layer.to_string().into(),
        "--max-image".into(),
        limits.image.to_string().into(),
    ];
    argv.extend(layers.iter().map(|(d, p)| {
        let mut a = std::ffi::OsString::from(format!("{d}="));
        a.push(p);
        a
    }));
    let status =
        crate::sandbox::run_mapped(&argv, ids, None).map_err(|source| RootfsError::Enter {
            name: name.into(),
            source,
        })?;
    if status != 0 {
        return Err(RootfsError::MappedUnpack {
            image: job.image.into(),
            status,
        });
    }
    Ok(())
}
