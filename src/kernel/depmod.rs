//! The modules of a kernel tree as the guest sees them: links to the build
//! tree and depmod's files, made on the host and cached.

use crate::guest;
use crate::host;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The size and mtime of every tree module at boot, for `mkt
/// modules-reload` in the guest (what the guest would see: same files).
pub(crate) fn modules_boot_record(links: &[(PathBuf, PathBuf)], release: &str) -> guest::GenFile {
    use std::os::unix::fs::MetadataExt;
    let kernel_dir = PathBuf::from("/lib/modules").join(release).join("kernel");
    let mut text = String::new();
    for (link, target) in links.iter().filter(|(l, _)| l.starts_with(&kernel_dir)) {
        if let Ok(m) = std::fs::metadata(target) {
            text += &format!(
                "{}\t{}\t{}\t{}\n",
                link.display(),
                m.size(),
                m.mtime(),
                m.mtime_nsec()
            );
        }
    }
    guest::GenFile {
        name: "modules.boot".into(),
        content: text.into_bytes(),
        dest: Some("/etc/mkt/modules.boot".into()),
        mode: 0o644,
    }
}

/// The files depmod makes; the rest of /lib/modules/REL is links to the tree.
pub(crate) const DEPMOD_OUTPUTS: &[&str] = &[
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.devname",
];

/// Indexes a tree's modules with the host's depmod (milliseconds) instead of
/// the guest's (seconds under TCG), cached by the modules' paths, sizes and
/// mtimes. None when the host has no depmod or it fails: the guest does it.
pub(crate) fn host_depmod(
    links: &[(PathBuf, PathBuf)],
    release: &str,
    cache: &Path,
    run_dir: &Path,
) -> Option<Vec<guest::GenFile>> {
    use std::hash::Hasher;
    let moddir = PathBuf::from("/lib/modules").join(release);
    let mine: Vec<&(PathBuf, PathBuf)> = links
        .iter()
        .filter(|(l, _)| l.starts_with(&moddir))
        .collect();
    let mut h = crate::util::hash::Fnv::default();
    h.write(release.as_bytes());
    for (link, target) in &mine {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(target).ok()?;
        h.write(link.as_os_str().as_encoded_bytes());
        h.write(target.as_os_str().as_encoded_bytes());
        h.write(&m.size().to_le_bytes());
        h.write(&m.mtime_nsec().to_le_bytes());
        h.write(&m.mtime().to_le_bytes());
    }
    let key = cache.join(format!("{release}-{:016x}", h.finish()));
    if !key.join("modules.dep").exists() {
        let depmod = ["/sbin/depmod", "/usr/sbin/depmod"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| host::which("depmod"))?;
        let base = run_dir.join("depmod");
        for (link, target) in &mine {
            let at = base.join(link.strip_prefix("/").ok()?);
            std::fs::create_dir_all(at.parent()?).ok()?;
            std::os::unix::fs::symlink(target, &at).ok()?;
        }
        let ok = Command::new(depmod)
            .arg("-b")
            .arg(&base)
            .arg(release)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let out = base.join(moddir.strip_prefix("/").ok()?);
        let tmp = cache.join(format!(".tmp-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).ok()?;
        for name in DEPMOD_OUTPUTS {
            if let Ok(data) = std::fs::read(out.join(name)) {
                std::fs::write(tmp.join(name), data).ok()?;
            }
        }
        let _ = std::fs::remove_dir_all(&base);
        // Another mkt may have won the race: then its copy is as good.
        if std::fs::rename(&tmp, &key).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    Some(
        DEPMOD_OUTPUTS
            .iter()
            .filter_map(|name| {
                Some(guest::GenFile {
                    name: (*name).to_string(),
                    content: std::fs::read(key.join(name)).ok()?,
                    dest: Some(moddir.join(name).display().to_string()),
                    mode: 0o644,
                })
            })
            .collect(),
    )
}
