//! Builds mkt's guest init (src/guest/init/) as a static binary with
//! rustc alone, so it runs as PID 1 of a guest before any root file system
//! (and its libc) exists. mkt embeds it and packs it into the initramfs.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/guest/init/main.rs";
    // main.rs, the modules beside it, and the protocol shared with the host.
    println!("cargo:rerun-if-changed=src/guest/init");
    println!("cargo:rerun-if-changed=src/guest/plan.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("mkt-init");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "--crate-name",
            "mkt_init",
            "--crate-type",
            "bin",
        ])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
        ])
        .args([
            "-C",
            "target-feature=+crt-static",
            "-C",
            "relocation-model=static",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .arg("-o")
        .arg(&out)
        .arg(src)
        // The outer build's flags (e.g. coverage) are not meant for the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run rustc for the guest init");
    assert!(status.success(), "building the guest init {src} failed");
}
