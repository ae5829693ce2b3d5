//! `mkt rootfs ...`: the store's commands, their signals and what they print.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use super::{Ctx, RootfsArgs, RootfsCommand};
use crate::rootfs::unpack::{self, Unpacker};
use crate::rootfs::{
    Listed, PullOptions, builder, gc, human, list, pull, remove, resolve, shell, short, stored,
};

/// The table `mkt rootfs list` prints.
fn render_list(items: &[Listed]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "SOURCE".into(),
        "DIGEST".into(),
        "SIZE".into(),
        "CREATED".into(),
    ]];
    for l in items {
        rows.push(match &l.meta {
            Some(m) => [
                l.name.clone(),
                if m.recipe.is_some() {
                    m.image.clone()
                } else {
                    m.reference.clone()
                },
                short(&m.manifest_digest).to_string(),
                human(m.size),
                m.created.clone().unwrap_or_else(|| "-".into()),
            ],
            None => [
                l.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        });
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `mkt rootfs ...`.
pub fn run(ctx: &Ctx, args: RootfsArgs) -> anyhow::Result<i32> {
    use RootfsCommand as C;
    match args.command {
        C::Pull(a) => {
            let opts = PullOptions {
                image: a.image,
                name: a.name,
                platform: a.platform,
                insecure: a.insecure,
                force: a.force,
                quiet: ctx.quiet,
                owners: a.owners,
            };
            let cancel = crate::util::signal::stop_flag();
            let started = Instant::now();
            let p = pull(&ctx.paths, &opts, cancel)?;
            if !p.skipped_xattrs.is_empty() {
                let mut kinds: Vec<&str> = p.skipped_xattrs.iter().map(|s| s.as_str()).collect();
                kinds.sort();
                kinds.dedup();
                tracing::warn!(
                    "{} extended attributes could not be kept as a normal user: {}",
                    p.skipped_xattrs.len(),
                    kinds.join(", ")
                );
            }
            if !ctx.quiet {
                println!(
                    "rootfs {} ready at {}: {} ({}), {} layers, {} downloaded, {} unpacked, {:.1} s",
                    p.meta.name,
                    p.path.display(),
                    p.meta.reference,
                    p.meta.manifest_digest,
                    p.meta.layers.len(),
                    human(p.downloaded),
                    human(p.meta.size),
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(0)
        }
        C::List { json } => {
            let items = list(&ctx.paths)?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &items)?;
                writeln!(out)?;
            } else if items.is_empty() {
                if !ctx.quiet {
                    writeln!(
                        out,
                        "no rootfs in {} (`mkt rootfs pull IMAGE` makes one)",
                        ctx.paths.rootfs_dir.display()
                    )?;
                }
            } else {
                write!(out, "{}", render_list(&items))?;
            }
            Ok(0)
        }
        C::Rm { name } => {
            let path = remove(&ctx.paths, &name)?;
            if !ctx.quiet {
                println!("removed rootfs {name} ({})", path.display());
            }
            Ok(0)
        }
        C::Build(a) => {
            let cancel = crate::util::signal::stop_flag();
            let opts = builder::BuildOptions {
                recipe: a.recipe,
                name: a.name,
                force: a.force,
                quiet: ctx.quiet,
                verbose: ctx.verbose,
            };
            let b = builder::build(&ctx.paths, &opts, cancel)?;
            if !ctx.quiet {
                println!(
                    "rootfs {} ready at {}: recipe {}, {}{}",
                    b.meta.name,
                    b.path.display(),
                    b.meta.reference,
                    human(b.meta.size),
                    if b.reused_base {
                        ", cached base reused"
                    } else {
                        ""
                    }
                );
            }
            Ok(0)
        }
        C::UnpackLayers {
            into,
            max_layer,
            max_image,
            layers,
        } => {
            let cancel = crate::util::signal::stop_flag();
            let mut u = Unpacker::with_record(&into, unpack::Record::Real)?;
            u.set_limits(max_layer, max_image);
            for l in &layers {
                let (digest, blob) = l
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("expected DIGEST=PATH, got {l:?}"))?;
                u.unpack_layer(Path::new(blob), digest, cancel)?;
            }
            let stats = u.finish()?;
            if stats.unmapped_owners > 0 {
                tracing::warn!(
                    "{} entries have owners outside your subordinate ids; they belong to root",
                    stats.unmapped_owners
                );
            }
            if stats.devices_as_files > 0 {
                tracing::info!(
                    "{} device nodes kept as files with their xattr record",
                    stats.devices_as_files
                );
            }
            Ok(0)
        }
        C::Path { name } => {
            println!("{}", stored(&ctx.paths, &name)?.display());
            Ok(0)
        }
        C::Shell { name, rw, command } => {
            let c = &ctx.config;
            let wanted = resolve::wanted(name.as_deref(), resolve::default_setup(c), c);
            let first = resolve::FirstUse {
                dry_run: false,
                quiet: ctx.quiet,
                verbose: ctx.verbose,
            };
            match resolve::resolve(&ctx.paths, &wanted, first)? {
                resolve::Found::Stored(name, _) => Ok(shell(&ctx.paths, &name, rw, &command)?),
                found => anyhow::bail!(
                    "rootfs shell enters trees of the store; {} is a directory (`mkt build --shell --rootfs DIR` enters it as you)",
                    found.path(&ctx.paths).display()
                ),
            }
        }
        C::Gc => {
            let (files, bytes) = gc(&ctx.paths)?;
            if !ctx.quiet {
                println!("removed {files} unused blobs, {} freed", human(bytes));
            }
            Ok(0)
        }
    }
}
