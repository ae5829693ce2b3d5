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

/// The longest socket path ssh's ControlPath may be (sun_path, 108 with
/// its NUL, less the suffix ssh adds while it makes the socket).
const MAX_CONTROL_PATH: usize = 80;

/// The ssh command line that logs into a guest as the user, no prompts.
/// With `control` (a socket in the VM's run directory), the first
/// connection stays open in the background and later ones reuse it: under
/// TCG a new connection costs ~0.8 s (key exchange, sshd's re-exec), a
/// reused one ~0.1 s. That master ends when the VM does (its connection
/// closes), and the run directory goes with the VM.
pub(crate) fn ssh_argv(
    keys: &SshKeys,
    user: &str,
    port: u16,
    control: Option<&Path>,
    command: &[String],
) -> Vec<String> {
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
    ];
    if let Some(c) = control.filter(|c| c.as_os_str().len() <= MAX_CONTROL_PATH) {
        a.extend([
            "-o".into(),
            "ControlMaster=auto".into(),
            "-o".into(),
            format!("ControlPath={}", c.display()),
            "-o".into(),
            "ControlPersist=yes".into(),
        ]);
    }
    a.push(format!("{user}@127.0.0.1"));
    if !command.is_empty() {
        // ssh joins its words with spaces for the remote shell to split
        // again: one quoted line makes the guest run exactly this argv.
        a.push("--".into());
        a.push(crate::util::shell::shell_quote(command));
    }
    a
}

/// The shared ssh connection's socket in a run directory.
const SSH_CONTROL: &str = "ssh-mux";

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
    let running = super::control::running_vms_named(&paths.runtime_dir, name)?;
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
    let control = rec.dir.join(SSH_CONTROL);
    let argv = ssh_argv(&keys, &rec.user, port, Some(&control), command);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_argv_shares_one_connection_per_vm_and_quotes_the_command() {
        let keys = SshKeys {
            client_key: "/k/id".into(),
            client_pub: String::new(),
            host_private: String::new(),
            known_hosts: "/k/known".into(),
        };
        let cmd: Vec<String> = ["sh", "-c", "exit 3"].map(String::from).into();
        let base = "ssh -p 2222 -i /k/id -o IdentitiesOnly=yes -o HostKeyAlias=mkt-guest \
             -o UserKnownHostsFile=/k/known -o StrictHostKeyChecking=yes -o BatchMode=yes \
             -o LogLevel=ERROR";
        let mux =
            " -o ControlMaster=auto -o ControlPath=/run/mkt/runs/vm/ssh-mux -o ControlPersist=yes";
        let long = PathBuf::from(format!("/{}/ssh-mux", "d".repeat(90)));
        let cases: [(Option<&Path>, &[String], String); 4] = [
            (None, &[], format!("{base} dev@127.0.0.1")),
            (
                Some(Path::new("/run/mkt/runs/vm/ssh-mux")),
                &[],
                format!("{base}{mux} dev@127.0.0.1"),
            ),
            (
                Some(Path::new("/run/mkt/runs/vm/ssh-mux")),
                &cmd,
                format!("{base}{mux} dev@127.0.0.1 -- sh -c 'exit 3'"),
            ),
            // A socket path too long for sun_path: one connection each.
            (Some(&long), &[], format!("{base} dev@127.0.0.1")),
        ];
        for (control, command, want) in cases {
            assert_eq!(
                ssh_argv(&keys, "dev", 2222, control, command).join(" "),
                want
            );
        }
    }
}
