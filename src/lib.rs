//! mkt: build, boot and test Linux kernels without Docker and without root.
//!
//! `main.rs` is a thin shell over this library; each module owns one concern.

// Functions stay under clippy.toml's 150 lines (tests may be longer).
#![warn(clippy::too_many_lines)]

pub mod arch;
pub mod build;
pub mod ci;
pub mod cli;
pub mod config;
pub mod confine;
pub mod guest;
pub mod host;
pub mod instance;
pub mod kernel;
pub mod oci;
pub mod rootfs;
pub mod sandbox;
pub mod util;
pub mod vm;
