//! A kernel on the host: a built tree or an image, its release, what its
//! config has built in.

pub mod depmod;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "--kernel {0}: neither a built kernel tree ({image}) nor a kernel image file",
        image = arch::HOST.image
    )]
    BadKernel(PathBuf),
    #[error(
        "no kernel: --kernel not given, no kernel in the config, the current directory is not a built kernel tree, and {0}/boot has no vmlinuz-*"
    )]
    NoKernel(PathBuf),
    #[error("kernel tree {0}")]
    Modules(PathBuf, #[source] crate::guest::modules::ModulesError),
    #[error("cannot read the kernel release from {0} (pass --modules DIR to name the modules)")]
    NoRelease(PathBuf),
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
}

use crate::arch;
use crate::guest;
use std::path::{Path, PathBuf};

/// The kernel to boot and how its modules reach the guest.
#[derive(Debug, Clone, PartialEq)]
pub enum Kernel {
    /// A built tree: bzImage, modules linked from the tree.
    Tree { tree: PathBuf, release: String },
    /// An image file with its modules dir (a distro kernel).
    Image {
        image: PathBuf,
        release: String,
        modules: Option<PathBuf>,
    },
}

impl Kernel {
    pub fn image(&self) -> PathBuf {
        match self {
            Kernel::Tree { tree, .. } => tree.join(arch::HOST.image),
            Kernel::Image { image, .. } => image.clone(),
        }
    }
}

/// The release string in a bzImage's header (the "kernel_version" field).
pub(crate) fn bzimage_release(data: &[u8]) -> Option<String> {
    // Boot protocol: "HdrS" at 0x202; kernel_version pointer at 0x20e,
    // relative to 0x200.
    if data.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes([*data.get(0x20e)?, *data.get(0x20f)?]) as usize + 0x200;
    let s = data.get(off..off + 256)?;
    let end = s.iter().position(|&b| b == 0 || b == b' ')?;
    String::from_utf8(s[..end].to_vec()).ok()
}

pub(crate) fn is_kernel_tree(dir: &Path) -> bool {
    dir.join(arch::HOST.image).is_file() && dir.join("Kbuild").exists()
}

/// --kernel, else the setup's or config's kernel, else the current
/// directory when it is a built tree, else the rootfs's own newest kernel.
pub(crate) fn resolve_kernel(
    explicit: Option<&Path>,
    modules: Option<&Path>,
    cwd: &Path,
    rootfs: &Path,
) -> Result<Kernel, KernelError> {
    let tree = |t: &Path| -> Result<Kernel, KernelError> {
        let tm = guest::modules::tree_modules(t).map_err(|e| KernelError::Modules(t.into(), e))?;
        Ok(Kernel::Tree {
            tree: t.to_path_buf(),
            release: tm.release,
        })
    };
    let image = |img: &Path, modules: Option<&Path>, root: Option<&Path>| {
        let data = std::fs::read(img).map_err(|e| KernelError::Read(img.into(), e))?;
        let release = bzimage_release(&data)
            .or_else(|| {
                img.file_name()?
                    .to_str()?
                    .strip_prefix("vmlinuz-")
                    .map(str::to_string)
            })
            .ok_or_else(|| KernelError::NoRelease(img.into()))?;
        let modules = modules.map(Path::to_path_buf).or_else(|| {
            let d = root?.join("lib/modules").join(&release);
            d.is_dir().then_some(d)
        });
        Ok(Kernel::Image {
            image: img.to_path_buf(),
            release,
            modules,
        })
    };
    if let Some(k) = explicit {
        if k.is_dir() {
            if k.join(arch::HOST.image).is_file() {
                return tree(k);
            }
            return Err(KernelError::BadKernel(k.into()));
        }
        if k.is_file() {
            return image(k, modules, None);
        }
        return Err(KernelError::BadKernel(k.into()));
    }
    if is_kernel_tree(cwd) {
        return tree(cwd);
    }
    let boot = rootfs.join("boot");
    let mut images: Vec<PathBuf> = std::fs::read_dir(&boot)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vmlinuz-"))
                })
                .collect()
        })
        .unwrap_or_default();
    images.sort();
    match images.last() {
        Some(img) => image(img, modules, Some(rootfs)),
        None => Err(KernelError::NoKernel(rootfs.into())),
    }
}

/// Whether the kernel has `option` (=y or =m), from the tree's .config or
/// an image's config-RELEASE (next to its modules or in the rootfs's
/// /boot); None when no config says.
pub(crate) fn kernel_option(kernel: &Kernel, rootfs: &Path, option: &str) -> Option<bool> {
    let text = match kernel {
        Kernel::Tree { tree, .. } => std::fs::read_to_string(tree.join(".config")).ok()?,
        Kernel::Image {
            release, modules, ..
        } => {
            let name = format!("config-{release}");
            let mut places = vec![rootfs.join("boot").join(&name)];
            if let Some(m) = modules
                && let Some(root) = m.ancestors().nth(3)
            {
                // .../lib/modules/REL → .../boot/config-REL
                places.push(root.join("boot").join(&name));
            }
            places
                .iter()
                .find_map(|p| std::fs::read_to_string(p).ok())?
        }
    };
    Some(
        text.lines()
            .any(|l| l == format!("{option}=y") || l == format!("{option}=m")),
    )
}

/// Whether the kernel can mount `fs` (built in or as a module); true when
/// it cannot be told (an image without modules).
pub(crate) fn kernel_has(kernel: &Kernel, fs: guest::FsKind) -> bool {
    let (option, module) = match fs {
        guest::FsKind::NineP => ("CONFIG_9P_FS", "9p"),
        guest::FsKind::Virtiofs => ("CONFIG_VIRTIO_FS", "virtiofs"),
    };
    match kernel {
        Kernel::Tree { tree, .. } => std::fs::read_to_string(tree.join(".config"))
            .map(|c| {
                c.lines()
                    .any(|l| l == format!("{option}=y") || l == format!("{option}=m"))
            })
            .unwrap_or(true),
        Kernel::Image {
            modules: Some(dir), ..
        } => guest::modules::resolve(dir, &[module])
            .map(|p| p.absent.is_empty())
            .unwrap_or(true),
        Kernel::Image { .. } => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_release_reads_the_header() {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = b"6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        img[0x500..0x500 + v.len()].copy_from_slice(v);
        assert_eq!(
            bzimage_release(&img).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        img[0x202] = b'X';
        assert_eq!(bzimage_release(&img), None);
    }

    #[test]
    fn kernel_resolution_order() {
        let rootfs = tempfile::tempdir().unwrap();
        let cwd = tempfile::tempdir().unwrap();
        // Nothing anywhere: the error says where mkt looked.
        let e = resolve_kernel(None, None, cwd.path(), rootfs.path()).unwrap_err();
        assert!(matches!(e, KernelError::NoKernel(_)));
        // The rootfs's newest vmlinuz, with its modules dir.
        std::fs::create_dir_all(rootfs.path().join("boot")).unwrap();
        std::fs::create_dir_all(rootfs.path().join("lib/modules/6.1.0-9")).unwrap();
        for v in ["6.1.0-1", "6.1.0-9"] {
            std::fs::write(rootfs.path().join(format!("boot/vmlinuz-{v}")), b"x").unwrap();
        }
        let k = resolve_kernel(None, None, cwd.path(), rootfs.path()).unwrap();
        assert_eq!(
            k,
            Kernel::Image {
                image: rootfs.path().join("boot/vmlinuz-6.1.0-9"),
                release: "6.1.0-9".into(),
                modules: Some(rootfs.path().join("lib/modules/6.1.0-9")),
            }
        );
        // A --kernel that is neither a tree nor a file.
        let e = resolve_kernel(Some(cwd.path()), None, cwd.path(), rootfs.path()).unwrap_err();
        assert!(e.to_string().contains("neither a built kernel tree"), "{e}");
    }
}
