//! Command line: the clap definition and the dispatch to each concern.

mod ps;
mod rootfs;

use crate::config::{self, Config, Paths};
use crate::guest::FsKind;
use crate::host;
use crate::host::kvm::Accel;
use anyhow::{Context, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Exit status for usage errors (clap uses the same).
pub const EXIT_USAGE: i32 = 2;

/// mkt: build, boot and test Linux kernels in seconds, without Docker and without root.
#[derive(Debug, Parser)]
#[command(name = "mkt", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes; shown under their own heading in each
/// command's --help, apart from the command's own.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// More output on stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors: no progress, no status lines.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Configuration file [default: $XDG_CONFIG_HOME/mkt/config.toml].
    #[arg(long, global = true, env = "MKT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prepare this host: create mkt's directories, write a starter config,
    /// list missing host packages with the command that installs each.
    Setup(SetupArgs),
    /// Check what this host can do (QEMU, KVM or TCG, user namespaces, ...)
    /// and the config file, one line each with how to fix what is missing.
    Doctor(DoctorArgs),
    /// Boot a kernel on a rootfs tree: interactive console, or one command
    /// (`-- CMD ARGS...`) whose output and exit status become mkt's.
    Run(Box<RunArgs>),
    /// Log into a running VM as you with mkt's key (no password, no prompts),
    /// or run one command there.
    Ssh {
        /// The VM's name (see `mkt ps`; `run` finds the only `run-N`) [default: the only running one].
        name: Option<String>,
        /// The command to run instead of a login shell.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Rootfs trees in mkt's store: build one from a recipe or pull one from
    /// an OCI image; list, enter, remove.
    Rootfs(RootfsArgs),
    /// Build a kernel (or rdma-core, iproute2, QEMU) tree inside a rootfs,
    /// rootless: silent with one status line, outputs owned by you.
    Build(Box<BuildArgs>),
    /// Static analysis of a commit (checkpatch, sparse, smatch, a W=1 build,
    /// clang) over the directories it touches, reporting only what it
    /// introduced; in the background unless --wait.
    Ci(Box<CiArgs>),
    /// Run a setup's test script in its VM (the running one, else a fresh
    /// boot) and print TEST PASSED or TEST FAILED.
    Test {
        /// The setup [default: the config's default setup].
        setup: Option<String>,
        /// The test script [default: the setup's `test`].
        #[arg(long, value_name = "FILE")]
        script: Option<PathBuf>,
    },
    /// Reload, in the running VM, the modules whose .ko changed in the
    /// kernel tree since boot (edit, `make`, reload: no reboot).
    ModulesReload {
        /// The VM's name [default: the only running one].
        name: Option<String>,
        /// Reload every loaded module of the tree, changed or not.
        #[arg(long)]
        all: bool,
    },
    /// List the running VMs (name, pid, SSH port, uptime, kernel, rootfs).
    Ps {
        /// Print the instance records as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Power a running VM off (ACPI through QMP), then quit it after
    /// --timeout; mkt's usual cleanup follows.
    Stop {
        /// The VM's name [default: the only running one].
        name: Option<String>,
        /// Stop every running VM.
        #[arg(long, conflicts_with = "name")]
        all: bool,
        /// Skip the power-off request: quit QEMU at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off before quitting it.
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        timeout: u64,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print mkt's man page, or write one page per subcommand into a directory.
    Man {
        /// Write mkt.1 and mkt-<command>.1 here instead of printing mkt.1.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// (internal) Run the KVM probe's test guest on DEV and print the
    /// verdict as JSON; run by the probe as a process it can kill.
    #[command(hide = true, name = crate::host::kvm::HELPER_SUBCOMMAND)]
    KvmTestGuest { dev: PathBuf },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A named setup from the config ([setup.NAME]); also the guest's hostname.
    pub setup: Option<String>,
    /// Rootfs: a name in mkt's store (or a recipe's, built on first use),
    /// or a directory written as a path (with a '/') [default: the setup's
    /// rootfs, else the config's, else debian-bookworm].
    #[arg(long, value_name = "NAME|DIR")]
    pub rootfs: Option<String>,
    /// Kernel: a built kernel tree or an image file [default: the setup's,
    /// the current directory when it is a built tree, else the rootfs's own].
    #[arg(long, value_name = "TREE|IMAGE")]
    pub kernel: Option<PathBuf>,
    /// Modules directory for a kernel image (its /lib/modules/<release>).
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// How the rootfs and shared dirs reach the guest [default: virtiofs
    /// when virtiofsd is installed and the kernel has it, else 9p].
    #[arg(long, value_parser = PossibleValuesParser::new(["9p", "virtiofs"]).try_map(|s| s.parse::<FsKind>()))]
    pub fs: Option<FsKind>,
    /// Accelerator [default: KVM when really usable, else TCG].
    #[arg(long, value_enum)]
    pub accel: Option<Accel>,
    /// Virtual CPUs, at least 1 [default: the setup's, else the CPUs this
    /// process may use].
    #[arg(long, value_name = "N")]
    pub cpus: Option<config::Cpus>,
    /// Guest memory, e.g. 2G or 1536M [default: 1G].
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// Extra kernel command-line words (repeatable).
    #[arg(long, value_name = "ARGS")]
    pub append: Vec<String>,
    /// Extra raw QEMU argument (repeatable).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_arg: Vec<String>,
    /// Share a host directory at the same path (repeatable).
    #[arg(long, value_name = "PATH")]
    pub dir: Vec<PathBuf>,
    /// Serve QEMU's gdb stub on 127.0.0.1:PORT; the kernel boots with
    /// nokaslr so vmlinux's symbols line up (unless --append kaslr).
    #[arg(long, value_name = "PORT")]
    pub gdbserver: Option<u16>,
    /// Host port forwarded to the guest's SSH port [default: a free one,
    /// when the rootfs has an sshd].
    #[arg(long, value_name = "N")]
    pub ssh_port: Option<u16>,
    /// Guest networking: user-mode NAT, none, a tap, or a tap on a bridge
    /// (br0 by default) with DHCP in the guest; tap and bridge need
    /// CAP_NET_ADMIN [default: the setup's, else nat].
    #[arg(long, value_name = "nat|none|tap|bridge[=BR]")]
    pub net: Option<config::NetMode>,
    /// Pass a host PCI function through with VFIO (repeatable; needs root
    /// unless already bound to vfio-pci).
    #[arg(long, value_name = "BDF")]
    pub pci: Vec<String>,
    /// Attach an NVMe scratch disk of SIZE (a sparse file kept per setup).
    #[arg(long, value_name = "SIZE")]
    pub nvme: Option<String>,
    /// A soft RDMA device made in the guest after boot (repeatable):
    /// rxe-IFNAME (soft-RoCE) or siw-IFNAME (soft-iWARP); the kernel needs
    /// CONFIG_RDMA_RXE / CONFIG_RDMA_SIW, the rootfs iproute2's `rdma`.
    #[arg(long, value_name = "rxe-IF|siw-IF")]
    pub virt: Vec<config::SoftRdma>,
    /// QEMU profile (qemu-profiles/NAME.toml): default (q35), debug
    /// (panic_on_warn=1 ignore_loglevel earlyprintk), microvm, iommu.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Script run as you once the guest has booted (executable, with #!);
    /// its output goes to the console [default: the setup's boot_script].
    #[arg(long, value_name = "FILE")]
    pub boot_script: Option<PathBuf>,
    /// Interactive mode: mkt's own init with a login shell and the tree's
    /// sshd (default when the rootfs has a shell: seconds to a prompt), or
    /// the rootfs's systemd (its units and services; slower).
    #[arg(long, value_enum)]
    pub init: Option<config::InitMode>,
    /// Keep the run directory (generated files) and print it.
    #[arg(long)]
    pub keep: bool,
    /// Start another VM even when SETUP is already running (default: attach
    /// to it over ssh).
    #[arg(long)]
    pub new: bool,
    /// When SETUP is already running: reload its changed kernel modules
    /// (`mkt modules-reload`) before CMD, in the same ssh connection. A VM
    /// booted now loads the tree's modules as they are anyway.
    #[arg(long)]
    pub reload: bool,
    /// Print the QEMU command line and the generated guest files; boot nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The command to run in the guest as you, instead of a console.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Overwrite an existing config file with the starter config.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON (an array of {name, status, detail, fix, required}).
    #[arg(long)]
    pub json: bool,
}

/// Everything a command needs from the environment, resolved once.
pub(crate) struct Ctx {
    pub paths: Paths,
    pub config: Config,
    pub quiet: bool,
    pub verbose: bool,
}

fn load_context(global: &Global) -> Result<Ctx> {
    let uid = nix::unistd::getuid().as_raw();
    let paths = Paths::from_env(|k| std::env::var(k).ok(), uid, global.config.clone())?;
    let config = if global.config.is_some() {
        // A config named on the command line must exist.
        Config::load(&paths.config_file, &paths.home)?
    } else {
        Config::load_optional(&paths.config_file, &paths.home)?
    };
    let paths = paths.with_config(&config);
    Ok(Ctx {
        paths,
        config,
        quiet: global.quiet,
        verbose: global.verbose > 0,
    })
}

/// Runs the parsed command line; the exit status on success.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Completions { shell } => {
            // Hidden (internal) commands and flags are not offered.
            let mut cmd = without_hidden(&Cli::command());
            clap_complete::generate(shell, &mut cmd, "mkt", &mut std::io::stdout());
            Ok(0)
        }
        Command::Man { out } => man(out.as_deref()),
        Command::Doctor(args) => doctor(&args, &cli.global),
        Command::Setup(args) => {
            let ctx = load_context(&cli.global)?;
            setup(&ctx, &args)
        }
        Command::Test { setup, script } => {
            let ctx = load_context(&cli.global)?;
            crate::vm::test(&ctx.config, &ctx.paths, setup, script, cli.global.quiet)
        }
        Command::ModulesReload { name, all } => {
            let ctx = load_context(&cli.global)?;
            // The guest tool by its path: `mkt` on the guest's PATH may be
            // the host's own binary through the shared home.
            let mut cmd = vec![
                crate::guest::GUEST_TOOL.to_string(),
                "modules-reload".to_string(),
            ];
            if all {
                cmd.push("--all".into());
            }
            crate::vm::ssh(&ctx.paths, name.as_deref(), &cmd, cli.global.quiet)
        }
        Command::Ps { json } => {
            let ctx = load_context(&cli.global)?;
            ps::ps(&ctx.paths, json)
        }
        Command::Stop {
            name,
            all,
            force,
            timeout,
        } => {
            let ctx = load_context(&cli.global)?;
            crate::vm::stop(
                &ctx.paths,
                name.as_deref(),
                all,
                force,
                std::time::Duration::from_secs(timeout),
            )
        }
        Command::Ssh { name, command } => {
            let ctx = load_context(&cli.global)?;
            crate::vm::ssh(&ctx.paths, name.as_deref(), &command, cli.global.quiet)
        }
        Command::Rootfs(args) => {
            let ctx = load_context(&cli.global)?;
            rootfs::run(&ctx, args)
        }
        Command::Build(a) => {
            let ctx = load_context(&cli.global)?;
            let opts = crate::build::BuildOptions {
                project: a.project,
                rootfs: a.rootfs,
                dir: a.directory,
                clean: a.clean,
                shell: a.shell,
                kconfig: a.kconfig,
                dirs: a.dir,
                recipe: a.recipe,
                kernel_headers: a.with_kernel_headers,
                args: a.args,
                quiet: ctx.quiet,
                verbose: cli.global.verbose > 0,
            };
            crate::build::build(&opts, &ctx.config, &ctx.paths)
        }
        Command::Ci(a) => {
            let ctx = load_context(&cli.global)?;
            let opts = crate::ci::CiOptions {
                project: a.project,
                dir: a.directory,
                rev: a.rev,
                rootfs: a.rootfs,
                no_checkpatch: a.no_checkpatch,
                no_sparse: a.no_sparse,
                no_smatch: a.no_smatch,
                no_warnings: a.no_warnings,
                no_clang: a.no_clang,
                show_all: a.show_all,
                no_ignore_gerrit: a.no_ignore_gerrit,
                kernel_config: a.kernel_config,
                json: a.json,
                junit: a.junit,
                wait: a.wait,
                status: a.status,
                log: a.log,
                run_job: a.run_job,
                config_file: cli.global.config.clone(),
                quiet: ctx.quiet,
                verbose: cli.global.verbose > 0,
            };
            crate::ci::ci(&opts, &ctx.config, &ctx.paths)
        }
        Command::Run(args) => {
            let ctx = load_context(&cli.global)?;
            let opts = run_options(*args, &cli.global)?;
            crate::vm::run(&opts, &ctx.config, &ctx.paths)
        }
        Command::KvmTestGuest { dev } => Ok(crate::host::kvm::test_guest_main(&dev)),
    }
}

/// A flag's value parsed by its type, the error naming flag and value (as
/// mkt's own errors do, after clap has parsed the command line).
fn typed<T: std::str::FromStr<Err = String>>(flag: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|e| anyhow::anyhow!("--{flag} {value:?}: {e}"))
}

fn run_options(a: RunArgs, g: &Global) -> Result<crate::vm::RunOptions> {
    let size = |flag, v: Option<String>| v.map(|v| typed(flag, &v)).transpose();
    Ok(crate::vm::RunOptions {
        setup: a.setup,
        rootfs: a.rootfs,
        kernel: a.kernel,
        modules: a.modules,
        command: a.command,
        fs: a.fs,
        accel: a.accel,
        cpus: a.cpus.map(config::Cpus::get),
        mem: size("mem", a.mem)?,
        append: a.append,
        qemu_args: a.qemu_arg,
        dirs: a.dir,
        gdb_port: a.gdbserver,
        ssh_port: a.ssh_port,
        net_none: false,
        net: a.net,
        pci: a
            .pci
            .iter()
            .map(|p| typed("pci", p))
            .collect::<Result<_>>()?,
        virt: a.virt,
        nvme: size("nvme", a.nvme)?,
        profile: a.profile,
        boot_script: a.boot_script,
        init: a.init,
        keep: a.keep,
        new: a.new,
        reload: a.reload,
        dry_run: a.dry_run,
        quiet: g.quiet,
        verbose: g.verbose > 0,
    })
}

fn doctor(args: &DoctorArgs, global: &Global) -> Result<i32> {
    let uid = nix::unistd::getuid().as_raw();
    let mut checks = host::probe::all(&host::user::name_of(uid), uid);
    checks.push(config_check(global, uid));
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &checks)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", host::render_checks(&checks))?;
    }
    // Non-zero only when the rootless core cannot work at all.
    let broken = checks.iter().any(|c| c.required && !c.is_ok());
    Ok(if broken { 1 } else { 0 })
}

/// Doctor's `config` line: the config file loads as every command loads it.
fn config_check(global: &Global, uid: u32) -> host::Check {
    use host::{Check, Status};
    let chain = |e: &dyn std::error::Error| {
        let mut s = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            s += &format!(": {c}");
            cause = c.source();
        }
        s
    };
    let paths = match Paths::from_env(|k| std::env::var(k).ok(), uid, global.config.clone()) {
        Ok(p) => p,
        Err(e) => {
            return Check::bad("config", Status::Unusable, chain(&e), "set HOME").required();
        }
    };
    let file = &paths.config_file;
    let loaded = if global.config.is_some() {
        Config::load(file, &paths.home)
    } else {
        Config::load_optional(file, &paths.home)
    };
    match loaded {
        Ok(c) if c.file.is_none() => Check::ok(
            "config",
            format!("no {} (defaults; `mkt setup` writes one)", file.display()),
        ),
        Ok(c) => Check::ok(
            "config",
            format!("{} ({} setups)", file.display(), c.setups.len()),
        ),
        Err(e) => Check::bad(
            "config",
            Status::Unusable,
            chain(&e),
            format!(
                "edit {} (every key: configs/example.toml, docs/config.md), or `mkt setup --force` to replace it with the starter config",
                file.display()
            ),
        ),
    }
    .required()
}

fn setup(ctx: &Ctx, args: &SetupArgs) -> Result<i32> {
    let p = &ctx.paths;
    let mut dirs = vec![p.data_dir.clone(), p.rootfs_dir.clone(), p.blob_dir.clone()];
    dirs.push(p.ccache_dir.clone());
    dirs.extend(p.log_subdirs());
    for d in &dirs {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    crate::rootfs::ensure_store(p)?;
    p.ensure_runtime_dir()?;
    let say = |s: String| {
        if !ctx.quiet {
            println!("{s}");
        }
    };
    say(format!("directories ready under {}", p.data_dir.display()));

    let cfg = &p.config_file;
    if cfg.exists() && !args.force {
        say(format!(
            "config: kept {} (--force replaces it)",
            cfg.display()
        ));
    } else {
        write_config(cfg, config::starter_config())?;
        say(format!("config: wrote {}", cfg.display()));
    }

    let missing = host::missing_prerequisites();
    if missing.is_empty() {
        say("host prerequisites: all present".into());
    } else {
        say("host prerequisites missing:".into());
        for m in missing {
            say(format!(
                "  {}{} ({})\n    Debian/Ubuntu: {}\n    Fedora:        {}",
                m.program,
                if m.required { " [required]" } else { "" },
                m.purpose,
                m.debian,
                m.fedora
            ));
        }
    }
    say("next: `mkt doctor` checks what this host can do".into());
    Ok(0)
}

/// Writes the config through a temporary file and a rename, so an
/// interrupted setup never leaves half a config.
fn write_config(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `cmd` with its hidden subcommands and flags left out, at every level
/// (clap_complete's generators would offer them).
pub(crate) fn without_hidden(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_string())
        .propagate_version(cmd.is_propagate_version_set());
    if let Some(a) = cmd.get_about() {
        out = out.about(a.clone());
    }
    if let Some(a) = cmd.get_long_about() {
        out = out.long_about(a.clone());
    }
    if let Some(v) = cmd.get_version() {
        out = out.version(v.to_string());
    }
    for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        out = out.arg(a.clone());
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out = out.subcommand(without_hidden(sub));
    }
    out
}

fn man(out: Option<&Path>) -> Result<i32> {
    // `help` is left out of the pages (each page documents --help), so
    // they refer to no page that is not written.
    let cmd = Cli::command().disable_help_subcommand(true);
    let Some(dir) = out else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(0);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // One page per command at every level (mkt-rootfs-pull.1, ...).
    fn write(dir: &Path, name: &str, c: &clap::Command) -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        let page = c
            .clone()
            .name(name.to_string())
            .disable_help_subcommand(true);
        clap_mangen::Man::new(page).render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
        for sub in c.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(dir, &format!("{name}-{}", sub.get_name()), sub)?;
        }
        Ok(())
    }
    write(dir, "mkt", &cmd)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn quiet_and_verbose_conflict() {
        let e = Cli::try_parse_from(["mkt", "-q", "-v", "doctor"]).unwrap_err();
        assert_eq!(e.exit_code(), EXIT_USAGE);
    }

    #[test]
    fn global_flags_after_subcommand() {
        let cli = Cli::try_parse_from(["mkt", "doctor", "-vv", "--config", "/x.toml"]).unwrap();
        assert_eq!(cli.global.verbose, 2);
        assert_eq!(cli.global.config.as_deref(), Some(Path::new("/x.toml")));
    }
}

#[derive(Debug, Args)]
pub struct RootfsArgs {
    #[command(subcommand)]
    pub command: RootfsCommand,
}

#[derive(Debug, Subcommand)]
pub enum RootfsCommand {
    /// Pull an OCI image from a registry (no Docker, no root) and unpack it
    /// into the store with its real owners (through your subuids), else
    /// with owners and modes kept in xattrs.
    Pull(RootfsPullArgs),
    /// List the trees in the store: name, source, digest, size, created.
    List {
        /// Print a JSON array (one object per tree) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a tree (and its metadata) from the store.
    Rm {
        /// The tree's name, as `mkt rootfs list` shows it.
        name: String,
    },
    /// Build a tree from a recipe (rootfs-recipes/NAME.toml, shipped with
    /// mkt; your own in ~/.config/mkt/recipes/; or a path): base, packages,
    /// files, setup commands; real owners kept with your subordinate ids.
    Build(RootfsBuildArgs),
    /// Print the tree's directory.
    Path {
        /// The tree's name.
        name: String,
    },
    /// A shell (or `-- CMD`) inside the tree, as its root, for a look:
    /// read-only unless --rw.
    Shell {
        /// The tree's name [default: the default setup's rootfs, else the
        /// config's, else debian-bookworm (built on first use)].
        name: Option<String>,
        /// Let changes reach the stored tree (e.g. `apt install`).
        #[arg(long)]
        rw: bool,
        /// The command to run instead of a login shell.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Drop cached blobs and recipe bases that no stored tree needs.
    Gc,
    /// (internal) Unpack layer blobs with real owners; run by `pull` as
    /// root of a user namespace with your subordinate ids.
    #[command(hide = true)]
    UnpackLayers {
        #[arg(long)]
        into: PathBuf,
        /// Bytes of file content one layer may write.
        #[arg(long, default_value_t = crate::oci::Limits::default().layer)]
        max_layer: u64,
        /// Bytes of file content all layers may write.
        #[arg(long, default_value_t = crate::oci::Limits::default().image)]
        max_image: u64,
        /// DIGEST=PATH, in layer order.
        layers: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct RootfsBuildArgs {
    /// The recipe: a shipped name (debian-bookworm, ubuntu-24.04, fc30,
    /// fc41), one of yours, or a path to a .toml file.
    pub recipe: String,
    /// Name of the tree in the store [default: the recipe's].
    #[arg(long)]
    pub name: Option<String>,
    /// Replace an existing tree of the same name (atomically).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RootfsPullArgs {
    /// The image: `fedora:41`, `quay.io/x/y@sha256:...`, `127.0.0.1:5000/a/b:t`.
    pub image: String,
    /// Name of the tree in the store [default: from the image, e.g. fedora-41].
    #[arg(long)]
    pub name: Option<String>,
    /// The platform to pick from a multi-platform image.
    #[arg(long, default_value = crate::arch::HOST.oci_platform, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: String,
    /// Speak plain HTTP to the registry (loopback registries always are).
    #[arg(long)]
    pub insecure: bool,
    /// Replace an existing tree of the same name (atomically).
    #[arg(long)]
    pub force: bool,
    /// How to keep the image's owners: real (as root, or with your
    /// subordinate ids), xattrs (QEMU's mapped-xattr records), auto.
    #[arg(long, value_enum, default_value_t)]
    pub owners: crate::rootfs::OwnersChoice,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// What to build: kernel (or linux), rdma-core, iproute2, qemu, custom
    /// (with --recipe) [default: what the directory is]; without -C, the
    /// config's tree for it.
    #[arg(value_parser = crate::build::PROJECT_NAMES)]
    pub project: Option<String>,
    /// Rootfs to build in: a name in mkt's store (or a recipe's, built on
    /// first use), or a directory written as a path (with a '/') [default:
    /// the default setup's rootfs, else the config's, else debian-bookworm].
    #[arg(long, value_name = "NAME|DIR")]
    pub rootfs: Option<String>,
    /// The source tree [default: the current directory].
    #[arg(short = 'C', long = "directory", value_name = "DIR")]
    pub directory: Option<PathBuf>,
    /// Run the project's clean first (make clean; rm -rf build).
    #[arg(long)]
    pub clean: bool,
    /// An interactive shell in the build environment instead of a build;
    /// `-- ARGS` go to the shell (e.g. `-- -c 'make menuconfig'`).
    #[arg(long)]
    pub shell: bool,
    /// Kernel: (re)generate the minimal VM config (tinyconfig +
    /// kvm_guest.config + mkt's fragment) [default: when there is no .config].
    #[arg(long)]
    pub kconfig: bool,
    /// Bind a host directory read-write at the same path (repeatable).
    #[arg(long, value_name = "PATH")]
    pub dir: Vec<PathBuf>,
    /// Run this shell script (sh -e, in the tree) instead of the project's
    /// steps; it gets MKT_JOBS, CC with ccache, and `-- ARGS` as "$@".
    #[arg(long, value_name = "FILE", conflicts_with_all = ["shell", "clean", "kconfig"])]
    pub recipe: Option<PathBuf>,
    /// Use a kernel tree's uapi headers (`make headers` there, then bound
    /// over the rootfs's /usr/include for this run), so user space builds
    /// against them [default TREE: the config's kernel].
    #[arg(long, value_name = "TREE", num_args = 0..=1, require_equals = true)]
    pub with_kernel_headers: Option<Option<PathBuf>>,
    /// Extra arguments for make (ninja for rdma-core and QEMU), e.g. W=1.
    #[arg(last = true, value_name = "MAKE ARGS")]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CiArgs {
    /// What the tree is: kernel (or linux), rdma-core, iproute2 [default:
    /// what REV's tree is]; without -C, the config's tree for it.
    #[arg(value_parser = ["kernel", "linux", "rdma-core", "iproute2"])]
    pub project: Option<String>,
    /// The source repository [default: the current directory].
    #[arg(short = 'C', long = "directory", value_name = "DIR")]
    pub directory: Option<PathBuf>,
    /// The commit to check, against its first parent [default: HEAD].
    #[arg(long, value_name = "REV")]
    pub rev: Option<String>,
    /// Rootfs the analysers run in: a name in mkt's store (or a recipe's,
    /// built on first use), or a directory written as a path (with a '/')
    /// [default: the default setup's rootfs, else the config's, else
    /// debian-bookworm].
    #[arg(long, value_name = "NAME|DIR")]
    pub rootfs: Option<String>,
    /// Skip checkpatch.pl.
    #[arg(long)]
    pub no_checkpatch: bool,
    /// Skip sparse (make C=2).
    #[arg(long)]
    pub no_sparse: bool,
    /// Skip smatch.
    #[arg(long)]
    pub no_smatch: bool,
    /// Skip the W=1 warnings build.
    #[arg(long)]
    pub no_warnings: bool,
    /// Skip the clang (CC=clang) build.
    #[arg(long)]
    pub no_clang: bool,
    /// Report every finding at REV, not only those the commit introduced.
    #[arg(long)]
    pub show_all: bool,
    /// Let checkpatch complain about gerrit Change-Id tags.
    #[arg(long)]
    pub no_ignore_gerrit: bool,
    /// Kernel config to analyse with (mkt ci's equivalent of the issue's
    /// `--config`, which is mkt's config file) [default: mkt build's VM config
    /// plus the options the touched files need].
    #[arg(long, value_name = "FILE")]
    pub kernel_config: Option<PathBuf>,
    /// Print the report (with --wait or --status ID) or the job id as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the report as JUnit XML to FILE when the job ends.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Run in the foreground and exit 0 (nothing new), 1 (new findings),
    /// 2 (a check could not run) or 3 (both).
    #[arg(long)]
    pub wait: bool,
    /// Show job ID's state and report (every job without ID).
    #[arg(long, value_name = "ID", num_args = 0..=1, conflicts_with_all = ["log", "wait"])]
    pub status: Option<Option<u64>>,
    /// Print job ID's log.
    #[arg(long, value_name = "ID", conflicts_with = "wait")]
    pub log: Option<u64>,
    /// Internal: the detached process running job ID.
    #[arg(long, value_name = "ID", hide = true)]
    pub run_job: Option<u64>,
}
