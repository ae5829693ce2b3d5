//! QEMU command line (placeholder).
