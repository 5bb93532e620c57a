//! How layers are compressed: gzip, which every client reads, or zstd on request,
//! which packs several times faster and unpacks faster on the client but needs an
//! OCI client (containerd, podman, skopeo, CRI-O, docker ≥ 23).
//!
//! Both encoders compress on every core and still give bytes that depend only on
//! the input and the level, so digests are the same on every machine: gzip through
//! [`ParGzEncoder`]'s fixed blocks, zstd through libzstd's multithreaded mode, whose
//! output is the same for any number of workers ≥ 1 (its single-threaded mode gives
//! other bytes, so it is never used) as long as the stream is never flushed before
//! its end and no source size is pledged.

use crate::pargzip::ParGzEncoder;
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Threads compressing one layer (`layers.compression_threads`); 0: one per core.
/// A tuning knob of the process, never part of the bytes.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// zstd's job size: part of the bytes, so fixed (see `Encoder::with_threads`).
const ZSTD_JOB_BYTES: u32 = 4 << 20;

pub fn set_threads(threads: usize) {
    THREADS.store(threads, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
}

impl Compression {
    /// From `layers.compression`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gzip" => Some(Compression::Gzip),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Whether a client cannot unpack zstd layers: it accepts Docker manifest types
/// only (zstd layers go only into OCI manifests), or it is docker before 23, which
/// accepts OCI manifests but fails after the download with `archive/tar: invalid
/// tar header`. `accepted` is what [`crate::manifest::accepted_types`] read.
pub fn client_lacks_zstd(accepted: &[String], user_agent: &str) -> bool {
    use crate::manifest::{OCI_INDEX, OCI_MANIFEST};
    let names_manifests = accepted.iter().any(|t| t.starts_with("application/vnd."));
    let reads_oci = accepted.iter().any(|t| t == OCI_MANIFEST || t == OCI_INDEX);
    let old_docker = user_agent
        .strip_prefix("docker/")
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| major < 23);
    (names_manifests && !reads_oci) || old_docker
}

/// A compression with its level: what a layer's bytes depend on besides its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Gzip { level: u32 },
    Zstd { level: i32 },
}

impl Codec {
    pub fn compression(self) -> Compression {
        match self {
            Codec::Gzip { .. } => Compression::Gzip,
            Codec::Zstd { .. } => Compression::Zstd,
        }
    }

    pub fn check(self) -> Result<Self, String> {
        match self {
            Codec::Gzip { level } if level > 9 => {
                Err(format!("invalid gzip level {level} (expected 0..=9)"))
            }
            Codec::Zstd { level } if !(1..=19).contains(&level) => {
                Err(format!("invalid zstd level {level} (expected 1..=19)"))
            }
            ok => Ok(ok),
        }
    }
}

/// A compressing writer of either kind.
pub enum Encoder<W: Write> {
    Gzip(ParGzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    /// Compresses on every core, or on as many threads as configured.
    pub fn new(codec: Codec, inner: W) -> io::Result<Self> {
        let threads = match THREADS.load(Ordering::Relaxed) {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        Self::with_threads(codec, inner, threads)
    }

    /// `threads` changes only the speed, never the output.
    pub fn with_threads(codec: Codec, inner: W, threads: usize) -> io::Result<Self> {
        Ok(match codec {
            Codec::Gzip { level } => {
                Encoder::Gzip(ParGzEncoder::with_threads(inner, level, threads))
            }
            Codec::Zstd { level } => {
                let mut z = zstd::stream::write::Encoder::new(inner, level)?;
                // Every parameter the bytes depend on is set here, not left to
                // the library's defaults of the day.
                z.multithread(threads.max(1) as u32)?;
                z.include_checksum(false)?;
                z.include_contentsize(false)?;
                z.long_distance_matching(false)?;
                // The input cut into jobs of this size, whatever the thread count:
                // libzstd's default (8 MiB at level 3) would be chosen for us, and
                // the encoder holds about seven jobs' input and output, so this
                // also caps its memory (about 60 MiB at 4 MiB, for 0.2% in size).
                z.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_BYTES))?;
                Encoder::Zstd(z)
            }
        })
    }

    /// Ends the stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => {
                let mut inner = z.finish()?;
                inner.flush()?;
                Ok(inner)
            }
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
        }
    }

    /// A flush must not end a block early, which would change the bytes: gzip's
    /// flushes only what is compressed already, zstd's does nothing until the end.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> Vec<u8> {
        // Compressible and not: text, then 3 MiB of pseudo-random bytes, so that
        // libzstd cuts several jobs for its workers.
        let mut data: Vec<u8> = (0..400_000u32)
            .flat_map(|i| format!("line {} of the layer\n", i % 977).into_bytes())
            .collect();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        data.extend((0..3 << 20).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        data
    }

    fn compress(codec: Codec, threads: usize, data: &[u8], pieces: usize) -> Vec<u8> {
        let mut e = Encoder::with_threads(codec, Vec::new(), threads).unwrap();
        for chunk in data.chunks(data.len() / pieces + 1) {
            e.write_all(chunk).unwrap();
            // A flush between writes, as a BufWriter in front does.
            e.flush().unwrap();
        }
        e.finish().unwrap()
    }

    #[test]
    fn zstd_bytes_do_not_depend_on_threads_or_write_sizes() {
        let data = input();
        let codec = Codec::Zstd { level: 3 };
        let one = compress(codec, 1, &data, 1);
        for (threads, pieces) in [(2, 7), (8, 1000), (1, 3)] {
            assert!(
                compress(codec, threads, &data, pieces) == one,
                "{threads} threads, {pieces} writes: other bytes"
            );
        }
        assert!(one.len() < data.len() / 2);
        assert_eq!(zstd::decode_all(&one[..]).unwrap(), data);
        // The level is part of the bytes.
        assert!(compress(Codec::Zstd { level: 9 }, 2, &data, 1) != one);
    }

    #[test]
    fn gzip_bytes_do_not_depend_on_threads() {
        let data = input();
        let codec = Codec::Gzip { level: 6 };
        let one = compress(codec, 1, &data, 1);
        assert!(compress(codec, 4, &data, 50) == one);
        let mut back = Vec::new();
        io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&one[..]), &mut back).unwrap();
        assert!(back == data);
    }

    #[test]
    fn clients_without_zstd_are_recognised() {
        let types = |s: &str| crate::manifest::accepted_types([s]);
        let docker = "application/vnd.docker.distribution.manifest.v2+json";
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let both = format!("{docker}, {oci}");
        // Docker types only: the OCI-only manifest cannot be served.
        assert!(client_lacks_zstd(&types(docker), "skopeo/1.9"));
        // docker 20.10 reads OCI manifests, but not zstd layers.
        assert!(client_lacks_zstd(
            &types(&both),
            "docker/20.10.24+dfsg1 go/go1.19.8"
        ));
        assert!(!client_lacks_zstd(
            &types(&both),
            "docker/24.0.7 go/go1.20.10"
        ));
        assert!(!client_lacks_zstd(&types(&both), "containerd/1.6.20"));
        assert!(!client_lacks_zstd(&types(oci), ""));
        // Naming no manifest type at all (curl) is not a refusal.
        assert!(!client_lacks_zstd(&types("*/*"), "curl/7.88.1"));
        assert!(!client_lacks_zstd(&[], ""));
    }

    #[test]
    fn names_and_levels_are_checked() {
        assert_eq!(Compression::parse("zstd"), Some(Compression::Zstd));
        assert_eq!(Compression::parse("gzip"), Some(Compression::Gzip));
        assert_eq!(Compression::parse("xz"), None);
        assert!(Codec::Gzip { level: 10 }.check().is_err());
        assert!(Codec::Zstd { level: 0 }.check().is_err());
        assert!(Codec::Zstd { level: 3 }.check().is_ok());
        assert_eq!(Codec::Zstd { level: 3 }.compression().name(), "zstd");
    }
}
