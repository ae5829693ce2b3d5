//! cpio newc writer (placeholder).
