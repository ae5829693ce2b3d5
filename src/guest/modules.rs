//! kernel modules (placeholder).
