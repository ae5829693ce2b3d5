//! Guest side (placeholder).
pub mod cpio;
pub mod modules;
