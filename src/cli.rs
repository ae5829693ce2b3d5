//! Command line: the clap definition and the dispatch to each concern.

use crate::config::{self, Config, Paths};
use crate::host;
use anyhow::{Context, Result};
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

#[derive(Debug, Args)]
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
    /// Check what this host can do (QEMU, KVM or TCG, user namespaces, ...),
    /// one line per capability with how to fix what is missing.
    Doctor(DoctorArgs),
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
pub struct Ctx {
    pub paths: Paths,
    pub config: Config,
    pub quiet: bool,
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
    })
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| uid.to_string())
}

/// Runs the parsed command line; the exit status on success.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "mkt", &mut std::io::stdout());
            Ok(0)
        }
        Command::Man { out } => man(out.as_deref()),
        Command::Doctor(args) => doctor(&args),
        Command::Setup(args) => {
            let ctx = load_context(&cli.global)?;
            setup(&ctx, &args)
        }
    }
}

fn doctor(args: &DoctorArgs) -> Result<i32> {
    let uid = nix::unistd::getuid().as_raw();
    let checks = host::probe::all(&user_name(uid), uid);
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

fn setup(ctx: &Ctx, args: &SetupArgs) -> Result<i32> {
    let p = &ctx.paths;
    let mut dirs = vec![p.data_dir.clone(), p.rootfs_dir.clone(), p.blob_dir.clone()];
    dirs.push(p.ccache_dir.clone());
    dirs.extend(p.log_subdirs());
    for d in &dirs {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
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

fn man(out: Option<&Path>) -> Result<i32> {
    let cmd = Cli::command();
    let Some(dir) = out else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(0);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, c: clap::Command| -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))
    };
    for sub in cmd.get_subcommands() {
        let name = format!("mkt-{}", sub.get_name());
        write(&name, sub.clone().name(name.clone()))?;
    }
    write("mkt", cmd)?;
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
