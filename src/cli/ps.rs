//! `mkt ps`: what it prints of the running VMs, as a table or JSON.

use crate::config::Paths;

/// `mkt ps`: the running VMs, as a table or JSON.
pub fn ps(paths: &Paths, json: bool) -> anyhow::Result<i32> {
    let running = crate::vm::running_vms(&paths.runtime_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&running)?);
        return Ok(0);
    }
    println!(
        "{:<16} {:>8} {:>6} {:>8}  KERNEL / ROOTFS",
        "NAME", "PID", "SSH", "UP"
    );
    for r in &running {
        let up = crate::util::time::epoch_secs().saturating_sub(r.started);
        println!(
            "{:<16} {:>8} {:>6} {:>7}s  {} on {}",
            r.name,
            r.pid,
            r.ssh_port
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            up,
            r.kernel.display(),
            r.rootfs.display()
        );
    }
    Ok(0)
}
