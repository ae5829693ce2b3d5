//! `mkt rootfs` against a real registry: Debian's `docker-registry` started
//! per test on 127.0.0.1, images pushed with `skopeo` from OCI layouts the
//! tests write (layer tarballs made with the tar crate, so hostile entries
//! can be made too) or build with `umoci`.

mod common;

use flate2::write::GzEncoder;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mkt::oci::sha256_digest;
use mkt::rootfs::unpack::{XATTR_GID, XATTR_MODE, XATTR_RDEV, XATTR_UID, makedev};

const MTIME: u64 = 1_700_000_000;

// ---------------------------------------------------------------- registry

/// A docker-registry on 127.0.0.1 for one test; killed when dropped.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Option<Registry> {
        Self::start_with("")
    }

    /// With `extra` appended to the config (an `auth:` section).
    fn start_with(extra: &str) -> Option<Registry> {
        let bin = common::program("docker-registry")?;
        common::program("skopeo")?;
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let cfg = dir.path().join("config.yml");
            std::fs::write(
                &cfg,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&cfg)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            // Bounded wait for it to answer /v2/ (or to die: port taken).
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                // 401 when the registry wants a token: up all the same.
                if http_get(port, "/v2/")
                    .is_some_and(|s| s.starts_with("HTTP/1.1 200") || s.starts_with("HTTP/1.1 401"))
                {
                    return Some(Registry { child, port, dir });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "docker-registry did not start: {}",
            std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
        );
    }

    fn image(&self, repo_tag: &str) -> String {
        format!("127.0.0.1:{}/{repo_tag}", self.port)
    }

    /// Pushes `layout:tag` as `repo_tag`, all platforms, optionally converted.
    fn push(&self, layout: &Path, tag: &str, repo_tag: &str, format: Option<&str>) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
        if let Some(f) = format {
            c.args(["--format", f]);
        }
        c.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.image(repo_tag)));
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Pushes an image through the registry API as is (skopeo would
    /// compress an uncompressed layer): blobs, then the manifest as `tag`.
    fn push_raw(&self, layout: &Layout, desc: &serde_json::Value, repo: &str, tag: &str) {
        self.push_raw_auth(layout, desc, repo, tag, None)
    }

    fn push_raw_auth(
        &self,
        layout: &Layout,
        desc: &serde_json::Value,
        repo: &str,
        tag: &str,
        token: Option<&str>,
    ) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            headers.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let http = reqwest::blocking::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{}/v2/{repo}", self.port);
        let blob =
            |d: &str| std::fs::read(layout.path().join("blobs/sha256").join(&d[7..])).unwrap();
        let manifest = blob(desc["digest"].as_str().unwrap());
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_string()];
        for l in m["layers"].as_array().unwrap() {
            digests.push(l["digest"].as_str().unwrap().to_string());
        }
        for d in digests {
            let r = http.post(format!("{base}/blobs/uploads/")).send().unwrap();
            assert_eq!(r.status().as_u16(), 202);
            let loc = r.headers()["location"].to_str().unwrap().to_string();
            let sep = if loc.contains('?') { '&' } else { '?' };
            let url = if loc.starts_with("http") {
                loc.clone()
            } else {
                format!("http://127.0.0.1:{}{loc}", self.port)
            };
            let r = http
                .put(format!("{url}{sep}digest={d}"))
                .body(blob(&d))
                .send()
                .unwrap();
            assert_eq!(r.status().as_u16(), 201, "{d}");
        }
        let r = http
            .put(format!("{base}/manifests/{tag}"))
            .header("content-type", desc["mediaType"].as_str().unwrap())
            .body(manifest)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }

    /// The registry's own copy of a blob.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line)
}

// ------------------------------------------------------------------ layers

/// One tar entry, possibly hostile (names are written raw).
#[derive(Clone)]
struct E {
    kind: tar::EntryType,
    name: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Option<Vec<u8>>,
    data: Vec<u8>,
    dev: Option<(u32, u32)>,
    pax: Vec<(String, Vec<u8>)>,
}

fn e(kind: tar::EntryType, name: &str, mode: u32) -> E {
    E {
        kind,
        name: name.as_bytes().to_vec(),
        mode,
        uid: 0,
        gid: 0,
        link: None,
        data: vec![],
        dev: None,
        pax: vec![],
    }
}
fn dir(name: &str, mode: u32) -> E {
    e(tar::EntryType::Directory, name, mode)
}
fn file(name: &str, mode: u32, data: &str) -> E {
    E {
        data: data.as_bytes().to_vec(),
        ..e(tar::EntryType::Regular, name, mode)
    }
}
fn symlink(name: &str, target: &str) -> E {
    E {
        link: Some(target.as_bytes().to_vec()),
        ..e(tar::EntryType::Symlink, name, 0o777)
    }
}
fn hardlink(name: &str, target: &str) -> E {
    E {
        link: Some(target.as_bytes().to_vec()),
        ..e(tar::EntryType::Link, name, 0o644)
    }
}

fn tar_bytes(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for en in entries {
        if !en.pax.is_empty() {
            b.append_pax_extensions(en.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(en.kind);
        h.set_mode(en.mode);
        h.set_uid(en.uid);
        h.set_gid(en.gid);
        h.set_mtime(MTIME);
        h.set_size(en.data.len() as u64);
        if let Some((ma, mi)) = en.dev {
            h.set_device_major(ma).unwrap();
            h.set_device_minor(mi).unwrap();
        }
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..en.name.len()].copy_from_slice(&en.name);
        if let Some(l) = &en.link {
            old.linkname = [0; 100];
            old.linkname[..l.len()].copy_from_slice(l);
        }
        h.set_cksum();
        b.append(&h, en.data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

#[derive(Clone, Copy, PartialEq)]
enum Comp {
    Gzip,
    Zstd,
    Plain,
}

/// (compressed bytes, media type, diff id)
fn layer(entries: &[E], comp: Comp) -> (Vec<u8>, &'static str, String) {
    let raw = tar_bytes(entries);
    let diff_id = sha256_digest(&raw);
    match comp {
        Comp::Gzip => {
            let mut g = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            g.write_all(&raw).unwrap();
            (
                g.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
                diff_id,
            )
        }
        Comp::Zstd => (
            zstd::encode_all(raw.as_slice(), 1).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
            diff_id,
        ),
        Comp::Plain => (raw, "application/vnd.oci.image.layer.v1.tar", diff_id),
    }
}

/// An OCI image layout the tests write by hand.
struct Layout {
    dir: tempfile::TempDir,
    index: Vec<serde_json::Value>,
}

impl Layout {
    fn new() -> Layout {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        Layout { dir, index: vec![] }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn blob(&self, bytes: &[u8]) -> (String, usize) {
        let d = sha256_digest(bytes);
        let p = self
            .path()
            .join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap());
        std::fs::write(p, bytes).unwrap();
        (d, bytes.len())
    }

    /// Writes an image; returns its manifest descriptor (with platform).
    fn image(&self, layers: &[(Vec<u8>, &str, String)], arch: &str) -> serde_json::Value {
        let config = serde_json::json!({
            "created": "2024-01-02T03:04:05Z",
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.2.clone()).collect::<Vec<_>>()},
        });
        self.image_with_config(layers, &serde_json::to_vec(&config).unwrap(), arch)
    }

    /// An image whose config blob is `config`, whatever it holds.
    fn image_with_config(
        &self,
        layers: &[(Vec<u8>, &str, String)],
        config: &[u8],
        arch: &str,
    ) -> serde_json::Value {
        let (cd, cs) = self.blob(config);
        let ls: Vec<serde_json::Value> = layers
            .iter()
            .map(|(bytes, media, _)| {
                let (d, s) = self.blob(bytes);
                serde_json::json!({"mediaType": media, "digest": d, "size": s})
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": ls,
        });
        let (md, ms) = self.blob(&serde_json::to_vec(&manifest).unwrap());
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "platform": {"architecture": arch, "os": "linux"},
        })
    }

    /// Writes an index of `manifests`; returns its descriptor.
    fn list(&self, manifests: Vec<serde_json::Value>) -> serde_json::Value {
        let idx = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let (d, s) = self.blob(&serde_json::to_vec(&idx).unwrap());
        serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s})
    }

    fn tag(&mut self, tag: &str, mut desc: serde_json::Value) {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        self.index.push(desc);
        let idx = serde_json::json!({"schemaVersion": 2, "manifests": self.index});
        std::fs::write(
            self.path().join("index.json"),
            serde_json::to_vec(&idx).unwrap(),
        )
        .unwrap();
    }
}

// ----------------------------------------------------------------- helpers

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of buf.len() bytes.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

fn xattr_u32(path: &Path, name: &str) -> u32 {
    let v = xattr(path, name).unwrap_or_else(|| panic!("{} has no {name}", path.display()));
    u32::from_le_bytes(v.try_into().expect("4 bytes"))
}

/// (uid, gid, full mode) as recorded for QEMU's mapped-xattr model.
fn owner(path: &Path) -> (u32, u32, u32) {
    (
        xattr_u32(path, XATTR_UID),
        xattr_u32(path, XATTR_GID),
        xattr_u32(path, XATTR_MODE),
    )
}

fn run(c: &mut Command) -> (Output, String, String) {
    let o = c.stdin(Stdio::null()).output().expect("run mkt");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, out, err)
}

fn store(home: &Path) -> PathBuf {
    home.join(".local/share/mkt/rootfs")
}

fn blob_cache(home: &Path) -> PathBuf {
    home.join(".local/share/mkt/blobs/sha256")
}

/// Names in the store other than the metadata dir (temp dirs included).
fn store_entries(home: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store(home))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".meta")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every path under `dir`, for "nothing was written outside" checks.
fn scan(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

// ------------------------------------------------------------------- tests

/// The main image: three layers (gzip, zstd, plain) exercising whiteouts,
/// an opaque whiteout, hardlinks, symlinks, setuid root files, device
/// nodes, FIFOs, xattrs and mode-000 / read-only directories.
fn main_image() -> Vec<(Vec<u8>, &'static str, String)> {
    use tar::EntryType as T;
    let mut su = file("usr/bin/su", 0o4755, "su binary");
    su.uid = 0;
    let mut owned = file("home/user/notes", 0o640, "mine");
    owned.uid = 1000;
    owned.gid = 1001;
    let mut tagged = file("etc/tagged", 0o644, "x");
    tagged.pax = vec![
        ("SCHILY.xattr.user.foo".into(), b"bar".to_vec()),
        ("SCHILY.xattr.security.capability".into(), vec![1, 0, 0, 2]),
    ];
    let mut null = e(T::Char, "dev/null", 0o666);
    null.dev = Some((1, 3));
    let mut sda = e(T::Block, "dev/sda", 0o660);
    sda.dev = Some((8, 0));
    sda.gid = 6;
    let one = vec![
        dir("./", 0o755),
        dir("etc/", 0o755),
        file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n"),
        tagged,
        dir("usr/", 0o755),
        dir("usr/bin/", 0o755),
        su,
        hardlink("usr/bin/su-again", "usr/bin/su"),
        symlink("bin", "usr/bin"),
        dir("secret/", 0o000),
        file("secret/key", 0o600, "k"),
        dir("ro/", 0o555),
        file("ro/file", 0o444, "r"),
        dir("gone/", 0o755),
        file("gone/file", 0o644, "g"),
        file("gone2", 0o644, "g2"),
        dir("opq/", 0o755),
        file("opq/old", 0o644, "o"),
        dir("opq/sub/", 0o755),
        file("opq/sub/old2", 0o644, "o2"),
        dir("dev/", 0o755),
        null,
        sda,
        e(T::Fifo, "dev/initctl", 0o600),
        dir("tmp/", 0o1777),
        dir("home/user/", 0o700),
        owned,
    ];
    let two = vec![
        file(".wh.gone2", 0o644, ""),
        file("gone/.wh.file", 0o644, ""),
        dir("opq/", 0o750),
        // Written before the marker in the same layer: must survive it.
        file("opq/new", 0o644, "n"),
        file("opq/.wh..wh..opq", 0o644, ""),
        // Through the in-tree symlink bin -> usr/bin.
        file("bin/newtool", 0o755, "tool"),
        file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/bash\n"),
    ];
    let three = vec![file("etc/motd", 0o644, "hello from layer 3\n")];
    vec![
        layer(&one, Comp::Gzip),
        layer(&two, Comp::Zstd),
        layer(&three, Comp::Plain),
    ]
}

fn check_main_tree(t: &Path) {
    let read = |p: &str| std::fs::read_to_string(t.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let mode = |p: &str| std::fs::symlink_metadata(t.join(p)).unwrap().mode();
    assert_eq!(read("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n");
    assert_eq!(read("etc/motd"), "hello from layer 3\n");
    // setuid root: recorded in xattrs, not on the host.
    assert_eq!(owner(&t.join("usr/bin/su")), (0, 0, libc::S_IFREG | 0o4755));
    assert_eq!(mode("usr/bin/su") & 0o7777, 0o755);
    assert_eq!(read("usr/bin/su"), "su binary");
    // Hardlink kept.
    let (a, b) = (
        std::fs::metadata(t.join("usr/bin/su")).unwrap(),
        std::fs::metadata(t.join("usr/bin/su-again")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    // Symlink kept, and written through inside the tree.
    assert_eq!(
        std::fs::read_link(t.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(read("usr/bin/newtool"), "tool");
    // Mode-000 and read-only directories: filled, then closed.
    assert_eq!(owner(&t.join("secret")), (0, 0, libc::S_IFDIR));
    assert_eq!(mode("secret") & 0o777, 0o500);
    assert_eq!(read("secret/key"), "k");
    assert_eq!(mode("ro") & 0o777, 0o555);
    assert_eq!(read("ro/file"), "r");
    assert_eq!(owner(&t.join("tmp")).2, libc::S_IFDIR | 0o1777);
    // Whiteouts and the opaque whiteout.
    assert!(t.join("gone").is_dir());
    assert!(!t.join("gone/file").exists());
    assert!(!t.join("gone2").exists());
    assert!(!t.join("opq/old").exists());
    assert!(!t.join("opq/sub").exists());
    assert_eq!(read("opq/new"), "n");
    assert_eq!(owner(&t.join("opq")).2, libc::S_IFDIR | 0o750);
    for wh in ["opq/.wh..wh..opq", "gone/.wh.file", ".wh.gone2"] {
        assert!(!t.join(wh).exists(), "{wh}");
    }
    // Devices and FIFOs: empty regular files with their type in xattrs.
    let null = t.join("dev/null");
    assert!(std::fs::symlink_metadata(&null).unwrap().is_file());
    assert_eq!(owner(&null), (0, 0, libc::S_IFCHR | 0o666));
    assert_eq!(
        xattr(&null, XATTR_RDEV).unwrap(),
        makedev(1, 3).to_le_bytes()
    );
    assert_eq!(makedev(1, 3), 0x103);
    assert_eq!(owner(&t.join("dev/sda")), (0, 6, libc::S_IFBLK | 0o660));
    assert_eq!(
        xattr(&t.join("dev/sda"), XATTR_RDEV).unwrap(),
        makedev(8, 0).to_le_bytes()
    );
    assert_eq!(owner(&t.join("dev/initctl")), (0, 0, libc::S_IFIFO | 0o600));
    // Other owners, and the layer's own xattrs (user.* only).
    assert_eq!(
        owner(&t.join("home/user/notes")),
        (1000, 1001, libc::S_IFREG | 0o640)
    );
    assert_eq!(xattr(&t.join("etc/tagged"), "user.foo").unwrap(), b"bar");
    assert!(xattr(&t.join("etc/tagged"), "security.capability").is_none());
    assert_eq!(owner(t), (0, 0, libc::S_IFDIR | 0o755));
    // Times from the layers.
    assert_eq!(
        std::fs::metadata(t.join("etc/motd")).unwrap().mtime(),
        MTIME as i64
    );
    assert_eq!(
        std::fs::metadata(t.join("ro")).unwrap().mtime(),
        MTIME as i64
    );
}

fn pull_list_rm(user: Option<&common::TestUser>) {
    let Some(reg) = Registry::start() else { return };
    let l = Layout::new();
    let img = l.image(&main_image(), "amd64");
    // As built: gzip, zstd and plain tar layers (skopeo would compress the last).
    reg.push_raw(&l, &img, "test/main", "v1");

    let home = common::temp_home(user);
    let h = home.path();
    let image = reg.image("test/main:v1");
    let (o, out, err) =
        run(common::mkt_as(user, h).args(["rootfs", "pull", "--owners", "xattrs", &image]));
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("rootfs main-v1 ready"), "{out}");
    let tree = store(h).join("main-v1");
    check_main_tree(&tree);
    if let Some(u) = user {
        assert_eq!(
            std::fs::metadata(tree.join("etc/passwd")).unwrap().uid(),
            u.uid
        );
    }
    assert_eq!(store_entries(h), ["main-v1"]);

    // list, as a table and as JSON.
    let (o, out, err) = run(common::mkt_as(user, h).args(["rootfs", "list"]));
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("NAME"), "{out}");
    assert!(out.contains(&format!("main-v1  {image}")), "{out}");
    assert!(out.contains("2024-01-02T03:04:05Z"), "{out}");
    let (_, out, _) = run(common::mkt_as(user, h).args(["rootfs", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let item = &v[0];
    assert_eq!(item["name"], "main-v1");
    assert_eq!(item["reference"], image.as_str());
    assert_eq!(item["platform"], "linux/amd64");
    assert_eq!(item["layers"].as_array().unwrap().len(), 3);
    assert!(
        item["manifest_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(item["path"], tree.to_str().unwrap());

    // The name is taken unless --force; --force replaces atomically.
    let (o, _, err) = run(common::mkt_as(user, h).args(["rootfs", "pull", &image]));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("main-v1 already exists") && err.contains("--force"),
        "{err}"
    );
    std::fs::write(tree.join("marker"), "old tree").unwrap();
    let (o, _, err) = run(common::mkt_as(user, h).args([
        "-q",
        "rootfs",
        "pull",
        "--force",
        "--owners=xattrs",
        &image,
    ]));
    assert!(o.status.success(), "{err}");
    assert!(!tree.join("marker").exists());
    check_main_tree(&tree);
    assert_eq!(store_entries(h), ["main-v1"], "the old tree is gone");

    // rm removes mode-000 and read-only dirs too.
    let (o, out, err) = run(common::mkt_as(user, h).args(["rootfs", "rm", "main-v1"]));
    assert!(o.status.success(), "{out}{err}");
    assert!(!tree.exists());
    assert_eq!(store_entries(h), Vec::<String>::new());
    let (o, _, err) = run(common::mkt_as(user, h).args(["rootfs", "rm", "main-v1"]));
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("no rootfs named main-v1"), "{err}");
}

#[test]
fn pull_list_force_rm_as_current_user() {
    pull_list_rm(None);
}

#[test]
fn pull_list_force_rm_as_unprivileged_user() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let Some(user) = user else {
        // Not root: the other test already ran unprivileged.
        return;
    };
    pull_list_rm(Some(&user));
}

#[test]
fn index_picks_the_platform_and_skips_attestations() {
    let Some(reg) = Registry::start() else { return };
    let mut l = Layout::new();
    let arch_layer = |a: &str| layer(&[file("arch", 0o644, a)], Comp::Gzip);
    let amd = l.image(&[arch_layer("amd64")], "amd64");
    let arm = l.image(&[arch_layer("arm64")], "arm64");
    let mut att = l.image(&[arch_layer("attestation")], "amd64");
    att["platform"] = serde_json::json!({"architecture": "unknown", "os": "unknown"});
    // The attestation first: a naive "first entry" would pick it.
    let list = l.list(vec![att, arm, amd]);
    l.tag("multi", list);
    reg.push(l.path(), "multi", "test/multi:1", None);
    // The same, converted to a Docker manifest list + schema 2 manifests.
    reg.push(l.path(), "multi", "test/multi-docker:1", Some("v2s2"));

    let home = common::temp_home(None);
    let h = home.path();
    for (repo, name) in [("test/multi:1", "oci"), ("test/multi-docker:1", "docker")] {
        let image = reg.image(repo);
        let (o, out, err) = run(common::mkt(h).args(["rootfs", "pull", "--name", name, &image]));
        assert!(o.status.success(), "{out}{err}");
        assert_eq!(
            std::fs::read_to_string(store(h).join(name).join("arch")).unwrap(),
            "amd64"
        );
        let arm = format!("{name}-arm");
        let (o, _, err) = run(common::mkt(h).args([
            "rootfs",
            "pull",
            "--platform",
            "linux/arm64",
            "--name",
            &arm,
            &image,
        ]));
        assert!(o.status.success(), "{err}");
        assert_eq!(
            std::fs::read_to_string(store(h).join(&arm).join("arch")).unwrap(),
            "arm64"
        );
    }
    let (o, _, err) = run(common::mkt(h).args([
        "rootfs",
        "pull",
        "--platform",
        "linux/s390x",
        &reg.image("test/multi:1"),
    ]));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("no linux/s390x image") && err.contains("linux/arm64"),
        "{err}"
    );
    assert!(!err.contains("unknown"), "{err}");
    let (_, out, _) = run(common::mkt(h).args(["rootfs", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let docker = v
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "docker")
        .unwrap();
    assert!(docker["index_digest"].as_str().is_some(), "{docker}");
}

#[test]
fn hostile_layers_are_refused_and_touch_nothing_outside() {
    let Some(reg) = Registry::start() else { return };
    let home = common::temp_home(None);
    let h = home.path();
    // A directory beside the store that symlinks in the layers point at.
    let outside = h.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let out_s = outside.to_str().unwrap().to_string();
    let passwd_before = std::fs::read("/etc/passwd").unwrap();
    let abs = format!("{out_s}/abs");
    let cases: Vec<(&str, Vec<E>, &str, &str)> = vec![
        (
            "dotdot",
            vec![file("../escaped", 0o644, "x")],
            "../escaped",
            "`..`",
        ),
        (
            "dotdot-deep",
            vec![dir("a/", 0o755), file("a/../../escaped", 0o644, "x")],
            "a/../../escaped",
            "`..`",
        ),
        (
            "absolute",
            vec![file(&abs, 0o644, "x")],
            &abs,
            "absolute path",
        ),
        (
            "symlink-then-write",
            vec![symlink("evil", &out_s), file("evil/pwned", 0o644, "x")],
            "evil/pwned",
            "leads outside the tree through a symlink",
        ),
        (
            "relative-symlink-then-write",
            vec![symlink("up", "../../../../../../.."), dir("up/tmp/", 0o755)],
            "up/tmp/",
            "leads outside the tree through a symlink",
        ),
        (
            "symlink-dir-then-dir",
            vec![symlink("etc", "/etc"), file("etc/passwd", 0o644, "pwned")],
            "etc/passwd",
            "leads outside the tree through a symlink",
        ),
        (
            "hardlink-absolute",
            vec![hardlink("pw", "/etc/passwd")],
            "pw",
            "absolute path",
        ),
        (
            "hardlink-dotdot",
            vec![hardlink("pw", "../../../../../../../etc/passwd")],
            "pw",
            "`..`",
        ),
        (
            "hardlink-through-symlink",
            vec![symlink("e", "/etc"), hardlink("pw", "e/passwd")],
            "pw",
            "hardlink target leads outside the tree through a symlink",
        ),
        (
            "whiteout-through-symlink",
            vec![symlink("o", &out_s), file("o/.wh.victim", 0o644, "")],
            "o/.wh.victim",
            "leads outside the tree through a symlink",
        ),
    ];
    std::fs::write(outside.join("victim"), "keep me").unwrap();
    // What any run creates: the runtime dir, the store.
    let (o, _, err) = run(common::mkt(h).args(["rootfs", "list"]));
    assert!(o.status.success(), "{err}");
    std::fs::create_dir_all(store(h)).unwrap();
    let before = scan(h);
    let mut l = Layout::new();
    for (tag, entries, _, _) in &cases {
        // A good layer first, so the hostile one lands on a real tree.
        let good = layer(
            &[dir("etc/", 0o755), file("etc/hostname", 0o644, "x")],
            Comp::Gzip,
        );
        let img = l.image(&[good, layer(entries, Comp::Gzip)], "amd64");
        l.tag(tag, img);
    }
    let garbage = (
        b"\x1f\x8b not really gzip".to_vec(),
        "application/vnd.oci.image.layer.v1.tar+gzip",
        sha256_digest(b""),
    );
    let img = l.image(&[garbage], "amd64");
    l.tag("garbage", img);
    for (tag, ..) in &cases {
        reg.push(l.path(), tag, &format!("hostile/{tag}:1"), None);
    }
    reg.push(l.path(), "garbage", "hostile/garbage:1", None);

    for (tag, _, entry, reason) in &cases {
        let (o, out, err) =
            run(common::mkt(h).args(["rootfs", "pull", &reg.image(&format!("hostile/{tag}:1"))]));
        assert_eq!(o.status.code(), Some(1), "{tag}: {out}{err}");
        assert!(
            err.contains(&format!("refused entry {entry:?}")),
            "{tag}: {err}"
        );
        assert!(err.contains(reason), "{tag}: wanted {reason:?}: {err}");
        assert!(err.contains("layer sha256:"), "{tag}: {err}");
        assert_eq!(
            store_entries(h),
            Vec::<String>::new(),
            "{tag}: no tree, no temp dir"
        );
    }
    let (o, _, err) = run(common::mkt(h).args(["rootfs", "pull", &reg.image("hostile/garbage:1")]));
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("cannot read the layer's tar stream"), "{err}");
    assert_eq!(store_entries(h), Vec::<String>::new());

    // Nothing appeared or vanished outside the store and the blob cache.
    let after: Vec<PathBuf> = scan(h)
        .into_iter()
        .filter(|p| !p.starts_with(h.join(".local/share/mkt")))
        .collect();
    let before: Vec<PathBuf> = before
        .into_iter()
        .filter(|p| !p.starts_with(h.join(".local/share/mkt")))
        .collect();
    assert_eq!(after, before);
    assert_eq!(
        std::fs::read_to_string(outside.join("victim")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
    assert!(
        !h.join(".local/share/escaped").exists() && !h.join(".local/share/mkt/escaped").exists()
    );
}

#[test]
fn resume_digest_mismatch_and_second_pull() {
    let Some(reg) = Registry::start() else { return };
    let l = Layout::new();
    // A layer big enough to truncate meaningfully, but still small.
    let big: String = (0..4000).map(|i| format!("line {i}\n")).collect();
    let layers = vec![
        layer(&[file("big", 0o644, &big)], Comp::Plain),
        layer(&[file("small", 0o644, "s")], Comp::Gzip),
    ];
    let big_digest = sha256_digest(&layers[0].0);
    let small_digest = sha256_digest(&layers[1].0);
    let img = l.image(&layers, "amd64");
    // As is: the big layer stays an uncompressed tar.
    reg.push_raw(&l, &img, "test/resume", "1");
    let image = reg.image("test/resume:1");

    // 1. A truncated partial download is resumed with a Range request.
    let home = common::temp_home(None);
    let h = home.path();
    let (o, _, err) = run(common::mkt(h).args(["rootfs", "pull", "--name", "a", &image]));
    assert!(o.status.success(), "{err}");
    let hex = big_digest.strip_prefix("sha256:").unwrap();
    let cached = blob_cache(h).join(hex);
    let partial = blob_cache(h).join(format!("{hex}.partial"));
    let full = std::fs::read(&cached).unwrap();
    std::fs::write(&partial, &full[..full.len() / 2]).unwrap();
    std::fs::remove_file(&cached).unwrap();
    let (o, _, err) = run(common::mkt(h)
        .args(["-vv", "rootfs", "pull", "--name", "b", &image])
        .env("RUST_LOG", "mkt=debug"));
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "blob {big_digest}: resumed at byte {} of {}",
            full.len() / 2,
            full.len()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&cached).unwrap(), full);
    assert!(!partial.exists());
    assert_eq!(
        std::fs::read_to_string(store(h).join("b/big")).unwrap(),
        big
    );

    // 2. A registry serving wrong bytes: an error naming the digest, no tree.
    let home2 = common::temp_home(None);
    let h2 = home2.path();
    let served = reg.blob_file(&small_digest);
    let good = std::fs::read(&served).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    std::fs::write(&served, &bad).unwrap();
    let (o, _, err) = run(common::mkt(h2).args(["rootfs", "pull", "--name", "c", &image]));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("blob {small_digest}")) && err.contains("digest"),
        "{err}"
    );
    assert_eq!(store_entries(h2), Vec::<String>::new());
    let shex = small_digest.strip_prefix("sha256:").unwrap();
    assert!(!blob_cache(h2).join(shex).exists());
    assert!(!blob_cache(h2).join(format!("{shex}.partial")).exists());
    // 3. Fixed: the second pull completes, reusing what was cached.
    std::fs::write(&served, &good).unwrap();
    let (o, out, err) = run(common::mkt(h2).args(["rootfs", "pull", "--name", "c", &image]));
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(store(h2).join("c/small")).unwrap(),
        "s"
    );

    // 4. A cached blob corrupted on disk is caught while unpacking.
    std::fs::write(blob_cache(h2).join(shex), &bad).unwrap();
    let (o, _, err) = run(common::mkt(h2).args(["rootfs", "pull", "--name", "d", &image]));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains(&format!("layer {small_digest}")) && err.contains("removed from the cache"),
        "{err}"
    );
    assert_eq!(store_entries(h2), ["c"]);
}

#[test]
fn umoci_built_image_with_whiteout_pulls() {
    let Some(reg) = Registry::start() else { return };
    let Some(umoci) = common::program("umoci") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let (layout, bundle) = (d.path().join("layout"), d.path().join("bundle"));
    let img = format!("{}:t", layout.display());
    let umoci_run = |args: &[&str]| {
        let o = Command::new(&umoci).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "umoci {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    umoci_run(&["init", "--layout", layout.to_str().unwrap()]);
    umoci_run(&["new", "--image", &img]);
    umoci_run(&[
        "unpack",
        "--rootless",
        "--image",
        &img,
        bundle.to_str().unwrap(),
    ]);
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc/sub")).unwrap();
    std::fs::write(rootfs.join("etc/keep"), "keep").unwrap();
    std::fs::write(rootfs.join("etc/sub/drop"), "drop").unwrap();
    std::fs::hard_link(rootfs.join("etc/keep"), rootfs.join("etc/keep2")).unwrap();
    std::os::unix::fs::symlink("keep", rootfs.join("etc/link")).unwrap();
    std::fs::set_permissions(
        rootfs.join("etc/keep"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    umoci_run(&["repack", "--image", &img, bundle.to_str().unwrap()]);
    std::fs::remove_file(rootfs.join("etc/sub/drop")).unwrap();
    umoci_run(&["repack", "--image", &img, bundle.to_str().unwrap()]);
    reg.push(&layout, "t", "umoci/img:t", None);

    let home = common::temp_home(None);
    let h = home.path();
    let (o, out, err) = run(common::mkt(h).args([
        "rootfs",
        "pull",
        "--owners=xattrs",
        &reg.image("umoci/img:t"),
    ]));
    assert!(o.status.success(), "{out}{err}");
    let t = store(h).join("img-t");
    assert_eq!(std::fs::read_to_string(t.join("etc/keep")).unwrap(), "keep");
    assert_eq!(
        std::fs::metadata(t.join("etc/keep")).unwrap().ino(),
        std::fs::metadata(t.join("etc/keep2")).unwrap().ino()
    );
    assert_eq!(
        std::fs::read_link(t.join("etc/link")).unwrap(),
        Path::new("keep")
    );
    assert!(t.join("etc/sub").is_dir() && !t.join("etc/sub/drop").exists());
    // umoci --rootless records the files as root's.
    assert_eq!(owner(&t.join("etc/keep")), (0, 0, libc::S_IFREG | 0o600));
}

/// Every path of `src` is in `dst` with the same type, mode, owner, link
/// target, content and time (owners and modes as recorded in xattrs), and
/// `dst` has nothing more.
fn assert_same_tree(src: &Path, dst: &Path) {
    assert_same_tree_with(src, dst, owner)
}

/// As [`assert_same_tree`], reading (uid, gid, mode) of `dst` with `owner`.
fn assert_same_tree_with(src: &Path, dst: &Path, owner: impl Fn(&Path) -> (u32, u32, u32)) {
    let rel = |p: &Path, base: &Path| p.strip_prefix(base).unwrap().to_path_buf();
    let (a, b): (Vec<PathBuf>, Vec<PathBuf>) = (
        scan(src).iter().map(|p| rel(p, src)).collect(),
        scan(dst).iter().map(|p| rel(p, dst)).collect(),
    );
    assert_eq!(a, b, "the same paths");
    for r in a {
        let (s, d) = (src.join(&r), dst.join(&r));
        let sm = std::fs::symlink_metadata(&s).unwrap();
        if sm.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&s).unwrap(),
                std::fs::read_link(&d).unwrap(),
                "{r:?}"
            );
            continue;
        }
        assert_eq!(owner(&d), (sm.uid(), sm.gid(), sm.mode()), "{r:?}");
        if sm.is_file() {
            assert_eq!(
                std::fs::read(&s).unwrap(),
                std::fs::read(&d).unwrap(),
                "{r:?}"
            );
        }
        if !sm.is_dir() {
            assert_eq!(std::fs::metadata(&d).unwrap().mtime(), sm.mtime(), "{r:?}");
        }
    }
}

#[test]
fn pulled_tree_matches_its_source_tree() {
    let Some(reg) = Registry::start() else { return };
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    let mk = |p: &str, mode: u32| {
        std::fs::create_dir_all(src.join(p)).unwrap();
        std::fs::set_permissions(src.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let put = |p: &str, data: &str, mode: u32| {
        std::fs::write(src.join(p), data).unwrap();
        std::fs::set_permissions(src.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mk("", 0o755);
    mk("usr/lib/deep/er", 0o755);
    mk("srv", 0o2775);
    mk("var/tmp", 0o1777);
    put("usr/lib/deep/er/data", &"x".repeat(5000), 0o644);
    put("usr/tool", "#!/bin/sh\n", 0o4755);
    put("srv/shared", "", 0o660);
    std::os::unix::fs::symlink("usr/lib", src.join("lib")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", src.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../../tool", src.join("usr/lib/deep/up")).unwrap();
    nix::unistd::mkfifo(
        &src.join("var/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o620),
    )
    .unwrap();
    if nix::unistd::getuid().is_root() {
        // Only root can read it to make the layer.
        put("empty-perms", "?", 0o000);
        for (p, u, g) in [
            ("srv", 0, 50),
            ("srv/shared", 1234, 5678),
            ("usr/tool", 0, 0),
        ] {
            std::os::unix::fs::lchown(src.join(p), Some(u), Some(g)).unwrap();
        }
    }
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", &src).unwrap();
    let raw = b.into_inner().unwrap();
    let l = Layout::new();
    let mut z = zstd::Encoder::new(Vec::new(), 3).unwrap();
    z.write_all(&raw).unwrap();
    let img = l.image(
        &[(
            z.finish().unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
            sha256_digest(&raw),
        )],
        "amd64",
    );
    reg.push_raw(&l, &img, "test/tree", "1");

    let home = common::temp_home(None);
    let h = home.path();
    let image = reg.image("test/tree:1");
    let (o, out, err) = run(common::mkt(h).args(["rootfs", "pull", "--owners=xattrs", &image]));
    assert!(o.status.success(), "{out}{err}");
    assert_same_tree(&src, &store(h).join("tree-1"));

    // Real owners: as root, the host's ids are the image's.
    if nix::unistd::getuid().is_root() {
        let (o, out, err) = run(common::mkt(h).args(["rootfs", "pull", "--name=real", &image]));
        assert!(o.status.success(), "{out}{err}");
        assert_same_tree_with(&src, &store(h).join("real"), |p| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode())
        });
        let (_, out, _) = run(common::mkt(h).args(["rootfs", "list", "--json"]));
        assert!(out.contains("\"owners\": \"host\""), "{out}");
    }
}

/// The host ids an image's ids become under a subuid-mapped pull: 0 is the
/// user, n > 0 is the first subordinate id + n - 1.
fn mapped(user: &common::TestUser) -> impl Fn(&Path) -> (u32, u32, u32) {
    let range = |f: &str, id: u32| {
        mkt::host::probe::subid_ranges(&std::fs::read_to_string(f).unwrap(), &user.name, id)[0].0
            as u32
    };
    let (su, sg) = (
        range("/etc/subuid", user.uid),
        range("/etc/subgid", user.uid),
    );
    let (uid, gid) = (user.uid, user.gid);
    move |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        let back = |host: u32, own: u32, sub: u32| {
            if host == own { 0 } else { host - sub + 1 }
        };
        (back(m.uid(), uid, su), back(m.gid(), gid, sg), m.mode())
    }
}

/// As a normal user with a subuid range, a pull keeps real owners and
/// modes (setuid included) through a user namespace; devices, which it may
/// not create there, keep their xattr record; `rm` removes it all.
#[test]
fn unprivileged_pull_keeps_real_owners_with_subuids() {
    let Some(Some(user)) = common::unprivileged_user() else {
        if !nix::unistd::getuid().is_root() {
            eprintln!("SKIP: needs root to run as MKT_TEST_USER");
        }
        return;
    };
    let Some(reg) = Registry::start() else { return };
    let l = Layout::new();
    let img = l.image(&main_image(), "amd64");
    reg.push_raw(&l, &img, "test/main", "v1");
    let home = common::temp_home(Some(&user));
    let h = home.path();
    let image = reg.image("test/main:v1");
    let (o, out, err) = run(common::mkt_as(Some(&user), h).args(["rootfs", "pull", &image]));
    assert!(o.status.success(), "{out}{err}");
    let t = store(h).join("main-v1");
    let own = mapped(&user);
    assert_eq!(own(&t.join("usr/bin/su")), (0, 0, libc::S_IFREG | 0o4755));
    assert_eq!(
        own(&t.join("home/user/notes")),
        (1000, 1001, libc::S_IFREG | 0o640)
    );
    assert_eq!(own(&t.join("secret")), (0, 0, libc::S_IFDIR));
    assert_eq!(own(&t.join("tmp")).2, libc::S_IFDIR | 0o1777);
    assert_eq!(own(&t.join("dev/initctl")), (0, 0, libc::S_IFIFO | 0o600));
    // A device node: a file carrying its record.
    assert_eq!(owner(&t.join("dev/sda")), (0, 6, libc::S_IFBLK | 0o660));
    assert_eq!(
        std::fs::read_to_string(t.join("usr/bin/su")).unwrap(),
        "su binary"
    );
    let (_, out, _) = run(common::mkt_as(Some(&user), h).args(["rootfs", "list", "--json"]));
    assert!(out.contains("\"owners\": \"mapped\""), "{out}");
    let (o, out, err) = run(common::mkt_as(Some(&user), h).args(["rootfs", "rm", "main-v1"]));
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(store_entries(h), Vec::<String>::new());
}

/// A token issuer for docker-registry's `auth: token` mode: RS256 JWTs
/// signed with `openssl`, for user `u` with password `pw` only.
struct TokenIssuer {
    dir: tempfile::TempDir,
    port: u16,
    /// The Authorization header of each token request (None: anonymous).
    seen: std::sync::mpsc::Receiver<Option<String>>,
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn mint(dir: &Path, repo: &str, actions: &[&str]) -> String {
    let pem = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [der]});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "mkt-test-issuer", "sub": "u", "aud": "mkt-test-registry",
        "exp": now + 600, "nbf": now - 60, "iat": now, "jti": format!("{now}-{repo}"),
        "access": [{"type": "repository", "name": repo, "actions": actions}],
    });
    let input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(&header).unwrap()),
        b64url(&serde_json::to_vec(&claims).unwrap())
    );
    let mut c = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(dir.join("key.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    format!("{input}.{}", b64url(&o.stdout))
}

impl TokenIssuer {
    fn start() -> Option<TokenIssuer> {
        let openssl = common::program("openssl")?;
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new(openssl)
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=mkt-test-issuer", "-keyout"])
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, seen) = std::sync::mpsc::channel();
        let key_dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                if r.read_line(&mut first).is_err() {
                    continue;
                }
                let mut auth = None;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim_end().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.trim_end().split_once(": ")
                        && k.eq_ignore_ascii_case("authorization")
                    {
                        auth = Some(v.to_string());
                    }
                }
                // scope=repository:NAME:pull
                let repo = first
                    .split("scope=repository%3A")
                    .nth(1)
                    .and_then(|x| x.split("%3A").next())
                    .unwrap_or("")
                    .replace("%2F", "/");
                let ok = auth.as_deref() == Some("Basic dTpwdw==");
                let _ = tx.send(auth);
                let resp = if ok {
                    let body =
                        serde_json::json!({"token": mint(&key_dir, &repo, &["pull"])}).to_string();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .into()
                };
                let _ = s.write_all(resp.as_bytes());
            }
        });
        Some(TokenIssuer { dir, port, seen })
    }

    fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: mkt-test-registry\n    issuer: mkt-test-issuer\n    rootcertbundle: {}\n",
            self.port,
            self.dir.path().join("cert.pem").display()
        )
    }
}

fn write_docker_config(home: &Path, registry: &str, user_pw: &str) -> PathBuf {
    use base64::Engine;
    let dir = home.join(".docker");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(user_pw);
    std::fs::write(
        &p,
        serde_json::json!({"auths": {registry: {"auth": auth}}}).to_string(),
    )
    .unwrap();
    p
}

#[test]
fn bearer_tokens_from_a_token_server_with_docker_config_credentials() {
    let Some(issuer) = TokenIssuer::start() else {
        return;
    };
    let Some(reg) = Registry::start_with(&issuer.registry_config()) else {
        return;
    };
    let l = Layout::new();
    let img = l.image(
        &[layer(&[file("hello", 0o644, "token ok")], Comp::Gzip)],
        "amd64",
    );
    let push = mint(issuer.dir.path(), "private/img", &["pull", "push"]);
    reg.push_raw_auth(&l, &img, "private/img", "1", Some(&push));
    let image = reg.image("private/img:1");
    let registry = format!("127.0.0.1:{}", reg.port);

    // Right credentials, from ~/.docker/config.json: Basic to the issuer,
    // then the token to the registry.
    let home = common::temp_home(None);
    let h = home.path();
    write_docker_config(h, &registry, "u:pw");
    let (o, out, err) = run(common::mkt(h).args(["rootfs", "pull", &image]));
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(store(h).join("img-1/hello")).unwrap(),
        "token ok"
    );
    let seen: Vec<Option<String>> = issuer.seen.try_iter().collect();
    assert!(
        !seen.is_empty() && seen.iter().all(|a| a.as_deref() == Some("Basic dTpwdw==")),
        "{seen:?}"
    );

    // A wrong password: refused, and the message names the file.
    let home2 = common::temp_home(None);
    let h2 = home2.path();
    let cfg = write_docker_config(h2, &registry, "u:wrong");
    let (o, _, err) = run(common::mkt(h2).args(["rootfs", "pull", &image]));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains(&format!("registry {registry} denied access to private/img")),
        "{err}"
    );
    assert!(err.contains(&cfg.display().to_string()), "{err}");
    assert_eq!(store_entries(h2), Vec::<String>::new());

    // No credentials: the anonymous token request is refused too.
    let home3 = common::temp_home(None);
    let h3 = home3.path();
    let (o, _, err) = run(common::mkt(h3).args(["rootfs", "pull", &image]));
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("none were found for it in"), "{err}");
    assert!(
        err.contains(&h3.join(".docker/config.json").display().to_string()),
        "{err}"
    );
}

/// `[limits]` in the config file: a few KiB of gzip holding MiB of zeros
/// stop at the layer limit, two layers at the image limit, a big config
/// before it is downloaded; each error names the layer (or config) and the
/// limit, and leaves nothing in the store. An index entry of an unknown
/// media type and a config that is not JSON are refused. Without the
/// config file, the defaults let the same image through.
fn limits_and_media_types(user: Option<&common::TestUser>) {
    use tar::EntryType as T;
    let Some(reg) = Registry::start() else { return };
    let l = Layout::new();
    let zeros = |name: &str, n: usize| E {
        data: vec![0; n],
        ..e(T::Regular, name, 0o644)
    };
    let big = layer(
        &[file("small", 0o644, "s"), zeros("zeros", 4 << 20)],
        Comp::Gzip,
    );
    assert!(big.0.len() < 64 << 10, "compressible");
    let big_digest = sha256_digest(&big.0);
    let img = l.image(&[big], "amd64");
    reg.push_raw(&l, &img, "limits/big", "1");
    let two = [
        layer(&[zeros("one", 768 << 10)], Comp::Gzip),
        layer(&[zeros("two", 768 << 10)], Comp::Gzip),
    ];
    let second = sha256_digest(&two[1].0);
    let img = l.image(&two, "amd64");
    reg.push_raw(&l, &img, "limits/two", "1");
    let small = || layer(&[file("f", 0o644, "x")], Comp::Gzip);
    let huge_config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "comment": "x".repeat(3 << 19),
    }))
    .unwrap();
    let huge_digest = sha256_digest(&huge_config);
    let img = l.image_with_config(&[small()], &huge_config, "amd64");
    reg.push_raw(&l, &img, "limits/config", "1");
    let not_json = b"\x7fELF, not a config".to_vec();
    let not_json_digest = sha256_digest(&not_json);
    let img = l.image_with_config(&[small()], &not_json, "amd64");
    reg.push_raw(&l, &img, "limits/notjson", "1");
    // An index whose linux/amd64 entry claims a media type mkt does not
    // know (docker-registry stores no manifest of an unknown type, but
    // does not check the entries of an index).
    let mut img = l.image(&[small()], "amd64");
    reg.push_raw(&l, &img, "limits/unknown", "inner");
    let unknown = "application/vnd.example.unknown.v1+json";
    img["mediaType"] = unknown.into();
    let entry = img["digest"].as_str().unwrap().to_string();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [img],
    }))
    .unwrap();
    let r = reqwest::blocking::Client::new()
        .put(format!(
            "http://127.0.0.1:{}/v2/limits/unknown/manifests/1",
            reg.port
        ))
        .header("content-type", "application/vnd.oci.image.index.v1+json")
        .body(index)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text());

    let home = common::temp_home(user);
    let h = home.path();
    let cfg = h.join(".config/mkt/config.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(
        &cfg,
        "[limits]\nlayer = \"1M\"\nimage = \"1M\"\nconfig = \"1M\"\n",
    )
    .unwrap();
    if let Some(u) = user {
        for p in [h.join(".config"), h.join(".config/mkt"), cfg.clone()] {
            nix::unistd::chown(&p, Some(u.uid.into()), Some(u.gid.into())).unwrap();
        }
    }
    let pull = |repo: &str| {
        let (o, out, err) = run(common::mkt_as(user, h).args(["rootfs", "pull", &reg.image(repo)]));
        assert_eq!(o.status.code(), Some(1), "{repo}: {out}{err}");
        assert_eq!(store_entries(h), Vec::<String>::new(), "{repo}: {err}");
        err
    };
    let err = pull("limits/big:1");
    assert!(
        err.contains(&format!(
            "layer {big_digest}: entry \"zeros\" (4 MiB) would take the layer past the limit of 1 MiB of file content per layer (`layer` in the config's [limits])"
        )),
        "{err}"
    );
    let err = pull("limits/two:1");
    assert!(
        err.contains(&format!(
            "layer {second}: entry \"two\" (768 KiB) would take the image past the limit of 1 MiB of file content per image (`image` in the config's [limits])"
        )),
        "{err}"
    );
    let err = pull("limits/config:1");
    assert!(
        err.contains(&format!("its config {huge_digest} is"))
            && err.contains(
                "more than the limit of 1 MiB per config (`config` in the config's [limits])"
            ),
        "{err}"
    );
    assert!(
        !blob_cache(h)
            .join(huge_digest.strip_prefix("sha256:").unwrap())
            .exists(),
        "refused before the download"
    );
    let err = pull("limits/notjson:1");
    assert!(
        err.contains(&format!(
            "its config {not_json_digest} is not an image config: it is not JSON"
        )),
        "{err}"
    );
    let err = pull("limits/unknown:1");
    assert!(
        err.contains(&format!(
            "the index's linux/amd64 entry {entry} has media type \"{unknown}\", which is not an image manifest"
        )),
        "{err}"
    );

    // The defaults: the same images pull, twice.
    std::fs::remove_file(&cfg).unwrap();
    for _ in 0..2 {
        for (repo, file) in [("limits/big:1", "zeros"), ("limits/two:1", "two")] {
            let (o, out, err) = run(common::mkt_as(user, h).args([
                "rootfs",
                "pull",
                "--force",
                "--name",
                "ok",
                &reg.image(repo),
            ]));
            assert!(o.status.success(), "{repo}: {out}{err}");
            assert!(store(h).join("ok").join(file).exists(), "{repo}");
        }
    }
    assert_eq!(
        std::fs::metadata(store(h).join("ok/two")).unwrap().len(),
        768 << 10
    );
}

#[test]
fn limits_and_media_types_as_current_user() {
    limits_and_media_types(None);
}

#[test]
fn limits_and_media_types_as_unprivileged_user() {
    let Some(Some(user)) = common::unprivileged_user() else {
        return;
    };
    limits_and_media_types(Some(&user));
}

#[test]
fn stale_temp_dirs_of_dead_pulls_are_swept() {
    let home = common::temp_home(None);
    let h = home.path();
    let s = store(h);
    let stale = s.join(".tmp-999999999-x-abcdef");
    std::fs::create_dir_all(stale.join("locked")).unwrap();
    std::fs::set_permissions(stale.join("locked"), std::fs::Permissions::from_mode(0o500)).unwrap();
    std::fs::create_dir_all(s.join("handmade")).unwrap();
    let (o, out, err) = run(common::mkt(h).args(["rootfs", "list"]));
    assert!(o.status.success(), "{err}");
    assert!(out.contains("handmade") && !out.contains(".tmp"), "{out}");
    assert_eq!(store_entries(h), ["handmade"]);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let home = common::temp_home(None);
    let h = home.path();
    for (args, want) in [
        (vec!["rootfs", "pull", "Fedora:41"], "must be lowercase"),
        (
            vec!["rootfs", "pull", "--platform", "linux", "fedora"],
            "os/arch",
        ),
        (
            vec!["rootfs", "pull", "--name", "../x", "fedora"],
            "invalid rootfs name",
        ),
        (vec!["rootfs", "rm", ".meta"], "invalid rootfs name"),
    ] {
        let (o, _, err) = run(common::mkt(h).args(&args));
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // Nothing listens on this port: the error names the registry.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (o, _, err) =
        run(common::mkt(h).args(["rootfs", "pull", &format!("127.0.0.1:{port}/a:b")]));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains(&format!("cannot reach registry 127.0.0.1:{port}")),
        "{err}"
    );
}

/// docs/rootfs.md documents every long flag of every `mkt rootfs` subcommand.
#[test]
fn docs_cover_rootfs_subcommands() {
    use clap::CommandFactory;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docs/rootfs.md")).unwrap();
    let cmd = mkt::cli::Cli::command();
    let rootfs = cmd.find_subcommand("rootfs").unwrap();
    for sub in rootfs.get_subcommands().filter(|s| !s.is_hide_set()) {
        assert!(
            text.contains(&format!("mkt rootfs {}", sub.get_name())),
            "{}",
            sub.get_name()
        );
        for arg in sub.get_arguments() {
            if let Some(long) = arg.get_long()
                && !["help", "version", "verbose", "quiet", "config"].contains(&long)
            {
                assert!(
                    text.contains(&format!("--{long}")),
                    "docs/rootfs.md lacks --{long}"
                );
            }
        }
    }
}

/// A recipe on an image base, built by the unprivileged user: the image
/// (the fixture Debian tree, served by the test registry) is pulled with
/// real owners, then the packages are installed with the image's own
/// package manager from Debian's mirror, inside the tree as its root.
#[test]
fn image_based_recipe_installs_packages_with_the_images_package_manager() {
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let Some(fixture) = common::rootfs() else {
        return;
    };
    let Some(reg) = Registry::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let tarball = work.path().join("layer.tar");
    let st = Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "-C"])
        .arg(&fixture)
        .args(["-cf"])
        .arg(&tarball)
        // What apt does not need, to keep the layer small.
        .args([
            "--exclude=./.complete",
            "--exclude=./usr/share/doc",
            "--exclude=./usr/share/man",
            "--exclude=./usr/share/locale",
            "--exclude=./usr/include",
            "--exclude=./usr/lib/gcc",
            "--exclude=./usr/libexec/gcc",
            ".",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let raw = std::fs::read(&tarball).unwrap();
    let diff_id = sha256_digest(&raw);
    let l = Layout::new();
    let img = l.image(
        &[(raw, "application/vnd.oci.image.layer.v1.tar", diff_id)],
        "amd64",
    );
    reg.push_raw(&l, &img, "fixture/bookworm", "1");

    let home = common::temp_home(user.as_ref());
    let h = home.path();
    let recipe = h.join("deb-img.toml");
    std::fs::write(
        &recipe,
        format!(
            "description = \"test: image base\"\npackages = [\"hello\"]\n\
             setup = [\"hello > /etc/hello-out\"]\n[base]\nimage = \"{}\"\n",
            reg.image("fixture/bookworm:1")
        ),
    )
    .unwrap();
    let (o, out, err) = run(common::mkt_as(user.as_ref(), h)
        .args(["rootfs", "build"])
        .arg(&recipe));
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("rootfs deb-img ready"), "{out}");
    let t = store(h).join("deb-img");
    assert_eq!(
        std::fs::read_to_string(t.join("etc/hello-out")).unwrap(),
        "Hello, world!\n"
    );
    let owners = if user.is_some() { "mapped" } else { "host" };
    let (_, out, _) = run(common::mkt_as(user.as_ref(), h).args(["rootfs", "list", "--json"]));
    assert!(out.contains(&format!("\"owners\": \"{owners}\"")), "{out}");
    assert!(out.contains("\"recipe\": \"deb-img\""), "{out}");
    // The image's blobs are cached: a rebuild downloads nothing.
    let (o, out, err) = run(common::mkt_as(user.as_ref(), h)
        .args(["rootfs", "build", "--force"])
        .arg(&recipe));
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("cached base reused"), "{out}");
}

// ------------------------------------- store: privacy, locks, root's shell

fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

/// A copy of the fixture Debian tree as the stored tree `name` in `home`'s
/// store, made by root: its directories are new (and given to `user`), its
/// files hard links to the fixture's (only ever unlinked by the tests).
fn fixture_tree(user: Option<&common::TestUser>, home: &Path, name: &str) -> Option<PathBuf> {
    let fixture = common::rootfs()?;
    let s = store(home);
    std::fs::create_dir_all(&s).unwrap();
    let tree = s.join(name);
    let o = Command::new("cp")
        .arg("-al")
        .arg(&fixture)
        .arg(&tree)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(tree.join(".complete")).unwrap();
    if let Some(u) = user {
        let own = |p: &Path| {
            std::os::unix::fs::lchown(p, Some(u.uid), Some(u.gid)).unwrap();
        };
        for p in [home.join(".local"), home.join(".local/share")]
            .iter()
            .chain([home.join(".local/share/mkt"), s.clone()].iter())
        {
            own(p);
        }
        own(&tree);
        for p in scan(&tree) {
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                own(&p);
            }
        }
    }
    Some(tree)
}

/// A child killed (with the namespace children that die with it) if the
/// test fails before it ends.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for `child` to end, at most `secs`; kills it and fails if not.
fn wait_or_kill(mut child: Child, secs: u64, what: &str) -> (Output, String, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "{what} still running after {secs} s (killed): {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, out, err)
}

/// Whether some process holds a flock lock on `path` (from /proc/locks).
fn flock_held(path: &Path) -> bool {
    let m = std::fs::metadata(path).unwrap();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(m.dev()),
        libc::minor(m.dev()),
        m.ino()
    );
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("FLOCK") && l.split_whitespace().nth(5) == Some(id.as_str()))
}

/// Whether `uid` may look inside `path` (stat run as that user).
fn can_stat_as(uid: u32, path: &Path) -> bool {
    use std::os::unix::process::CommandExt;
    Command::new("stat")
        .arg(path)
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The store keeps images' setuid-root files and device nodes: whoever
/// pulled, no other local user reaches anything in it; an older, open
/// store is made private on use.
fn store_is_private(user: Option<&common::TestUser>, other: u32) {
    let Some(reg) = Registry::start() else { return };
    let l = Layout::new();
    let img = l.image(&main_image(), "amd64");
    reg.push_raw(&l, &img, "test/main", "v1");
    let home = common::temp_home(user);
    let h = home.path();
    // The home (and so the data dir) is open to all, as homes often are.
    std::fs::set_permissions(h, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (o, out, err) =
        run(common::mkt_as(user, h).args(["rootfs", "pull", &reg.image("test/main:v1")]));
    assert!(o.status.success(), "{out}{err}");
    let s = store(h);
    let su = s.join("main-v1/usr/bin/su");
    assert!(su.exists());
    assert_eq!(std::fs::metadata(&s).unwrap().mode() & 0o777, 0o700);
    assert!(can_stat_as(other, &h.join(".local/share/mkt")));
    assert!(
        !can_stat_as(other, &su),
        "uid {other} reached {}",
        su.display()
    );
    assert!(!can_stat_as(other, &s.join("main-v1")));
    // A store made 0755 by an older mkt: tightened by the next command.
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (o, _, err) = run(common::mkt_as(user, h).args(["rootfs", "list"]));
    assert!(o.status.success(), "{err}");
    assert_eq!(std::fs::metadata(&s).unwrap().mode() & 0o777, 0o700);
    assert!(!can_stat_as(other, &su));
}

#[test]
fn store_is_private_to_root() {
    if !is_root() {
        common::unavailable::<()>("root");
        return;
    }
    let Some(Some(other)) = common::unprivileged_user() else {
        return;
    };
    store_is_private(None, other.uid);
}

#[test]
fn store_is_private_to_the_unprivileged_user() {
    let Some(Some(user)) = common::unprivileged_user() else {
        if !is_root() {
            common::unavailable::<()>("root, to run as MKT_TEST_USER");
        }
        return;
    };
    // nobody
    store_is_private(Some(&user), 65534);
}

/// `rootfs rm` refuses a tree while a shell (or a VM, or a build) uses it,
/// naming who, and leaves it whole; it removes it once that ended.
fn rm_refuses_a_tree_in_use(user: Option<&common::TestUser>) {
    let home = common::temp_home(user);
    let h = home.path();
    let Some(tree) = fixture_tree(user, h, "deb") else {
        return;
    };
    // Something in the tree until killed, once it says so.
    let hold = |args: &[&str]| {
        let mut c = Reaped(Some(
            common::mkt_as(user, h)
                .args(args)
                .current_dir(h)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        let mut line = String::new();
        let stdout = c.0.as_mut().unwrap().stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line, "up\n", "{args:?}");
        c
    };
    // `mkt build` holds it too.
    let build = hold(&[
        "build",
        "--shell",
        "--rootfs",
        "deb",
        "--",
        "-c",
        "echo up; exec sleep 600",
    ]);
    let (o, out, err) = run(common::mkt_as(user, h).args(["rootfs", "rm", "deb"]));
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains("mkt build --shell --rootfs deb"), "{err}");
    drop(build);
    let mut shell = hold(&[
        "rootfs",
        "shell",
        "deb",
        "--",
        "sh",
        "-c",
        "echo up; exec sleep 600",
    ]);
    let (o, out, err) = run(common::mkt_as(user, h).args(["rootfs", "rm", "deb"]));
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("rootfs deb is in use by pid")
            && err.contains("rootfs shell deb")
            && err.contains("stop it first"),
        "{err}"
    );
    assert!(tree.join("usr/bin/sleep").exists(), "the tree was touched");
    assert_eq!(store_entries(h), ["deb"]);
    // Nor may a pull --force replace it; nothing of that pull is left.
    if let Some(reg) = Registry::start() {
        let l = Layout::new();
        let img = l.image(&main_image(), "amd64");
        reg.push_raw(&l, &img, "test/main", "v1");
        let (o, out, err) = run(common::mkt_as(user, h).args([
            "rootfs",
            "pull",
            "--force",
            "--owners=xattrs",
            "--name",
            "deb",
            &reg.image("test/main:v1"),
        ]));
        assert_eq!(o.status.code(), Some(1), "{out}{err}");
        assert!(err.contains("rootfs deb is in use by pid"), "{err}");
        assert!(tree.join("usr/bin/sleep").exists(), "the tree was replaced");
        assert_eq!(store_entries(h), ["deb"]);
    }
    // Killed hard: the lock goes with mkt (its children die with it).
    let shell = shell.0.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(shell.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = wait_or_kill(shell, 30, "the killed shell");
    let deadline = Instant::now() + Duration::from_secs(30);
    while flock_held(&tree) {
        assert!(Instant::now() < deadline, "the lock outlived mkt");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its work dir is left behind (a concurrent test's shell may sweep it
    // first); after the next `rootfs shell` none is left.
    let (o, out, err) = run(common::mkt_as(user, h).args(["rootfs", "shell", "deb", "--", "true"]));
    assert!(o.status.success(), "{out}{err}");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("mkt-shell-{pid}-"))
        })
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "not swept: {left:?}");
    let (o, out, err) = run(common::mkt_as(user, h).args(["rootfs", "rm", "deb"]));
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(store_entries(h), Vec::<String>::new());
}

#[test]
fn rm_refuses_a_tree_in_use_as_root() {
    if !is_root() {
        common::unavailable::<()>("root");
        return;
    }
    rm_refuses_a_tree_in_use(None);
}

#[test]
fn rm_refuses_a_tree_in_use_as_the_unprivileged_user() {
    let Some(Some(user)) = common::unprivileged_user() else {
        if !is_root() {
            common::unavailable::<()>("root, to run as MKT_TEST_USER");
        }
        return;
    };
    rm_refuses_a_tree_in_use(Some(&user));
}

/// A normal user (1024 open files) removes a tree deeper than that, and
/// nothing (no hidden `.rm-…` dir) is left.
#[test]
fn an_unprivileged_user_removes_a_very_deep_tree() {
    use std::os::fd::AsFd;
    use std::os::unix::process::CommandExt;
    let Some(user) = common::unprivileged_user() else {
        return;
    };
    let home = common::temp_home(user.as_ref());
    let h = home.path();
    let s = store(h);
    std::fs::create_dir_all(&s).unwrap();
    let top = s.join("deep");
    std::fs::create_dir(&top).unwrap();
    let mut cur = std::fs::File::open(&top).unwrap();
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o755);
    for _ in 0..1500 {
        nix::sys::stat::mkdirat(cur.as_fd(), "d", mode).unwrap();
        let fd = nix::fcntl::openat(
            cur.as_fd(),
            "d",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        if let Some(u) = &user {
            nix::unistd::fchown(&fd, Some(u.uid.into()), Some(u.gid.into())).unwrap();
        }
        cur = std::fs::File::from(fd);
    }
    drop(cur);
    if let Some(u) = &user {
        for p in [
            h.join(".local"),
            h.join(".local/share"),
            h.join(".local/share/mkt"),
            s.clone(),
            top.clone(),
        ] {
            std::os::unix::fs::lchown(&p, Some(u.uid), Some(u.gid)).unwrap();
        }
    }
    let mut c = common::mkt_as(user.as_ref(), h);
    c.args(["rootfs", "rm", "deep"]);
    // A login's usual limit.
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (o, out, err) = run(&mut c);
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(store_entries(h), Vec::<String>::new());
}

/// As root, `rootfs shell` runs the image's code as root of a user
/// namespace that maps no host root: it cannot make device nodes or write
/// the host's sysctls, yet sees (and with --rw writes) the tree's real
/// owners.
#[test]
fn root_shell_cannot_change_the_host() {
    if !is_root() {
        common::unavailable::<()>("root");
        return;
    }
    let home = common::temp_home(None);
    let h = home.path();
    let Some(tree) = fixture_tree(None, h, "deb") else {
        return;
    };
    let probe = "read a b c < /proc/self/uid_map; echo map $a $b $c; \
        grep CapEff /proc/self/status; stat -c 'su %u %a' /usr/bin/su; id -u; \
        mknod /tmp/sda b 8 0 2>/dev/null && echo MKNOD || echo no-mknod; \
        v=$(cat /proc/sys/vm/overcommit_ratio); \
        (echo $v > /proc/sys/vm/overcommit_ratio) 2>/dev/null && echo SYSCTL || echo no-sysctl; \
        touch /x 2>/dev/null && echo WRITABLE || echo READONLY";
    let (o, out, err) =
        run(common::mkt(h).args(["rootfs", "shell", "deb", "--", "sh", "-c", probe]));
    assert!(o.status.success(), "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let map: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(map[1], "0", "{out}");
    assert_ne!(map[2], "0", "host root is mapped inside: {out}");
    assert_eq!(map[3], "65536", "{out}");
    assert_eq!(
        &lines[2..],
        ["su 0 4755", "0", "no-mknod", "no-sysctl", "READONLY"]
    );
    // --rw: what root writes inside belongs to root on the host.
    let (o, out, err) = run(common::mkt(h).args([
        "rootfs",
        "shell",
        "--rw",
        "deb",
        "--",
        "sh",
        "-c",
        "echo hi > /made-inside",
    ]));
    assert!(o.status.success(), "{out}{err}");
    let m = std::fs::metadata(tree.join("made-inside")).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 0));
}

/// Runs `mkt` in a new pid namespace (where the pull's pid does not exist).
fn mkt_in_new_pidns(home: &Path, args: &[&str]) -> (Output, String, String) {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", "--"])
        .arg(env!("CARGO_BIN_EXE_mkt"))
        .args(args);
    let probe = common::mkt(home);
    for (k, v) in probe.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    run(&mut c)
}

/// A TCP relay to `port` that holds back the request for `digest` until
/// released: a pull stalls mid-way, its other layers downloaded.
struct Staller {
    port: u16,
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
    asked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Staller {
    /// A registry holding test/main:v1, and the digest of its last layer
    /// (the one a staller holds back).
    fn registry() -> Option<(Registry, String)> {
        let reg = Registry::start()?;
        let l = Layout::new();
        let layers = main_image();
        let img = l.image(&layers, "amd64");
        reg.push_raw(&l, &img, "test/main", "v1");
        Some((reg, sha256_digest(&layers[2].0)))
    }

    /// Starts `mkt rootfs pull` of test/main:v1 through the staller, in a
    /// process group of its own (so Ctrl-C can go to the group), and returns
    /// once it has asked for the stalled layer.
    fn pull(&self, h: &Path) -> Reaped {
        use std::os::unix::process::CommandExt;
        use std::sync::atomic::Ordering;
        let image = format!("127.0.0.1:{}/test/main:v1", self.port);
        let pull = Reaped(Some(
            common::mkt(h)
                .args(["rootfs", "pull", "--owners", "xattrs", &image])
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.asked.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the pull never asked for the last layer"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pull
    }

    fn start(target: u16, digest: String) -> Staller {
        use std::io::Read;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let release = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicBool::new(false));
        let (rel, ask) = (release.clone(), asked.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut client) = conn else { return };
                let mut server = TcpStream::connect(("127.0.0.1", target)).unwrap();
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                });
                let (rel, ask, digest) = (rel.clone(), ask.clone(), digest.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match client.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if String::from_utf8_lossy(&buf[..n]).contains(&digest) {
                            ask.store(true, Ordering::SeqCst);
                            while !rel.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                        if server.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Staller {
            port,
            release,
            asked,
        }
    }
}

/// While a pull runs (stalled on its last layer): `rootfs gc` refuses to
/// touch the blob cache, and a `rootfs list` from another pid namespace
/// does not take the pull's temp dir for a dead one; the pull then ends
/// well and its layers are all in the cache.
#[test]
fn gc_and_the_stale_sweep_spare_a_running_pull() {
    use std::sync::atomic::Ordering;
    if !is_root() {
        common::unavailable::<()>("root (for a pid namespace)");
        return;
    }
    let Some((reg, last)) = Staller::registry() else {
        return;
    };
    let staller = Staller::start(reg.port, last.clone());
    let home = common::temp_home(None);
    let h = home.path();
    let mut pull = staller.pull(h);
    let blobs = || {
        let mut v: Vec<String> = std::fs::read_dir(blob_cache(h))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.contains(".partial"))
            .collect();
        v.sort();
        v
    };
    // The other layers may still be downloading: wait for them.
    let deadline = Instant::now() + Duration::from_secs(60);
    while blobs().len() < 3 {
        assert!(Instant::now() < deadline, "blobs: {:?}", blobs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = blobs();
    let temps = store_entries(h);
    assert!(
        temps.len() == 1 && temps[0].starts_with(".tmp-"),
        "{temps:?}"
    );

    let (o, out, err) = mkt_in_new_pidns(h, &["rootfs", "list"]);
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(
        store_entries(h),
        temps,
        "the running pull's temp dir was swept"
    );

    let (o, out, err) = run(common::mkt(h).args(["rootfs", "gc"]));
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("cannot gc while a pull or build uses the blob cache")
            && err.contains("rootfs pull"),
        "{err}"
    );
    assert_eq!(blobs(), before, "gc deleted a running pull's blobs");

    staller.release.store(true, Ordering::SeqCst);
    let (o, out, err) = wait_or_kill(pull.0.take().unwrap(), 120, "the pull");
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(store_entries(h), ["main-v1"]);
    let (o, out, err) = run(common::mkt(h).args(["rootfs", "gc"]));
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("removed 0 unused blobs"), "{out}");
}

/// SIGINT (Ctrl-C, to the process group) or SIGTERM or SIGHUP while a pull
/// waits for its last layer: mkt stops within seconds, exits 130, 143 or
/// 129 as a shell reports it, and stores nothing (no tree, no temp dir).
#[test]
fn an_interrupted_pull_exits_130_or_143_and_stores_nothing() {
    use nix::sys::signal::Signal;
    use std::sync::atomic::Ordering;
    let Some((reg, last)) = Staller::registry() else {
        return;
    };
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        let staller = Staller::start(reg.port, last.clone());
        let home = common::temp_home(None);
        let h = home.path();
        let mut pull = staller.pull(h);
        let pid = nix::unistd::Pid::from_raw(pull.0.as_ref().unwrap().id() as i32);
        if sig == Signal::SIGINT {
            nix::sys::signal::killpg(pid, sig).unwrap();
        } else {
            nix::sys::signal::kill(pid, sig).unwrap();
        }
        let t0 = Instant::now();
        let (o, out, err) = wait_or_kill(pull.0.take().unwrap(), 30, "the interrupted pull");
        let took = t0.elapsed();
        assert_eq!(o.status.code(), Some(128 + sig as i32), "{sig}: {out}{err}");
        assert!(err.contains("interrupted"), "{sig}: {err}");
        assert!(took < Duration::from_secs(5), "{sig}: took {took:?}");
        assert_eq!(store_entries(h), Vec::<String>::new(), "{sig}");
        staller.release.store(true, Ordering::SeqCst);
    }
}

/// newuidmap refuses a subordinate range that overlaps the user's own uid:
/// `rootfs shell` on a mapped tree fails with newuidmap's own words (it used
/// to hang for ever). The user and its range exist only for this test.
#[test]
fn a_refused_subuid_range_is_an_error_not_a_hang() {
    if !is_root() {
        common::unavailable::<()>("root (to add a user)");
        return;
    }
    if common::program("newuidmap").is_none() {
        return;
    }
    let name = format!("mkt-badmap-{}", std::process::id());
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("userdel").arg(&self.0).status();
        }
    }
    // A system user gets no subordinate ids of its own.
    let o = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg(&name)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _gone = Gone(name.clone());
    let u = nix::unistd::User::from_name(&name).unwrap().unwrap();
    let (uid, gid) = (u.uid.as_raw(), u.gid.as_raw());
    let o = Command::new("usermod")
        .arg("--add-subuids")
        .arg(format!("{uid}-{}", uid + 9))
        .arg("--add-subgids")
        .arg(format!("{gid}-{}", gid + 9))
        .arg(&name)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let user = common::TestUser {
        name: name.clone(),
        uid,
        gid,
        home: PathBuf::from("/nonexistent"),
    };
    let home = common::temp_home(Some(&user));
    let h = home.path();
    let s = store(h);
    std::fs::create_dir_all(s.join("t")).unwrap();
    std::fs::create_dir_all(s.join(".meta")).unwrap();
    std::fs::write(
        s.join(".meta/t.json"),
        r#"{"name":"t","image":"x","reference":"x","manifest_digest":"sha256:0",
            "config_digest":"sha256:0","platform":"linux/amd64","layers":[],
            "pulled":"2026-01-01T00:00:00Z","size":0,"entries":0,"owners":"mapped"}"#,
    )
    .unwrap();
    for p in [
        h.join(".local"),
        h.join(".local/share"),
        h.join(".local/share/mkt"),
        s.clone(),
        s.join("t"),
        s.join(".meta"),
        s.join(".meta/t.json"),
    ] {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).unwrap();
    }
    let child = common::mkt_as(Some(&user), h)
        .args(["rootfs", "shell", "t", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (o, out, err) = wait_or_kill(child, 60, "mkt rootfs shell with a refused subuid range");
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("newuidmap failed to map the subordinate ids: newuidmap:"),
        "{err}"
    );
}

/// `rootfs rm` refuses the tree of a running VM (the guest would get
/// ESTALE), naming the VM; the VM holds it for its whole life.
#[test]
fn rm_refuses_the_tree_of_a_running_vm() {
    let Some(ck) = common::cloud_kernel() else {
        return;
    };
    if common::program("qemu-system-x86_64").is_none() {
        return;
    }
    let (image, modules, _) = common::cloud_image(&ck);
    let home = common::temp_home(None);
    let h = home.path();
    let Some(tree) = fixture_tree(None, h, "deb") else {
        return;
    };
    let mut vm = Reaped(Some(
        common::mkt(h)
            .args(["run", "--rootfs", "deb", "--kernel"])
            .arg(&image)
            .arg("--modules")
            .arg(&modules)
            .args(["--", "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let pid = vm.0.as_ref().unwrap().id();
    // Started once its record is written (QEMU has been spawned).
    let runs = h.join("run/mkt/runs");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let started = std::fs::read_dir(&runs)
            .map(|d| d.flatten().any(|e| e.path().join("instance.json").exists()))
            .unwrap_or(false);
        if started {
            break;
        }
        if let Some(st) = vm.0.as_mut().unwrap().try_wait().unwrap() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(
                vm.0.as_mut().unwrap().stderr.as_mut().unwrap(),
                &mut err,
            );
            panic!("mkt run ended ({st}) before the test: {err}");
        }
        assert!(Instant::now() < deadline, "the VM never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (o, out, err) = run(common::mkt(h).args(["rootfs", "rm", "deb"]));
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("rootfs deb is in use by VM ") && err.contains(&format!("(pid {pid})")),
        "{err}"
    );
    assert!(tree.join("usr/bin/sleep").exists());
    drop(vm);
    let (o, out, err) = run(common::mkt(h).args(["rootfs", "rm", "deb"]));
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(store_entries(h), Vec::<String>::new());
}

/// `--insecure` speaks plain HTTP to a registry that is not loopback by
/// name (`0.0.0.0` reaches this host, but mkt cannot know it is local):
/// without it, mkt asks for HTTPS and the pull fails. `--owners real`
/// gives real owners as root, and refuses, saying how to get a range, for
/// a user without subordinate ids (where `auto` falls back to xattrs).
#[test]
fn insecure_reaches_plain_http_and_owners_real_needs_real_ids() {
    let Some(reg) = Registry::start() else { return };
    let l = Layout::new();
    let img = l.image(&main_image(), "amd64");
    reg.push_raw(&l, &img, "test/main", "v1");
    let image = format!("0.0.0.0:{}/test/main:v1", reg.port);
    let home = common::temp_home(None);
    let h = home.path();
    let (o, out, err) = run(common::mkt(h).args(["rootfs", "pull", "--name=plain", &image]));
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(!store(h).join("plain").exists());
    if !nix::unistd::getuid().is_root() {
        return common::unavailable("root (real owners; a user without subuids)").unwrap_or(());
    }
    let (o, out, err) = run(common::mkt(h).args([
        "rootfs",
        "pull",
        "--insecure",
        "--owners=real",
        "--name=plain",
        &image,
    ]));
    assert!(o.status.success(), "{out}{err}");
    let notes = std::fs::symlink_metadata(store(h).join("plain/home/user/notes")).unwrap();
    assert_eq!((notes.uid(), notes.gid()), (1000, 1001));
    let (_, out, _) = run(common::mkt(h).args(["rootfs", "list", "--json"]));
    assert!(out.contains("\"owners\": \"host\""), "{out}");

    // nobody has no subordinate id range.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let text = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    assert!(!text.lines().any(|l| l.starts_with("nobody:")), "{text}");
    let user = common::TestUser {
        name: "nobody".into(),
        uid: nobody.uid.as_raw(),
        gid: nobody.gid.as_raw(),
        home: nobody.dir,
    };
    let home = common::temp_home(Some(&user));
    let h = home.path();
    let (o, out, err) = run(common::mkt_as(Some(&user), h).args([
        "rootfs",
        "pull",
        "--insecure",
        "--owners=real",
        &image,
    ]));
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("nobody has no subordinate uid range")
            && err.contains("usermod --add-subuids"),
        "{err}"
    );
    assert!(!store(h).join("main-v1").exists());
    let (o, out, err) =
        run(common::mkt_as(Some(&user), h).args(["rootfs", "pull", "--insecure", &image]));
    assert!(o.status.success(), "{out}{err}");
    let (_, out, _) = run(common::mkt_as(Some(&user), h).args(["rootfs", "list", "--json"]));
    assert!(out.contains("\"owners\": \"xattrs\""), "{out}");
}
