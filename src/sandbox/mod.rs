//! Entering a rootfs tree without root: a user namespace that maps only the
//! caller's own uid/gid (so every file a build writes belongs to the caller),
//! plus mount, pid, uts and ipc namespaces, and `pivot_root` into the tree.
//! [`plan`] decides the mounts (pure), [`exec`] carries them out in the
//! child processes, [`idmap`] holds the id maps, [`spawn`] runs a command
//! with the caller's subordinate ids.

mod error;
pub mod exec;
pub mod idmap;
pub mod plan;
pub mod spawn;
mod sys;

pub use error::NsError;
pub use exec::{Exit, Output, Spec, run};
pub use idmap::{IdRange, Ids, IdsError};
pub use plan::{DEVICES, HostFs, Kind, Layout, Mount, Op, TreeView, What, plan};
pub use spawn::{run_mapped, spawn_mapped};
