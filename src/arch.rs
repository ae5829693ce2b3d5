//! The architecture mkt builds and boots for, as one value: the names that
//! differ between architectures live here, so a second one is an entry in
//! this file (and the guest init's syscall numbers, src/guest/init/sys.rs).

/// What differs between architectures, for the host's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    /// The boot image a kernel build leaves, relative to its tree.
    pub image: &'static str,
    /// The QEMU system emulator.
    pub qemu: &'static str,
    /// QEMU's configure target when mkt builds QEMU.
    pub qemu_target: &'static str,
    /// How to install `qemu` on Debian and on Fedora.
    pub qemu_debian: &'static str,
    pub qemu_fedora: &'static str,
    /// The OCI platform picked from a multi-platform image.
    pub oci_platform: &'static str,
    /// The multiarch triple of Debian's include and library dirs.
    pub multiarch: &'static str,
    /// The kernel's name of the serial console QEMU's `-serial` is.
    pub console: &'static str,
}

pub(crate) const X86_64: Arch = Arch {
    image: "arch/x86/boot/bzImage",
    qemu: "qemu-system-x86_64",
    qemu_target: "x86_64-softmmu",
    qemu_debian: "sudo apt-get install -y qemu-system-x86",
    qemu_fedora: "sudo dnf install -y qemu-system-x86-core",
    oci_platform: "linux/amd64",
    multiarch: "x86_64-linux-gnu",
    console: "ttyS0",
};

/// The host's architecture: mkt boots guests of its own kind.
#[cfg(target_arch = "x86_64")]
pub const HOST: Arch = X86_64;
#[cfg(not(target_arch = "x86_64"))]
compile_error!("mkt knows x86_64 only: add this architecture to src/arch.rs");
