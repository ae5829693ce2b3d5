//! What a layer may cost: the bytes of file content per layer and per
//! image, reserved before an entry is written, and the size of the PAX and
//! long-name records the tar crate reads into memory, checked in the
//! stream before it reads them.

use super::{Fail, Unpacker};
use std::io::{self, Read};

/// PAX and GNU long-name records larger than this are refused, as Go's
/// archive/tar (hence Docker) refuses them: the tar crate reads them into
/// memory whole, so a few KiB of gzip could take GiB of memory.
pub(crate) const MAX_TAR_RECORDS: u64 = 1 << 20;

/// Passes a tar stream through, following its headers (as the tar crate
/// reads them) to refuse oversized PAX and long-name records before the
/// tar crate reads them. A stream it cannot follow (a bad checksum, which
/// the tar crate reports itself) is no longer checked.
pub(super) struct RecordCap<R> {
    inner: R,
    state: Track,
    block: [u8; 512],
    filled: usize,
    /// The records of the last PAX header, while they apply.
    pax: Option<Vec<u8>>,
}

#[derive(Clone, Copy)]
enum Track {
    /// Reading a header block.
    Header,
    /// Skipping content and padding.
    Skip(u64),
    /// Keeping a PAX header's records, then skipping its padding.
    Pax { left: u64, pad: u64 },
    /// Reading GNU sparse extension blocks, then skipping `data`.
    SparseExt { data: u64 },
    /// The end of the archive, or a stream it cannot follow.
    Off,
}

fn padded(n: u64) -> u64 {
    n.div_ceil(512).saturating_mul(512)
}

impl<R: Read> RecordCap<R> {
    pub(super) fn new(inner: R) -> Self {
        RecordCap {
            inner,
            state: Track::Header,
            block: [0; 512],
            filled: 0,
            pax: None,
        }
    }

    /// The state after the header in `self.block`.
    fn header(&mut self) -> io::Result<Track> {
        use tar::EntryType as T;
        if self.block.iter().all(|b| *b == 0) {
            return Ok(Track::Off);
        }
        let h = tar::Header::from_byte_slice(&self.block);
        let sum: u32 = self.block[..148]
            .iter()
            .chain(&self.block[156..])
            .map(|b| u32::from(*b))
            .sum::<u32>()
            + 8 * 32;
        let Ok(size) = h.entry_size() else {
            return Ok(Track::Off);
        };
        if h.cksum().ok() != Some(sum) {
            return Ok(Track::Off);
        }
        let kind = h.entry_type();
        let recognized = h.as_gnu().is_some() || h.as_ustar().is_some();
        let special = kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink();
        if special && recognized && size > MAX_TAR_RECORDS {
            return Err(io::Error::other(format!(
                "a {} record of {size} bytes, more than the {} mkt (like Docker) reads",
                match kind {
                    T::XHeader => "PAX",
                    T::XGlobalHeader => "PAX global",
                    _ => "GNU long name",
                },
                crate::oci::show_limit(MAX_TAR_RECORDS)
            )));
        }
        if special {
            if kind.is_pax_local_extensions() && recognized {
                self.pax = Some(Vec::new());
                return Ok(Track::Pax {
                    left: size,
                    pad: padded(size) - size,
                });
            }
            if !(recognized && (kind.is_gnu_longname() || kind.is_gnu_longlink())) {
                // An entry of its own, which the PAX records went to.
                self.pax = None;
            }
            return Ok(Track::Skip(padded(size)));
        }
        // As the tar crate does: a PAX size wins over the header's.
        let pax = self.pax.take();
        let size = pax
            .as_deref()
            .and_then(|p| {
                tar::PaxExtensions::new(p)
                    .filter_map(Result::ok)
                    .find(|e| e.key_bytes() == b"size")
                    .map(|e| {
                        std::str::from_utf8(e.value_bytes())
                            .ok()?
                            .parse::<u64>()
                            .ok()
                    })
            })
            .flatten()
            .unwrap_or(size);
        if kind.is_gnu_sparse() && h.as_gnu().is_some_and(|g| g.is_extended()) {
            return Ok(Track::SparseExt { data: padded(size) });
        }
        Ok(Track::Skip(padded(size)))
    }

    /// Follows the stream through `buf`.
    fn follow(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.state {
                Track::Off => return Ok(()),
                Track::Skip(n) => {
                    let k = n.min(buf.len() as u64);
                    buf = &buf[k as usize..];
                    self.state = if n == k {
                        Track::Header
                    } else {
                        Track::Skip(n - k)
                    };
                }
                Track::Pax { left, pad } => {
                    let k = left.min(buf.len() as u64) as usize;
                    if let Some(p) = &mut self.pax {
                        p.extend_from_slice(&buf[..k]);
                    }
                    buf = &buf[k..];
                    self.state = if left == k as u64 {
                        if pad == 0 {
                            Track::Header
                        } else {
                            Track::Skip(pad)
                        }
                    } else {
                        Track::Pax {
                            left: left - k as u64,
                            pad,
                        }
                    };
                }
                Track::Header | Track::SparseExt { .. } => {
                    let k = (512 - self.filled).min(buf.len());
                    self.block[self.filled..self.filled + k].copy_from_slice(&buf[..k]);
                    self.filled += k;
                    buf = &buf[k..];
                    if self.filled < 512 {
                        continue;
                    }
                    self.filled = 0;
                    self.state = match self.state {
                        Track::SparseExt { data } if self.block[504] != 0 => {
                            Track::SparseExt { data }
                        }
                        Track::SparseExt { data: 0 } => Track::Header,
                        Track::SparseExt { data } => Track::Skip(data),
                        _ => self.header()?,
                    };
                    if let Track::Skip(0) = self.state {
                        self.state = Track::Header;
                    }
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for RecordCap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.follow(&buf[..n])?;
        Ok(n)
    }
}

impl Unpacker {
    /// The bytes of file content one layer, and all layers together, may
    /// write; an entry that would go past either fails the unpack before
    /// it is written.
    pub fn set_limits(&mut self, layer: u64, image: u64) {
        self.max_layer = layer;
        self.max_image = image;
    }

    /// Reserves `size` bytes of the layer's and the image's budgets.
    pub(super) fn reserve(&mut self, size: u64) -> Result<(), Fail> {
        if self.layer_bytes.saturating_add(size) > self.max_layer {
            return Err(Fail::TooLarge("layer", size, self.max_layer));
        }
        if self.stats.bytes.saturating_add(size) > self.max_image {
            return Err(Fail::TooLarge("image", size, self.max_image));
        }
        self.layer_bytes += size;
        self.stats.bytes += size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::unpack::UnpackError;
    use crate::rootfs::unpack::testutil::*;
    use std::sync::atomic::AtomicBool;
    use tar::EntryType as T;

    #[test]
    fn a_sparse_file_counts_by_its_apparent_size_and_nothing_is_written() {
        let d = tempfile::tempdir().unwrap();
        let no = AtomicBool::new(false);
        // One 512-byte block of data at the end of `apparent` bytes.
        let sparse_tar =
            |apparent: u64| [sparse("sparse", apparent - 512, 1, 0), vec![0; 1024]].concat();
        // 1 TiB from a 2 KiB layer: over the default per-layer limit.
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u
            .unpack_tar(sparse_tar(1 << 40).as_slice(), "sha256:sparse", &no)
            .unwrap_err();
        assert!(
            matches!(e, UnpackError::TooLarge { scope: "layer", .. }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "layer sha256:sparse: entry \"sparse\" (1 TiB) would take the layer past the limit of 16 GiB of file content per layer (`layer` in the config's [limits])"
        );
        assert!(!d.path().join("sparse").exists(), "refused before writing");
        // Under a limit it fits, it is written at its apparent size.
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.set_limits(1 << 20, 1 << 20);
        u.unpack_tar(sparse_tar(64 << 10).as_slice(), "sha256:small", &no)
            .unwrap();
        assert_eq!(u.finish().unwrap().bytes, 64 << 10);
        let m = std::fs::metadata(d.path().join("sparse")).unwrap();
        assert_eq!(m.len(), 64 << 10);
    }

    #[test]
    fn holes_and_zeros_are_not_written_and_read_back_as_zeros() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.set_limits(1 << 30, 1 << 30);
        // 64 MiB apparent, 512 bytes of data at its end.
        let layer = [sparse("sparse", (64 << 20) - 512, 1, 0), vec![0; 1024]].concat();
        u.unpack_tar(layer.as_slice(), "sha256:big", &NO).unwrap();
        let mut tail = vec![0u8; 300 << 10];
        tail[(300 << 10) - 5..].copy_from_slice(b"x\0\0\0y");
        let layer = pack(vec![
            (header(T::Regular, "zeros", 0o644), &[0u8; 200 << 10][..]),
            (header(T::Regular, "tail", 0o644), &tail[..]),
        ]);
        unpack(&mut u, &layer).unwrap();
        let sparse = d.path().join("sparse");
        let m = std::fs::metadata(&sparse).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(m.blocks() * 512 < 1 << 20, "{} blocks", m.blocks());
        let data = std::fs::read(&sparse).unwrap();
        assert!(data[..(64 << 20) - 512].iter().all(|b| *b == 0));
        assert!(data[(64 << 20) - 512..].iter().all(|b| *b == b's'));
        // A file of zeros keeps its length (the hole runs to its end); a
        // block at most (for xattrs that do not fit in the inode).
        let z = std::fs::metadata(d.path().join("zeros")).unwrap();
        assert_eq!(z.len(), 200 << 10);
        assert!(z.blocks() * 512 <= 4096, "{} blocks", z.blocks());
        assert_eq!(
            std::fs::read(d.path().join("zeros")).unwrap(),
            [0; 200 << 10]
        );
        assert_eq!(std::fs::read(d.path().join("tail")).unwrap(), tail);
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_layer_limit_naming_layer_and_limit() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::create_dir(&target).unwrap();
        let no = AtomicBool::new(false);
        // 8 MiB of zeros in a few KiB of gzip.
        let (blob, digest) = zero_layer(d.path(), &[("small", 1000), ("zeros", 8 << 20)]);
        assert!(std::fs::metadata(&blob).unwrap().len() < 64 << 10);
        let mut u = Unpacker::new(&target).unwrap();
        u.set_limits(1 << 20, 4 << 20);
        let e = u.unpack_layer(&blob, &digest, &no).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "layer {digest}: entry \"zeros\" (8 MiB) would take the layer past the limit of 1 MiB of file content per layer (`layer` in the config's [limits])"
            )
        );
        assert!(!target.join("zeros").exists());
        assert!(blob.exists(), "a good blob stays cached");
    }

    #[test]
    fn the_image_limit_counts_all_layers() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::create_dir(&target).unwrap();
        let no = AtomicBool::new(false);
        let (b1, d1) = zero_layer(d.path(), &[("one", 600 << 10)]);
        let (b2, d2) = zero_layer(d.path(), &[("two", 600 << 10)]);
        let mut u = Unpacker::new(&target).unwrap();
        u.set_limits(1 << 20, 1 << 20);
        u.unpack_layer(&b1, &d1, &no).unwrap();
        let e = u.unpack_layer(&b2, &d2, &no).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "layer {d2}: entry \"two\" (600 KiB) would take the image past the limit of 1 MiB of file content per image (`image` in the config's [limits])"
            )
        );
        // The same layer again is fine for the layer limit alone.
        let mut u = Unpacker::new(&target).unwrap();
        u.set_limits(1 << 20, 2 << 20);
        u.unpack_layer(&b2, &d2, &no).unwrap();
        u.unpack_layer(&b1, &d1, &no).unwrap();
        assert_eq!(u.finish().unwrap().bytes, 1200 << 10);
    }

    #[test]
    fn the_limits_are_inclusive_and_count_every_entry_of_a_layer() {
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.set_limits(1000, 1500);
        let file =
            |name: &'static str, data: &'static [u8]| (header(T::Regular, name, 0o644), data);
        // Exactly the layer limit, then exactly the image limit.
        unpack(
            &mut u,
            &pack(vec![file("a", &[1; 600]), file("b", &[2; 400])]),
        )
        .unwrap();
        unpack(&mut u, &pack(vec![file("c", &[3; 500])])).unwrap();
        let e = unpack(&mut u, &pack(vec![file("e", b"1")])).unwrap_err();
        assert!(e.contains("would take the image past the limit"), "{e}");
        let mut u = Unpacker::new(d.path()).unwrap();
        u.set_limits(1000, 10_000);
        let e = unpack(
            &mut u,
            &pack(vec![file("a", &[1; 600]), file("b", &[2; 600])]),
        );
        assert_eq!(
            e.unwrap_err(),
            "layer sha256:t: entry \"b\" (600 bytes) would take the layer past the limit of 1000 bytes of file content per layer (`layer` in the config's [limits])"
        );
    }

    #[test]
    fn oversized_pax_and_long_name_records_are_refused_before_reading_them() {
        let no = AtomicBool::new(false);
        let file = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        // 2 MiB of PAX records; as gzip, a few KiB (4 GiB would be 4 MiB).
        let mut b = tar::Builder::new(Vec::new());
        file(&mut b, "first", b"1");
        b.append_pax_extensions([("comment", &vec![b'x'; 2 << 20][..])])
            .unwrap();
        file(&mut b, "second", b"2");
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u
            .unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:pax", &no)
            .unwrap_err();
        let UnpackError::Read {
            layer,
            entry,
            source,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(
            (layer.as_str(), entry.as_deref()),
            ("sha256:pax", Some("\"first\""))
        );
        assert!(
            source.to_string().starts_with("a PAX record of 20971")
                && source
                    .to_string()
                    .ends_with("more than the 1 MiB mkt (like Docker) reads"),
            "{source}"
        );
        assert!(!d.path().join("second").exists());

        // A 2 MiB GNU long name.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(0);
        b.append_data(&mut h, "a/".repeat(1 << 20) + "f", io::empty())
            .unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u
            .unpack_tar(b.into_inner().unwrap().as_slice(), "sha256:long", &no)
            .unwrap_err();
        assert!(
            format!("{:?}", e).contains("a GNU long name record of 2097"),
            "{e:?}"
        );
    }

    #[test]
    fn record_checks_follow_pax_sizes_and_pass_real_layers() {
        let no = AtomicBool::new(false);
        // A PAX size (as Go writes for files over 8 GiB) wins over the
        // header's 0: the check must skip 1000 bytes, then see the next
        // header.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"1000"[..])]).unwrap();
        let mut out = b.into_inner().unwrap();
        out.truncate(out.len() - 1024);
        let mut h = tar::Header::new_ustar();
        h.set_path("big").unwrap();
        h.set_mode(0o644);
        h.set_size(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&[b'd'; 1000]);
        out.resize(out.len().div_ceil(512) * 512, 0);
        let mut b = tar::Builder::new(out);
        b.append_pax_extensions([("comment", &vec![b'x'; 2 << 20][..])])
            .unwrap();
        let layer = b.into_inner().unwrap();
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u.unpack_tar(layer.as_slice(), "sha256:s", &no).unwrap_err();
        assert!(format!("{e:?}").contains("a PAX record of"), "{e:?}");
        assert_eq!(std::fs::read(d.path().join("big")).unwrap(), [b'd'; 1000]);

        // Ordinary records, long names and sparse files pass.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.user.x", &b"v"[..])])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(3);
        let long = "d/".repeat(100) + "f";
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let mut layer = b.into_inner().unwrap();
        layer.truncate(layer.len() - 1024);
        layer.extend_from_slice(&sparse("sparse", (8 << 10) - 512, 1, 0));
        layer.extend_from_slice(&[0; 1024]);
        let mut u = Unpacker::new(d.path()).unwrap();
        u.unpack_tar(layer.as_slice(), "sha256:ok", &no).unwrap();
        assert_eq!(std::fs::read(d.path().join(&long)).unwrap(), b"abc");
        assert_eq!(
            std::fs::metadata(d.path().join("sparse")).unwrap().len(),
            8 << 10
        );

        // A sparse file with an extension block of its map: skipped too.
        let oct = |n: u64| {
            let mut f = [0u8; 12];
            f[..11].copy_from_slice(format!("{n:011o}").as_bytes());
            f
        };
        let mut h = tar::Header::new_gnu();
        h.set_path("ext").unwrap();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_size(5 * 512);
        let g = h.as_gnu_mut().unwrap();
        g.realsize = oct(4608);
        for i in 0..4 {
            g.sparse[i].offset = oct(i as u64 * 1024);
            g.sparse[i].numbytes = oct(512);
        }
        g.isextended[0] = 1;
        h.set_cksum();
        let mut ext = tar::GnuExtSparseHeader::new();
        ext.sparse[0].offset = oct(4096);
        ext.sparse[0].numbytes = oct(512);
        let mut layer = h.as_bytes().to_vec();
        layer.extend_from_slice(ext.as_bytes());
        layer.extend_from_slice(&[b's'; 5 * 512]);
        let mut b = tar::Builder::new(layer);
        b.append_pax_extensions([("comment", &vec![b'x'; 2 << 20][..])])
            .unwrap();
        let layer = b.into_inner().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u.unpack_tar(layer.as_slice(), "sha256:e", &no).unwrap_err();
        assert!(format!("{e:?}").contains("a PAX record of"), "{e:?}");
        assert_eq!(std::fs::metadata(d.path().join("ext")).unwrap().len(), 4608);
    }

    /// `prefix` (entries, no end blocks) then a PAX record too big to read.
    fn then_big_pax(prefix: Vec<u8>) -> Vec<u8> {
        let mut b = tar::Builder::new(prefix);
        b.append_pax_extensions([("comment", &vec![b'x'; 2 << 20][..])])
            .unwrap();
        b.into_inner().unwrap()
    }

    fn without_end(mut layer: Vec<u8>) -> Vec<u8> {
        layer.truncate(layer.len() - 1024);
        layer
    }

    /// A reader handing out at most `n` bytes at a time.
    struct Chunks<'a>(&'a [u8], usize);

    impl Read for Chunks<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let k = self.1.min(buf.len()).min(self.0.len());
            buf[..k].copy_from_slice(&self.0[..k]);
            self.0 = &self.0[k..];
            Ok(k)
        }
    }

    fn refused(layer: &[u8], chunk: usize) -> String {
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        let e = u
            .unpack_tar(Chunks(layer, chunk), "sha256:r", &NO)
            .unwrap_err();
        let UnpackError::Read { source, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(source.to_string().starts_with("a PAX record of"), "{e:?}");
        e.to_string()
    }

    #[test]
    fn read_errors_name_the_entry_they_follow() {
        let mut b = tar::Builder::new(Vec::new());
        add(&mut b, header(T::Regular, "first", 0o644), b"1", &[]);
        let layer = then_big_pax(without_end(b.into_inner().unwrap()));
        assert_eq!(
            refused(&layer, usize::MAX),
            "layer sha256:r: cannot read the layer's tar stream (at entry \"first\")"
        );
        assert_eq!(
            refused(&then_big_pax(Vec::new()), usize::MAX),
            "layer sha256:r: cannot read the layer's tar stream"
        );
    }

    #[test]
    fn record_checks_follow_streams_read_in_small_pieces() {
        // PAX records, headers and content split across reads.
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            header(T::Regular, "a", 0o644),
            &[b'a'; 700],
            &[("SCHILY.xattr.user.k", &[b'v'; 600][..])],
        );
        let layer = then_big_pax(without_end(b.into_inner().unwrap()));
        for chunk in [1, 7, 100, 511, 513] {
            refused(&layer, chunk);
        }
        // A record of exactly the limit is read.
        let mut b = tar::Builder::new(Vec::new());
        let value = vec![b'x'; (MAX_TAR_RECORDS - 17) as usize];
        add(
            &mut b,
            header(T::Regular, "a", 0o644),
            b"a",
            &[("comment", &value)],
        );
        let layer = b.into_inner().unwrap();
        assert_eq!(&layer[124..135], b"00004000000", "a record of 1 MiB");
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.unpack_tar(layer.as_slice(), "sha256:max", &NO).unwrap();
        assert_eq!(std::fs::read(d.path().join("a")).unwrap(), b"a");
    }

    #[test]
    fn pax_records_go_to_the_entry_after_long_names_and_not_past_a_global_header() {
        let pax_size = |b: &mut tar::Builder<Vec<u8>>| {
            b.append_pax_extensions([("size", &b"1000"[..])]).unwrap();
        };
        // PAX records, a GNU long name, then the entry they describe.
        let mut b = tar::Builder::new(Vec::new());
        pax_size(&mut b);
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(0);
        let long = "n".repeat(150);
        let mut data = vec![b'd'; 1000];
        data.resize(1024, 0);
        // The builder writes the long name, then the header (size 0), then
        // the 1000 bytes the PAX size gives it.
        b.append_data(&mut h, &long, io::empty()).unwrap();
        let mut layer = without_end(b.into_inner().unwrap());
        layer.extend_from_slice(&data);
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        u.unpack_tar(
            Chunks(&[layer.clone(), vec![0; 1024]].concat(), 512),
            "sha256:l",
            &NO,
        )
        .unwrap();
        assert_eq!(std::fs::read(d.path().join(&long)).unwrap(), [b'd'; 1000]);
        refused(&then_big_pax(layer), 512);

        // PAX records, then a global header (which takes them), then an
        // entry of its own size.
        let mut b = tar::Builder::new(Vec::new());
        pax_size(&mut b);
        let mut h = tar::Header::new_ustar();
        h.set_path("pax_global_header").unwrap();
        h.set_entry_type(T::XGlobalHeader);
        h.set_size(12);
        h.set_cksum();
        b.append(&h, &b"12 comment=\n"[..]).unwrap();
        add(&mut b, header(T::Regular, "empty", 0o644), b"", &[]);
        refused(&then_big_pax(without_end(b.into_inner().unwrap())), 512);
    }

    /// A GNU sparse file's header, then its data: a hole of `hole` bytes,
    /// then `blocks` of data; `ext` extension blocks of its map (with no
    /// more entries in them). No end of archive. Numbers in base-256, as
    /// GNU tar writes those too big for octal.
    fn sparse(name: &str, hole: u64, blocks: u64, ext: usize) -> Vec<u8> {
        let num = |n: u64| {
            let mut f = [0u8; 12];
            f[4..].copy_from_slice(&n.to_be_bytes());
            f[0] = 0x80;
            f
        };
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_entry_type(T::GNUSparse);
        h.set_mode(0o644);
        h.set_size(blocks * 512);
        let g = h.as_gnu_mut().unwrap();
        g.realsize = num(hole + blocks * 512);
        g.sparse[0].offset = num(hole);
        g.sparse[0].numbytes = num(blocks * 512);
        g.isextended[0] = u8::from(ext > 0);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        for i in 0..ext {
            let mut e = tar::GnuExtSparseHeader::new();
            e.isextended[0] = u8::from(i + 1 < ext);
            out.extend_from_slice(e.as_bytes());
        }
        out.extend(std::iter::repeat_n(b's', blocks as usize * 512));
        out
    }

    #[test]
    fn record_checks_follow_sparse_files_with_and_without_map_extensions() {
        for (blocks, ext) in [(1, 0), (2, 2), (0, 1)] {
            let layer = then_big_pax(sparse("s", 8192, blocks, ext));
            refused(&layer, 512);
            refused(&layer, usize::MAX);
            let d = tempfile::tempdir().unwrap();
            let mut u = Unpacker::new(d.path()).unwrap();
            let ok = [sparse("s", 8192, blocks, ext), vec![0; 1024]].concat();
            u.unpack_tar(ok.as_slice(), "sha256:s", &NO).unwrap();
            let m = std::fs::metadata(d.path().join("s")).unwrap();
            assert_eq!(m.len(), 8192 + blocks * 512, "{blocks} {ext}");
        }
    }

    /// An old-style header can hold no zero byte at all (fields ended by
    /// spaces): it is a header, not the end of the archive.
    #[test]
    fn record_checks_follow_a_header_without_zero_bytes() {
        let mut block = [b'x'; 512];
        block[..100].fill(b'a');
        for (at, field) in [
            (100, &b"0000644 "[..]),
            (108, b"0000000 "),
            (116, b"0000000 "),
            (124, b"00000000001 "),
            (136, b"00000000000 "),
        ] {
            block[at..at + field.len()].copy_from_slice(field);
        }
        block[156] = b'0';
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|b| u32::from(*b)).sum();
        block[148..156].copy_from_slice(format!("{sum:07o} ").as_bytes());
        assert!(!block.contains(&0));
        let mut layer = block.to_vec();
        layer.push(b'1');
        layer.resize(1024, 0);
        refused(&then_big_pax(layer.clone()), 512);
        let d = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(d.path()).unwrap();
        layer.resize(2048, 0);
        u.unpack_tar(layer.as_slice(), "sha256:v7", &NO).unwrap();
        assert_eq!(std::fs::read(d.path().join("a".repeat(100))).unwrap(), b"1");
    }

    /// The record checks see the same stream however it is split, even
    /// when a read ends inside a header and the next one goes past it.
    #[test]
    fn record_checks_follow_any_split_of_the_stream() {
        let mut b = tar::Builder::new(Vec::new());
        add(&mut b, header(T::Regular, "a", 0o644), &[b'a'; 700], &[]);
        let layer = then_big_pax(without_end(b.into_inner().unwrap()));
        for first in [1, 100, 511] {
            let mut cap = RecordCap::new(io::empty());
            cap.follow(&layer[..first]).unwrap();
            let e = cap.follow(&layer[first..]).unwrap_err();
            assert!(e.to_string().starts_with("a PAX record of"), "{first}: {e}");
        }
    }
}
