//! Per-run state (placeholder).
