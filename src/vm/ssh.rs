//! `mkt ssh` and `mkt test`: keys, the ssh command line, and waiting for a
//! booting guest's sshd (the guest says when it listens, on `mkt.ready`).

use super::control::{find_vm, names};
use super::error::RunError;
use crate::config::Paths;
use crate::host;
use crate::instance;
use std::io::{self, BufRead, IsTerminal};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// mkt's SSH keys: one for the user (client) and one for every guest's sshd.
#[derive(Debug, Clone)]
pub(crate) struct SshKeys {
    pub client_key: PathBuf,
    pub client_pub: String,
    pub host_private: String,
    pub known_hosts: PathBuf,
}

/// The alias every guest's host key is pinned under in mkt's known_hosts.
pub(crate) const HOST_KEY_ALIAS: &str = "mkt-guest";

/// Creates (once) and reads mkt's SSH keys under `dir`.
pub(crate) fn ensure_ssh_keys(dir: &Path) -> Result<SshKeys, RunError> {
    use std::os::unix::fs::DirBuilderExt;
    let io_err = |what: &str, source| RunError::SshKeys {
        what: what.into(),
        dir: dir.into(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err("create the ssh key directory", e))?;
    // Two runs starting at once must not both generate (or read half of)
    // the keys: serialise on a lock file.
    let lock_path = dir.join("lock");
    let lock_file = std::fs::File::create(&lock_path).map_err(|e| io_err("create the lock", e))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io_err("lock", e.into()))?;
    let keygen = host::which("ssh-keygen").ok_or(RunError::NoSshKeygen)?;
    for name in ["id_ed25519", "host_ed25519"] {
        let key = dir.join(name);
        if key.exists() {
            continue;
        }
        let out = Command::new(&keygen)
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                &format!("mkt-{name}"),
                "-f",
            ])
            .arg(&key)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| RunError::Spawn(keygen.clone(), e))?;
        if !out.status.success() {
            return Err(RunError::SshKeygen(
                String::from_utf8_lossy(&out.stderr).trim().into(),
            ));
        }
    }
    let read =
        |n: &str| std::fs::read_to_string(dir.join(n)).map_err(|e| io_err(&format!("read {n}"), e));
    let host_pub = read("host_ed25519.pub")?;
    let known_hosts = dir.join("known_hosts");
    let line = format!("{HOST_KEY_ALIAS} {}", host_pub.trim());
    if read("known_hosts").ok().as_deref().map(str::trim) != Some(line.as_str()) {
        std::fs::write(&known_hosts, format!("{line}\n"))
            .map_err(|e| RunError::Write(known_hosts.clone(), e))?;
    }
    Ok(SshKeys {
        client_key: dir.join("id_ed25519"),
        client_pub: read("id_ed25519.pub")?,
        host_private: read("host_ed25519")?,
        known_hosts,
    })
}

/// The ssh command line that logs into a guest as the user, no prompts.
pub(crate) fn ssh_argv(keys: &SshKeys, user: &str, port: u16, command: &[String]) -> Vec<String> {
    let mut a = vec![
        "ssh".to_string(),
        "-p".into(),
        port.to_string(),
        "-i".into(),
        keys.client_key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        format!("HostKeyAlias={HOST_KEY_ALIAS}"),
        "-o".into(),
        format!("UserKnownHostsFile={}", keys.known_hosts.display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        format!("{user}@127.0.0.1"),
    ];
    if !command.is_empty() {
        // ssh joins its words with spaces for the remote shell to split
        // again: one quoted line makes the guest run exactly this argv.
        a.push("--".into());
        a.push(crate::util::shell::shell_quote(command));
    }
    a
}

/// `mkt ssh [NAME] [-- CMD]`: runs ssh into a running guest; its exit status.
pub fn ssh(
    paths: &Paths,
    name: Option<&str>,
    command: &[String],
    quiet: bool,
) -> anyhow::Result<i32> {
    ssh_with_stdin(paths, name, command, None, quiet)
}

/// [`ssh`] with the remote command's stdin read from `stdin` (else mkt's).
pub(crate) fn ssh_with_stdin(
    paths: &Paths,
    name: Option<&str>,
    command: &[String],
    stdin: Option<std::fs::File>,
    quiet: bool,
) -> anyhow::Result<i32> {
    let running = super::control::running_vms(&paths.runtime_dir)?;
    let rec = match name {
        Some(n) => find_vm(&running, n)?,
        None => match running.as_slice() {
            [one] => one,
            [] => anyhow::bail!("no VM is running (start one with `mkt run`)"),
            _ => anyhow::bail!("several VMs are running; name one: {}", names(&running)),
        },
    };
    let port = rec.ssh_port.ok_or_else(|| {
        anyhow::anyhow!(
            "VM {:?} has no SSH port (started with --net none or a command, or its rootfs has no sshd)",
            rec.name
        )
    })?;
    if rec.ssh_reports_ready {
        wait_for_sshd(rec, quiet)?;
    }
    let keys = ensure_ssh_keys(&paths.data_dir.join("ssh"))?;
    let argv = ssh_argv(&keys, &rec.user, port, command);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    if let Some(f) = stdin {
        cmd.stdin(f);
    }
    let status = cmd
        .status()
        .map_err(|e| RunError::Spawn(argv[0].clone().into(), e))?;
    Ok(status.code().unwrap_or(255))
}

/// How long `mkt ssh` waits for a booting guest's sshd before trying anyway
/// (a systemd boot under TCG on a busy host takes ~20 s).
pub(crate) const SSHD_WAIT: Duration = Duration::from_secs(120);

/// Accepts QEMU's connection on `listener` and records each line the guest
/// sends about its sshd in the run directory, for `mkt ssh`. Detached.
pub(crate) fn relay_ready(listener: UnixListener, run_dir: PathBuf) {
    std::thread::spawn(move || {
        let Ok((s, _)) = listener.accept() else {
            return;
        };
        for line in io::BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if line.starts_with("sshd ")
                && let Err(e) = instance::set_ssh_state(&run_dir, &line)
            {
                tracing::warn!("cannot record the guest's sshd state: {e}");
            }
        }
    });
}

/// Waits until the guest of `rec` says its sshd listens: a connection made
/// before that sits in QEMU's NAT, whose SYN retries back off to seconds.
/// Gives up (and lets ssh try) after [`SSHD_WAIT`].
pub(crate) fn wait_for_sshd(rec: &instance::Record, quiet: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + SSHD_WAIT;
    let mut said = false;
    loop {
        match instance::ssh_state(rec) {
            instance::SshState::Ready => return Ok(()),
            instance::SshState::Failed(why) => anyhow::bail!(
                "the sshd of VM {:?} did not start: {why} (its console says more)",
                rec.name
            ),
            instance::SshState::Starting => {}
        }
        if !instance::running(rec) {
            anyhow::bail!("VM {:?} ended before its sshd listened", rec.name);
        }
        if Instant::now() > deadline {
            tracing::warn!(
                "VM {:?} has not said its sshd listens after {}s; trying anyway",
                rec.name,
                SSHD_WAIT.as_secs()
            );
            return Ok(());
        }
        if !said && !quiet && io::stderr().is_terminal() {
            eprintln!("mkt: waiting for {}'s sshd (booting)", rec.name);
            said = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
