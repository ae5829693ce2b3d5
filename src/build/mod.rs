//! `mkt build`: builds a source tree inside a rootfs entered with
//! namespaces ([`crate::sandbox`]): project discovery and per-project steps
//! (`project.rs`), the environment inside the rootfs, shared with `mkt ci`
//! (`env.rs`: mounts, PATH, ccache, `-j` from the CPUs really available),
//! the command (`command.rs`: the minimal VM kernel config, silent output
//! with a log, user-owned outputs).

use std::io;
use std::path::PathBuf;

use crate::sandbox;

mod command;
mod env;
mod fast;
mod project;

pub use command::{
    BuildOptions, build, dropped_options, error_lines, kconfig_report, parse_config,
};
pub(crate) use command::{resolve_src, rootfs_for};
pub(crate) use env::{Env, make_argv, prepare_env};
pub(crate) use project::check_wanted;
pub use project::{PROJECT_NAMES, Project, Step, StepInput, discover, kernel_version, steps};

/// mkt's VM kernel fragment, merged over tinyconfig + kvm_guest.config.
pub const VM_CONFIG: &str = include_str!("../../configs/vm.config");

/// Where mkt's generated files appear inside the tree.
pub(crate) const MKT_DIR: &str = "/tmp/.mkt";

const LOOKED_FOR: &str = "a Linux kernel (Kbuild, a Makefile with VERSION and PATCHLEVEL, arch/), \
rdma-core (CMakeLists.txt with project(rdma-core)), iproute2 (ip/ and configure), \
QEMU (configure, meson.build and qemu-options.hx)";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no project found in {0}: looked for {LOOKED_FOR}")]
    NotAProject(PathBuf),
    #[error("{dir} is not a {want} tree: it looks like {found}")]
    WrongProject {
        dir: PathBuf,
        want: String,
        found: String,
    },
    #[error("unknown project {0:?} (known: {known})", known = PROJECT_NAMES.join(", "))]
    UnknownProject(String),
    #[error("--with-kernel-headers: no kernel tree given and no kernel in the config")]
    NoHeadersTree,
    #[error("project custom needs --recipe FILE")]
    NoRecipe,
    #[error("--recipe {0}: cannot read it")]
    Recipe(PathBuf, #[source] io::Error),
    #[error("-C {0}: not a directory")]
    NoDir(PathBuf, #[source] io::Error),
    #[error("--dir {0}: not a directory")]
    BadDir(PathBuf),
    #[error(transparent)]
    Rootfs(#[from] crate::rootfs::resolve::ResolveError),
    #[error("cannot create {0}")]
    Create(PathBuf, #[source] io::Error),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("cannot enter the rootfs {0} to run {1}")]
    Enter(PathBuf, String, #[source] sandbox::NsError),
}
