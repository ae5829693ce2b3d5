//! The QEMU command line as data: profiles (machine type, bus, kernel words)
//! and pure builders that turn a [`VmSpec`] into an argv. No I/O except
//! loading profile files.

pub mod args;
pub mod profile;

pub use args::{
    Console, Net, Nvme, Port, Share, VmSpec, base_args, cmdline, cmdline_limit, command_line,
    console_args, cpu_mem_args, gdb_args, is_pcie, kernel_args, machine_args, mem_for_devices,
    net_args, nvme_args, pci_args, ports_args, qemu_escape, qmp_args, rng_args, share_args,
};
pub use profile::{Bus, DEFAULT_PROFILE, Profile, ProfileError, builtin_names, known_names};
