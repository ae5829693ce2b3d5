//! One test per configuration error kind: each message must name the file,
//! the line:column and the key, because that is what a user needs to fix it.

use mkt::config::*;
use std::path::{Path, PathBuf};

const FILE: &str = "/home/u/.config/mkt/config.toml";

fn parse_err(text: &str) -> (ConfigError, String) {
    let err = Config::parse(text, Path::new(FILE), Path::new("/home/u")).unwrap_err();
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn unknown_key_in_defaults() {
    let (err, msg) = parse_err("[defaults]\nsrc = \"~/src\"\nkernal = \"~/k\"\n");
    assert!(
        msg.starts_with(&format!(
            "{FILE}:3:1: unknown key `kernal` in [defaults] (expected one of: src, kernel,"
        )),
        "{msg}"
    );
    assert!(msg.contains("rdma-core"), "{msg}");
    assert!(matches!(err, ConfigError::Parse { key: Some(k), .. } if k == "kernal"));
}

#[test]
fn unknown_key_in_setup() {
    let (err, msg) =
        parse_err("[defaults]\n\n[setup.cx5-ib]\npci = [\"0000:05:00.0\"]\n\n\ncpu = 4\n");
    assert!(
        msg.starts_with(&format!(
            "{FILE}:7:1: unknown key `cpu` in [setup.cx5-ib] (expected one of: kernel, rootfs,"
        )),
        "{msg}"
    );
    assert!(matches!(
        err,
        ConfigError::Parse {
            line: 7,
            column: 1,
            ..
        }
    ));
}

#[test]
fn wrong_type() {
    let (err, msg) = parse_err("[setup.x]\nmem = \"2G\"\ncpus = \"two\"\n");
    assert_eq!(
        msg,
        format!(
            "{FILE}:3:8: wrong type for key `cpus` in [setup.x]: invalid type: string \"two\", expected u32"
        )
    );
    assert!(matches!(err, ConfigError::Parse { key: Some(k), .. } if k == "cpus"));
}

#[test]
fn toml_syntax_error() {
    let (err, msg) = parse_err("[defaults]\nsrc = \"~/src\nkernel = \"~/k\"\n");
    assert!(msg.starts_with(&format!("{FILE}:2:")), "{msg}");
    assert!(
        matches!(
            err,
            ConfigError::Parse {
                line: 2,
                key: None,
                ..
            }
        ),
        "{err:?}"
    );
    let (_, msg) = parse_err("[defaults]\nsrc = ~/src\n");
    assert!(msg.starts_with(&format!("{FILE}:2:7: ")), "{msg}");
    let (err, msg) = parse_err("[setup.a]\ncpus = 1\n[setup.a]\n");
    assert_eq!(msg, format!("{FILE}:3:8: duplicate key `a`"));
    assert!(matches!(err, ConfigError::Parse { key: Some(k), .. } if k == "a"));
}

#[test]
fn bad_setup_name() {
    let (err, msg) = parse_err("[setup.ok]\ncpus = 1\n\n[setup.\"cx5 ib\"]\ncpus = 2\n");
    assert!(
        msg.starts_with(&format!("{FILE}:4:8: bad setup name `cx5 ib`")),
        "{msg}"
    );
    assert!(matches!(err, ConfigError::Parse { key: Some(k), .. } if k == "cx5 ib"));
}

#[test]
fn bad_pci_value() {
    let (err, msg) = parse_err("[setup.cx5-ib]\npci = [\"0000:05:00.0\", \"0000:05:00.9\"]\n");
    assert!(
        msg.starts_with(&format!(
            "{FILE}:2:24: bad value \"0000:05:00.9\" for key `setup.cx5-ib.pci`: "
        )),
        "{msg}"
    );
    assert!(matches!(
        err,
        ConfigError::BadValue {
            line: Some(2),
            column: Some(24),
            ..
        }
    ));
    let (_, msg) = parse_err("[setup.n]\nnested_pci = [\"eth0\"]\n");
    assert!(
        msg.starts_with(&format!(
            "{FILE}:2:15: bad value \"eth0\" for key `setup.n.nested_pci`"
        )),
        "{msg}"
    );
}

#[test]
fn bad_mem_value() {
    let (err, msg) = parse_err("[setup.big]\ncpus = 2\nmem = \"2X\"\n");
    assert!(
        msg.starts_with(&format!(
            "{FILE}:3:7: bad value \"2X\" for key `setup.big.mem`: "
        )),
        "{msg}"
    );
    assert!(
        matches!(err, ConfigError::BadValue { key, value, .. } if key == "setup.big.mem" && value == "2X")
    );
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("config.toml");
    let err = Config::load(&path, Path::new("/home/u")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot read config file {}", path.display())
    );
    let ConfigError::Read { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    // The cause stays reachable for `{:#}`-style reporting.
    assert!(std::error::Error::source(&err).is_some());

    let cfg = Config::load_optional(&path, Path::new("/home/u")).unwrap();
    assert_eq!(cfg, Config::default());
    assert!(cfg.file.is_none());
}

#[test]
fn load_reads_and_records_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[defaults]\nkernel = \"~/k\"\n").unwrap();
    for cfg in [
        Config::load(&path, Path::new("/h")).unwrap(),
        Config::load_optional(&path, Path::new("/h")).unwrap(),
    ] {
        assert_eq!(cfg.file.as_deref(), Some(path.as_path()));
        assert_eq!(cfg.defaults.kernel, Some(PathBuf::from("/h/k")));
    }
}
