//! Deterministic, streaming layer tarballs.
//!
//! Two kinds of image layer are produced here:
//!
//! * **store layers** ([`write_store_layer`]): the contents of a set of Nix store paths, e.g.
//!   `/nix/store/…-hello-1.0`, under relative names (`nix/store/…-hello-1.0/bin/hello`);
//! * the **symlink layer** ([`write_symlink_layer`]): the image's root filesystem, a symlink forest
//!   of the requested packages (like nixpkgs' `symlinkJoin`) plus a few conveniences (`/tmp`,
//!   `/root`, `/etc/passwd`, `/etc/group`, `/usr/bin/env`).
//!
//! Both are written as one pipeline: tar → sha256 (the `diff_id`) → gzip → sha256 (the blob
//! `digest`) → the caller's sink. Nothing but fixed-size buffers is held in memory, so a layer of
//! any size streams straight into storage.
//!
//! The bytes are a pure function of the file-system contents:
//!
//! * entries are sorted by name, compared component by component (the order of a depth-first walk
//!   that visits each directory's children sorted by their bytes, like `tar --sort=name`), so
//!   neither the order of the input nor `readdir` order matters;
//! * every directory gets its own entry, including the ancestors `nix/` and `nix/store/`;
//! * headers are normalised: uid/gid 0, empty user and group names, mtime 1 (the store's own
//!   mtime), permission bits only (`st_mode & 0o777`); the host's ownership never leaks in;
//! * the gzip header carries no file name, mtime 0 and OS byte 255.
//!
//! One host-dependent input remains on purpose: regular files that are hard links of each other
//! (same device and inode, e.g. after `nix-store --optimise`) are stored once and then as tar
//! hard-link entries. A layer from an optimised store is therefore smaller, and its digest differs
//! from the same paths on an unoptimised store.
//!
//! This module does no network, storage or actor work: it is format logic that reads the local
//! store and writes into any [`std::io::Write`]. Callers run it on a blocking thread.

use std::collections::hash_map::Entry as HashEntry;
use std::collections::{btree_map, BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::compression::{Codec, Encoder};
use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use tar::{EntryType, Header};

/// Size of the read buffer for file contents and of the buffer in front of the hasher and gzip.
/// Large writes keep the per-call overhead of sha256 and deflate negligible.
const BUF_SIZE: usize = 256 * 1024;

/// Nix sets every store path's mtime to 1, so that is what a store layer would carry anyway.
const MTIME: u64 = 1;

const BLOCK: usize = 512;
const ZEROS: [u8; BLOCK] = [0; BLOCK];

/// Written unless a package provides its own. The shell is named even when no package provides
/// `/bin/sh`: tools only read the file to map uids to names, and a missing shell just makes
/// `su`/login fail, which they would without the file too.
const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n\
nobody:x:65534:65534:nobody:/var/empty:/bin/false\n";
const GROUP: &[u8] = b"root:x:0:\nnobody:x:65534:\n";

/// A SHA-256 digest. `Display` gives the OCI form `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `data`, for blobs small enough to hold in memory (configs, manifests).
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_ring(ring::digest::digest(&SHA256, data))
    }

    fn from_ring(d: ring::digest::Digest) -> Digest {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(d.as_ref());
        Digest(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex without the `sha256:` prefix (the form used in storage keys).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Passes bytes through to `W` while computing their SHA-256 and counting them.
///
/// Only bytes that `W` accepted are hashed, so the result always describes exactly what reached
/// `W`, even after a short write.
pub struct HashingWriter<W> {
    inner: W,
    ctx: Context,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> HashingWriter<W> {
        HashingWriter {
            inner,
            ctx: Context::new(&SHA256),
            len: 0,
        }
    }

    pub fn bytes_written(&self) -> u64 {
        self.len
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Returns the inner writer (not flushed), the digest and the byte count.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_ring(self.ctx.finish()), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What the manifest and config need to know about a finished layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSummary {
    /// `sha256:<hex>` of the compressed blob (what was written to the sink).
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// Uncompressed tar size in bytes.
    pub uncompressed_size: u64,
}

/// Facts about the symlink forest that decide the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymlinkLayerInfo {
    /// `bin/env` exists, so `usr/bin/env` was added.
    pub has_env: bool,
    /// `bin/bash` exists (candidate for `Cmd`).
    pub has_bash: bool,
    /// `etc/ssl/certs/ca-bundle.crt` exists (candidate for `SSL_CERT_FILE`).
    pub has_cacert: bool,
    /// Paths (relative, e.g. `bin/foo`) that several packages provide; the first package won.
    /// Sorted, without duplicates.
    pub collisions: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading the store failed (lstat, readdir, readlink, open or read).
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing the entry for `path` failed: the sink, the compressor or the tar encoder (e.g. a
    /// name that tar cannot represent).
    #[error("writing layer entry for {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Flushing the end of the stream into the sink failed.
    #[error("finishing layer stream: {0}")]
    Finish(#[source] io::Error),
    /// An input path is not a plain path strictly below the archive root.
    #[error("{} cannot be archived relative to {}: {reason}", path.display(), root.display())]
    BadPath {
        path: PathBuf,
        root: PathBuf,
        reason: &'static str,
    },
    /// Sockets, FIFOs and device nodes never occur in the Nix store and are refused.
    #[error("{}: unsupported file type ({kind})", path.display())]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{0}")]
    InvalidCodec(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn bytes_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

/// The buffer sits *before* the tar hash so that both hashes and deflate see large writes; the
/// tar encoder itself emits 512-byte headers one by one.
type Pipeline<W> = BufWriter<HashingWriter<Encoder<HashingWriter<W>>>>;

/// A tar stream with normalised headers on top of the hashing/compressing pipeline.
struct LayerWriter<W: Write> {
    tar: tar::Builder<Pipeline<W>>,
    buf: Box<[u8]>,
}

impl<W: Write> LayerWriter<W> {
    fn new(codec: Codec, out: W) -> Result<LayerWriter<W>, ArchiveError> {
        let codec = codec.check().map_err(ArchiveError::InvalidCodec)?;
        // Compressed on every core; the bytes (and so the digest) do not depend on
        // how many there are.
        let compressed =
            Encoder::new(codec, HashingWriter::new(out)).map_err(ArchiveError::Finish)?;
        let pipeline = BufWriter::with_capacity(BUF_SIZE, HashingWriter::new(compressed));
        Ok(LayerWriter {
            tar: tar::Builder::new(pipeline),
            buf: vec![0u8; BUF_SIZE].into_boxed_slice(),
        })
    }

    fn header(ty: EntryType, mode: u32, size: u64) -> Header {
        // GNU headers: long names and link targets become `././@LongLink` records, which the tar
        // crate writes with fixed metadata, so they are deterministic too.
        let mut h = Header::new_gnu();
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    /// `name` must end in `/`, as GNU tar writes directory names.
    fn dir(&mut self, name: &[u8], mode: u32, origin: &Path) -> Result<(), ArchiveError> {
        let mut h = Self::header(EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, bytes_path(name), io::empty())
            .map_err(write_err(origin))
    }

    fn symlink(
        &mut self,
        name: &[u8],
        target: &Path,
        mode: u32,
        origin: &Path,
    ) -> Result<(), ArchiveError> {
        let mut h = Self::header(EntryType::Symlink, mode, 0);
        self.tar
            .append_link(&mut h, bytes_path(name), target)
            .map_err(write_err(origin))
    }

    fn hardlink(
        &mut self,
        name: &[u8],
        first: &[u8],
        mode: u32,
        origin: &Path,
    ) -> Result<(), ArchiveError> {
        let mut h = Self::header(EntryType::Link, mode, 0);
        self.tar
            .append_link(&mut h, bytes_path(name), bytes_path(first))
            .map_err(write_err(origin))
    }

    fn file_bytes(&mut self, name: &[u8], mode: u32, data: &[u8]) -> Result<(), ArchiveError> {
        let mut h = Self::header(EntryType::Regular, mode, data.len() as u64);
        self.tar
            .append_data(&mut h, bytes_path(name), data)
            .map_err(write_err(bytes_path(name)))
    }

    /// Streams a file of `size` bytes from disk.
    fn file_from_disk(
        &mut self,
        name: &[u8],
        src: &Path,
        mode: u32,
        size: u64,
    ) -> Result<(), ArchiveError> {
        let mut file = File::open(src).map_err(io_err(src))?;
        // The tar crate would copy the body through an 8 KiB stack buffer behind `dyn Read`.
        // Appending the header with an empty body (it pads nothing for zero bytes) and copying
        // ourselves keeps reads and writes at BUF_SIZE.
        let mut h = Self::header(EntryType::Regular, mode, size);
        self.tar
            .append_data(&mut h, bytes_path(name), io::empty())
            .map_err(write_err(src))?;
        let sink = self.tar.get_mut();
        let mut remaining = size;
        while remaining > 0 {
            let want = remaining.min(self.buf.len() as u64) as usize;
            let n = match file.read(&mut self.buf[..want]) {
                Ok(0) => {
                    // The header already promised `size` bytes; a shorter file would corrupt
                    // the archive, so the whole layer fails.
                    return Err(ArchiveError::Io {
                        path: src.to_path_buf(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "file shrank while archiving: {remaining} of {size} bytes missing"
                            ),
                        ),
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(src)(e)),
            };
            sink.write_all(&self.buf[..n]).map_err(write_err(src))?;
            remaining -= n as u64;
        }
        let tail = (size % BLOCK as u64) as usize;
        if tail != 0 {
            sink.write_all(&ZEROS[..BLOCK - tail])
                .map_err(write_err(src))?;
        }
        Ok(())
    }

    fn finish(self) -> Result<(W, LayerSummary), ArchiveError> {
        let buffered = self.tar.into_inner().map_err(ArchiveError::Finish)?;
        let tar_hasher = buffered
            .into_inner()
            .map_err(|e| ArchiveError::Finish(e.into_error()))?;
        let (gz, diff_id, uncompressed_size) = tar_hasher.finish();
        let mut gz_hasher = gz.finish().map_err(ArchiveError::Finish)?;
        gz_hasher.flush().map_err(ArchiveError::Finish)?;
        let (out, digest, size) = gz_hasher.finish();
        Ok((
            out,
            LayerSummary {
                digest: digest.to_string(),
                diff_id: diff_id.to_string(),
                size,
                uncompressed_size,
            },
        ))
    }
}

/// Writes a gzip-compressed layer holding `paths` and everything below them into `out`.
///
/// Entry names are the paths relative to `root`; production passes `Path::new("/")`, giving
/// `nix/store/…`. (Tests pass a temporary directory that contains a fake `nix/store`.) Each path
/// must lie strictly below `root` and contain no `.`/`..` components. Duplicates are ignored, as
/// are paths inside another given path. Every ancestor directory between `root` and a path gets
/// an entry with mode 0755; everything from the path down keeps its own permission bits.
/// Symlinks are stored, never followed.
///
/// `codec` is the compression and its level. Returns the sink (flushed) and the layer's digests.
/// On error
/// `out` may already hold part of a stream (the encoders finish on drop): discard it.
pub fn write_store_layer<W: Write>(
    root: &Path,
    paths: &[PathBuf],
    codec: Codec,
    out: W,
) -> Result<(W, LayerSummary), ArchiveError> {
    let mut rels = paths
        .iter()
        .map(|p| relative_to(root, p))
        .collect::<Result<Vec<&Path>, _>>()?;
    // `Path` orders component by component, which is the order the walk below emits entries in;
    // sorting the roots the same way keeps the whole stream sorted.
    rels.sort();
    rels.dedup();

    let mut w = LayerWriter::new(codec, out)?;
    let mut walker = StoreWalker {
        src: PathBuf::new(),
        name: Vec::with_capacity(1024),
        first_names: HashMap::new(),
    };
    let mut ancestors_done: HashSet<&Path> = HashSet::new();
    let mut last_top: Option<&Path> = None;
    for rel in rels {
        if last_top.is_some_and(|top| rel.starts_with(top)) {
            continue;
        }
        let mut ancestors: Vec<&Path> = rel
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .collect();
        ancestors.reverse();
        for a in ancestors {
            if ancestors_done.insert(a) {
                walker.name.clear();
                walker.name.extend_from_slice(a.as_os_str().as_bytes());
                walker.name.push(b'/');
                w.dir(&walker.name, 0o755, a)?;
            }
        }
        walker.src.clear();
        walker.src.push(root);
        walker.src.push(rel);
        walker.name.clear();
        walker.name.extend_from_slice(rel.as_os_str().as_bytes());
        walker.entry(&mut w)?;
        last_top = Some(rel);
    }
    w.finish()
}

fn relative_to<'a>(root: &Path, path: &'a Path) -> Result<&'a Path, ArchiveError> {
    let bad = |reason| ArchiveError::BadPath {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
        reason,
    };
    let rel = path
        .strip_prefix(root)
        .map_err(|_| bad("not below the root"))?;
    if rel.as_os_str().is_empty() {
        return Err(bad("is the root itself"));
    }
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("contains `.`, `..` or a prefix"));
    }
    Ok(rel)
}

/// Walks one store path depth-first. `src` (absolute) and `name` (entry name) are grown and
/// shrunk in place so that the walk allocates only the per-directory child lists.
struct StoreWalker {
    src: PathBuf,
    name: Vec<u8>,
    /// (dev, inode) → name of the first entry, for files with more than one link.
    first_names: HashMap<(u64, u64), Vec<u8>>,
}

impl StoreWalker {
    fn entry<W: Write>(&mut self, w: &mut LayerWriter<W>) -> Result<(), ArchiveError> {
        let meta = fs::symlink_metadata(&self.src).map_err(io_err(&self.src))?;
        let ft = meta.file_type();
        let mode = meta.mode() & 0o777;
        if ft.is_dir() {
            self.name.push(b'/');
            w.dir(&self.name, mode, &self.src)?;
            self.name.pop();
            let mut children = fs::read_dir(&self.src)
                .and_then(|rd| {
                    rd.map(|e| e.map(|e| e.file_name()))
                        .collect::<Result<Vec<OsString>, _>>()
                })
                .map_err(io_err(&self.src))?;
            children.sort_unstable();
            for child in &children {
                let name_len = self.name.len();
                self.name.push(b'/');
                self.name.extend_from_slice(child.as_bytes());
                self.src.push(child);
                let result = self.entry(w);
                self.src.pop();
                self.name.truncate(name_len);
                result?;
            }
            Ok(())
        } else if ft.is_symlink() {
            let target = fs::read_link(&self.src).map_err(io_err(&self.src))?;
            w.symlink(&self.name, &target, mode, &self.src)
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                match self.first_names.entry((meta.dev(), meta.ino())) {
                    HashEntry::Occupied(first) => {
                        return w.hardlink(&self.name, first.get(), mode, &self.src);
                    }
                    HashEntry::Vacant(slot) => {
                        slot.insert(self.name.clone());
                    }
                }
            }
            w.file_from_disk(&self.name, &self.src, mode, meta.len())
        } else {
            Err(ArchiveError::Unsupported {
                path: self.src.clone(),
                kind: "not a regular file, directory or symlink",
            })
        }
    }
}

/// A node of the symlink forest. Children are kept in a `BTreeMap` so the tar comes out sorted.
enum Node {
    Dir {
        mode: u32,
        children: BTreeMap<OsString, Node>,
    },
    /// Leaf symlink with an absolute target in the store.
    Link(PathBuf),
    File {
        mode: u32,
        data: &'static [u8],
    },
}

impl Node {
    fn dir(mode: u32) -> Node {
        Node::Dir {
            mode,
            children: BTreeMap::new(),
        }
    }
}

/// What a forest path resolves to.
enum Found {
    Dir,
    /// A symlink (or a file reached through a symlinked directory) with its absolute target.
    Link(PathBuf),
    File,
}

/// Writes the gzip-compressed symlink layer for `packages` (store output directories, in
/// priority order: on a collision the earlier package wins) into `out`.
///
/// Like `symlinkJoin`, every directory of every package becomes a real directory (mode 0755) and
/// every other entry a symlink to its absolute store path; a store symlink to a directory is a
/// leaf too and is not followed. A package path that is not a directory (after following a
/// symlink at the package path itself) contributes nothing. Added unless a package provides them:
/// `tmp/` (mode 1777, also forced on a package-provided `tmp/`), `root/` (0700), `etc/passwd` and
/// `etc/group` for root and nobody (root's shell is `/bin/sh` even when no package provides it),
/// and `usr/bin/env` pointing at the same target as `bin/env`, only if `bin/env` exists.
///
/// Returns the sink (flushed), the layer's digests, and facts for the image config. The forest is
/// built before anything is written, so a failure while reading packages leaves `out` untouched;
/// a later write error may leave a partial stream in it.
pub fn write_symlink_layer<W: Write>(
    packages: &[PathBuf],
    codec: Codec,
    out: W,
) -> Result<(W, LayerSummary, SymlinkLayerInfo), ArchiveError> {
    let codec = codec.check().map_err(ArchiveError::InvalidCodec)?;
    let mut root: BTreeMap<OsString, Node> = BTreeMap::new();
    let mut collisions = Vec::new();
    for pkg in packages {
        let meta = fs::metadata(pkg).map_err(io_err(pkg))?;
        if !meta.is_dir() {
            continue;
        }
        let mut src = pkg.clone();
        let mut rel = PathBuf::new();
        merge_dir(&mut root, &mut src, &mut rel, &mut collisions)?;
    }
    collisions.sort();
    collisions.dedup();

    let env_target = match resolve(&root, &["bin", "env"]) {
        Some(Found::Link(target)) => Some(target),
        _ => None,
    };
    let is_leaf = |found: Option<Found>| matches!(found, Some(Found::Link(_) | Found::File));
    let info = SymlinkLayerInfo {
        has_env: env_target.is_some(),
        has_bash: is_leaf(resolve(&root, &["bin", "bash"])),
        has_cacert: is_leaf(resolve(&root, &["etc", "ssl", "certs", "ca-bundle.crt"])),
        collisions,
    };

    if let Some(target) = env_target {
        if let Some(usr_bin) = ensure_dir(&mut root, &["usr", "bin"]) {
            usr_bin.entry("env".into()).or_insert(Node::Link(target));
        }
    }
    if let Some(etc) = ensure_dir(&mut root, &["etc"]) {
        etc.entry("passwd".into()).or_insert(Node::File {
            mode: 0o644,
            data: PASSWD,
        });
        etc.entry("group".into()).or_insert(Node::File {
            mode: 0o644,
            data: GROUP,
        });
    }
    match root.entry("tmp".into()) {
        btree_map::Entry::Vacant(slot) => {
            slot.insert(Node::dir(0o1777));
        }
        btree_map::Entry::Occupied(mut node) => {
            if let Node::Dir { mode, .. } = node.get_mut() {
                *mode = 0o1777;
            }
        }
    }
    root.entry("root".into()).or_insert(Node::dir(0o700));

    let mut w = LayerWriter::new(codec, out)?;
    let mut name = Vec::with_capacity(256);
    emit_forest(&mut w, &root, &mut name)?;
    let (out, summary) = w.finish()?;
    Ok((out, summary, info))
}

fn merge_dir(
    into: &mut BTreeMap<OsString, Node>,
    src: &mut PathBuf,
    rel: &mut PathBuf,
    collisions: &mut Vec<String>,
) -> Result<(), ArchiveError> {
    let mut children = fs::read_dir(&*src)
        .and_then(|rd| {
            rd.map(|e| e.map(|e| e.file_name()))
                .collect::<Result<Vec<OsString>, _>>()
        })
        .map_err(io_err(src))?;
    // Within one directory names are unique, so the order only fixes the order of `collisions`
    // before they are sorted; sorting keeps even error reporting deterministic.
    children.sort_unstable();
    for child in children {
        src.push(&child);
        rel.push(&child);
        let result = merge_entry(into, child, src, rel, collisions);
        src.pop();
        rel.pop();
        result?;
    }
    Ok(())
}

fn merge_entry(
    into: &mut BTreeMap<OsString, Node>,
    child: OsString,
    src: &mut PathBuf,
    rel: &mut PathBuf,
    collisions: &mut Vec<String>,
) -> Result<(), ArchiveError> {
    let is_dir = fs::symlink_metadata(&*src)
        .map_err(io_err(src))?
        .file_type()
        .is_dir();
    match into.entry(child) {
        btree_map::Entry::Vacant(slot) => {
            if is_dir {
                if let Node::Dir { children, .. } = slot.insert(Node::dir(0o755)) {
                    merge_dir(children, src, rel, collisions)?;
                }
            } else {
                slot.insert(Node::Link(src.clone()));
            }
        }
        btree_map::Entry::Occupied(mut slot) => match (slot.get_mut(), is_dir) {
            (Node::Dir { children, .. }, true) => merge_dir(children, src, rel, collisions)?,
            _ => collisions.push(rel.to_string_lossy().into_owned()),
        },
    }
    Ok(())
}

/// Looks `path` up in the forest; below a leaf symlink the store itself is consulted, so a
/// package that ships e.g. `etc/ssl` as a symlink still counts.
fn resolve(root: &BTreeMap<OsString, Node>, path: &[&str]) -> Option<Found> {
    let mut map = root;
    for (i, comp) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        match map.get(OsStr::new(comp))? {
            Node::Dir { children, .. } => {
                if last {
                    return Some(Found::Dir);
                }
                map = children;
            }
            Node::Link(target) => {
                if last {
                    return Some(Found::Link(target.clone()));
                }
                let mut full = target.clone();
                full.extend(&path[i + 1..]);
                let meta = fs::metadata(&full).ok()?;
                return Some(if meta.is_dir() {
                    Found::Dir
                } else {
                    Found::Link(full)
                });
            }
            Node::File { .. } => return last.then_some(Found::File),
        }
    }
    None
}

/// Returns the children of the directory at `path`, creating missing directories (0755), or
/// `None` if a package put a non-directory in the way.
fn ensure_dir<'a>(
    root: &'a mut BTreeMap<OsString, Node>,
    path: &[&str],
) -> Option<&'a mut BTreeMap<OsString, Node>> {
    let mut map = root;
    for comp in path {
        match map
            .entry(OsString::from(comp))
            .or_insert_with(|| Node::dir(0o755))
        {
            Node::Dir { children, .. } => map = children,
            _ => return None,
        }
    }
    Some(map)
}

fn emit_forest<W: Write>(
    w: &mut LayerWriter<W>,
    map: &BTreeMap<OsString, Node>,
    name: &mut Vec<u8>,
) -> Result<(), ArchiveError> {
    for (child, node) in map {
        let name_len = name.len();
        if !name.is_empty() {
            name.push(b'/');
        }
        name.extend_from_slice(child.as_bytes());
        match node {
            Node::Dir { mode, children } => {
                name.push(b'/');
                w.dir(name, *mode, bytes_path(name))?;
                name.pop();
                emit_forest(w, children, name)?;
            }
            Node::Link(target) => w.symlink(name, target, 0o777, bytes_path(name))?,
            Node::File { mode, data } => w.file_bytes(name, *mode, data)?,
        }
        name.truncate(name_len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::time::Instant;
    use tempfile::TempDir;

    /// One tar entry, read back.
    #[derive(Debug, Clone, PartialEq)]
    struct Ent {
        name: String,
        ty: EntryType,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
        user: Vec<u8>,
        group: Vec<u8>,
        link: Option<String>,
        data: Vec<u8>,
    }

    fn sha(data: &[u8]) -> String {
        Digest::of(data).to_string()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut tar = Vec::new();
        GzDecoder::new(gz).read_to_end(&mut tar).unwrap();
        tar
    }

    fn entries(tar: &[u8]) -> Vec<Ent> {
        let mut ar = tar::Archive::new(tar);
        let mut out = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let link = e
                .link_name_bytes()
                .map(|l| String::from_utf8(l.into_owned()).unwrap());
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push(Ent {
                name,
                ty: h.entry_type(),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                user: h.username_bytes().unwrap_or_default().to_vec(),
                group: h.groupname_bytes().unwrap_or_default().to_vec(),
                link,
                data,
            });
        }
        out
    }

    fn find<'a>(ents: &'a [Ent], name: &str) -> &'a Ent {
        ents.iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no entry {name} in {:?}", names(ents)))
    }

    fn names(ents: &[Ent]) -> Vec<&str> {
        ents.iter().map(|e| e.name.as_str()).collect()
    }

    fn write(path: &Path, data: &[u8], mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A fake store under `<tmp>/nix/store` with two packages exercising every entry kind.
    struct Store {
        dir: TempDir,
        hello: PathBuf,
        lib: PathBuf,
    }

    const LONG: &str = "a-very-long-directory-name-that-pushes-the-entry-name-well-past-the-one-hundred-byte-ustar-limit";

    fn store() -> Store {
        let dir = TempDir::new().unwrap();
        let s = dir.path().join("nix/store");
        let hello = s.join("0c8d9s1b6nxyfzppa6xwkxz6hfbqzgm6-hello-2.12");
        let lib = s.join("1qd2ymd5lz0b4vsbhyj4q1sqblxwgqwz-libfoo-1.0");
        write(&hello.join("bin/hello"), b"#!/bin/sh\necho hello\n", 0o555);
        write(&hello.join("share/doc/README"), b"readme\n", 0o444);
        // Both hard-linked names sort after bin/hello, so the first one is deterministic.
        fs::hard_link(hello.join("bin/hello"), hello.join("share/doc/hello-copy")).unwrap();
        symlink("hello", hello.join("bin/hi")).unwrap();
        // A symlink to a directory must stay a symlink.
        symlink("../share", hello.join("bin/share-link")).unwrap();
        let deep = hello.join(format!("share/{LONG}/{LONG}/{LONG}"));
        write(&deep.join("file.txt"), b"deep\n", 0o444);
        symlink(deep.join("file.txt"), hello.join("share/long-target")).unwrap();
        fs::set_permissions(hello.join("share/doc"), fs::Permissions::from_mode(0o750)).unwrap();
        // Spans several read buffers and does not end on a block boundary.
        let big: Vec<u8> = (0..(BUF_SIZE * 2 + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        write(&lib.join("lib/libfoo.so"), &big, 0o555);
        Store { dir, hello, lib }
    }

    fn store_layer(root: &Path, paths: &[PathBuf], level: u32) -> (Vec<u8>, LayerSummary) {
        write_store_layer(root, paths, Codec::Gzip { level }, Vec::new()).unwrap()
    }

    /// Component-wise order, which is what "sorted by name" means for the stream.
    fn assert_sorted(ents: &[Ent]) {
        for pair in ents.windows(2) {
            let (a, b) = (Path::new(&pair[0].name), Path::new(&pair[1].name));
            assert!(a < b, "{a:?} should sort before {b:?}");
        }
    }

    #[test]
    fn hashing_writer_reports_digest_and_length() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        assert_eq!(w.bytes_written(), 11);
        let (inner, digest, len) = w.finish();
        assert_eq!(inner, b"hello world");
        assert_eq!(len, 11);
        assert_eq!(
            digest.to_string(),
            "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(digest.hex().len(), 64);
    }

    #[test]
    fn store_layer_is_deterministic_and_order_independent() {
        let st = store();
        let root = st.dir.path();
        let (a, sa) = store_layer(root, &[st.hello.clone(), st.lib.clone()], 6);
        let (b, sb) = store_layer(root, &[st.hello.clone(), st.lib.clone()], 6);
        let (c, sc) = store_layer(root, &[st.lib.clone(), st.hello.clone(), st.lib.clone()], 6);
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(sa, sb);
        assert_eq!(sa, sc);
    }

    #[test]
    fn store_layer_digests_match_bytes() {
        let st = store();
        let (gz, s) = store_layer(st.dir.path(), &[st.hello.clone(), st.lib.clone()], 1);
        assert_eq!(s.digest, sha(&gz));
        assert_eq!(s.size, gz.len() as u64);
        let tar = gunzip(&gz);
        assert_eq!(s.diff_id, sha(&tar));
        assert_eq!(s.uncompressed_size, tar.len() as u64);
        assert_eq!(tar.len() % BLOCK, 0);
        // gzip header: deflate, no flags (no file name), mtime 0, OS unknown.
        assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        assert_eq!(gz[9], 255);
    }

    #[test]
    fn store_layer_entries_are_normalised_and_complete() {
        let st = store();
        let (gz, _) = store_layer(st.dir.path(), &[st.lib.clone(), st.hello.clone()], 6);
        let ents = entries(&gunzip(&gz));
        assert_sorted(&ents);
        for e in &ents {
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 1), "{}", e.name);
            assert!(e.user.is_empty() && e.group.is_empty(), "{}", e.name);
            assert!(!e.name.starts_with('/'), "{}", e.name);
        }
        let hello = "nix/store/0c8d9s1b6nxyfzppa6xwkxz6hfbqzgm6-hello-2.12";
        let n = names(&ents);
        assert_eq!(
            &n[..3],
            &["nix/", "nix/store/", &format!("{hello}/") as &str]
        );
        for anc in ["nix/", "nix/store/"] {
            let e = find(&ents, anc);
            assert_eq!((e.ty, e.mode), (EntryType::Directory, 0o755));
        }
        let e = find(&ents, &format!("{hello}/bin/hello"));
        assert_eq!((e.ty, e.mode), (EntryType::Regular, 0o555));
        assert_eq!(e.data, b"#!/bin/sh\necho hello\n");
        let e = find(&ents, &format!("{hello}/share/doc/"));
        assert_eq!((e.ty, e.mode), (EntryType::Directory, 0o750));
        let e = find(&ents, &format!("{hello}/share/doc/README"));
        assert_eq!((e.ty, e.mode), (EntryType::Regular, 0o444));
        // Every directory inside has its own entry, long names included.
        let deep = format!("{hello}/share/{LONG}/{LONG}/{LONG}");
        for d in [
            format!("{hello}/bin/"),
            format!("{hello}/share/"),
            format!("{hello}/share/{LONG}/"),
            format!("{deep}/"),
        ] {
            assert_eq!(find(&ents, &d).ty, EntryType::Directory);
        }
        assert!(deep.len() > 300);
        assert_eq!(find(&ents, &format!("{deep}/file.txt")).data, b"deep\n");
        let e = find(&ents, &format!("{hello}/share/long-target"));
        assert_eq!(e.ty, EntryType::Symlink);
        assert_eq!(
            e.link.as_deref(),
            Some(
                st.hello
                    .join(format!("share/{LONG}/{LONG}/{LONG}/file.txt"))
                    .to_str()
                    .unwrap()
            )
        );
        let big = find(
            &ents,
            "nix/store/1qd2ymd5lz0b4vsbhyj4q1sqblxwgqwz-libfoo-1.0/lib/libfoo.so",
        );
        assert_eq!(big.data, fs::read(st.lib.join("lib/libfoo.so")).unwrap());
        // `nix/` and `nix/store/` appear once although both packages share them.
        assert_eq!(n.iter().filter(|x| **x == "nix/store/").count(), 1);
    }

    #[test]
    fn store_layer_keeps_symlinks_and_hard_links() {
        let st = store();
        let (gz, _) = store_layer(st.dir.path(), std::slice::from_ref(&st.hello), 6);
        let ents = entries(&gunzip(&gz));
        let hello = "nix/store/0c8d9s1b6nxyfzppa6xwkxz6hfbqzgm6-hello-2.12";
        let e = find(&ents, &format!("{hello}/bin/hi"));
        assert_eq!(
            (e.ty, e.link.as_deref()),
            (EntryType::Symlink, Some("hello"))
        );
        let e = find(&ents, &format!("{hello}/bin/share-link"));
        assert_eq!(
            (e.ty, e.link.as_deref()),
            (EntryType::Symlink, Some("../share"))
        );
        assert!(!ents
            .iter()
            .any(|e| e.name.starts_with(&format!("{hello}/bin/share-link/"))));
        let first = find(&ents, &format!("{hello}/bin/hello"));
        assert_eq!(first.ty, EntryType::Regular);
        let second = find(&ents, &format!("{hello}/share/doc/hello-copy"));
        assert_eq!(second.ty, EntryType::Link);
        assert_eq!(
            second.link.as_deref(),
            Some(&format!("{hello}/bin/hello") as &str)
        );
        assert!(second.data.is_empty());
    }

    #[test]
    fn store_layer_extracts_with_tar_crate() {
        let st = store();
        let (gz, _) = store_layer(st.dir.path(), &[st.hello.clone(), st.lib.clone()], 6);
        let dest = TempDir::new().unwrap();
        tar::Archive::new(GzDecoder::new(&gz[..]))
            .unpack(dest.path())
            .unwrap();
        let rel = st.hello.strip_prefix(st.dir.path()).unwrap();
        let out = dest.path().join(rel);
        assert_eq!(
            fs::read(out.join("share/doc/hello-copy")).unwrap(),
            fs::read(out.join("bin/hello")).unwrap()
        );
        let a = fs::metadata(out.join("share/doc/hello-copy")).unwrap();
        let b = fs::metadata(out.join("bin/hello")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(
            fs::read_link(out.join("bin/hi")).unwrap(),
            Path::new("hello")
        );
    }

    #[test]
    fn store_layer_rejects_bad_input() {
        let st = store();
        let root = st.dir.path();
        let err = write_store_layer(
            root,
            &[PathBuf::from("/elsewhere")],
            Codec::Gzip { level: 6 },
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(err, ArchiveError::BadPath { .. }), "{err}");
        let err = write_store_layer(
            root,
            &[root.join("nix/../x")],
            Codec::Gzip { level: 6 },
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(err, ArchiveError::BadPath { .. }), "{err}");
        let missing = root.join("nix/store/missing");
        match write_store_layer(
            root,
            std::slice::from_ref(&missing),
            Codec::Gzip { level: 6 },
            Vec::new(),
        ) {
            Err(ArchiveError::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("{other:?}"),
        }
        let err = write_store_layer(
            root,
            std::slice::from_ref(&st.hello),
            Codec::Gzip { level: 10 },
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(err, ArchiveError::InvalidCodec(_)), "{err}");
    }

    #[test]
    fn store_layer_of_nothing_is_an_empty_tar() {
        let dir = TempDir::new().unwrap();
        let (gz, s) = store_layer(dir.path(), &[], 6);
        assert_eq!(gunzip(&gz), vec![0u8; 1024]);
        assert_eq!(s.uncompressed_size, 1024);
    }

    /// Packages for the symlink layer: `a` and `b` share `bin/` and collide on `bin/tool`.
    fn packages(with_env: bool) -> (TempDir, Vec<PathBuf>) {
        let dir = TempDir::new().unwrap();
        let s = dir.path().join("nix/store");
        let a = s.join("aaaa-a-1.0");
        let b = s.join("bbbb-b-1.0");
        let cacert = s.join("cccc-nss-cacert");
        write(&a.join("bin/alpha"), b"a", 0o555);
        write(&a.join("bin/tool"), b"from a", 0o555);
        write(&a.join("share/man/man1/alpha.1"), b"man", 0o444);
        write(&b.join("bin/beta"), b"b", 0o555);
        write(&b.join("bin/tool"), b"from b", 0o555);
        write(&b.join("bin/bash"), b"bash", 0o555);
        write(&b.join("share/man/man1/beta.1"), b"man", 0o444);
        // File in `a`, directory in `b`: `a` wins.
        write(&a.join("lib"), b"not a dir", 0o444);
        write(&b.join("lib/libb.so"), b"so", 0o444);
        // A symlink to a directory is a leaf.
        write(&b.join("real/x"), b"x", 0o444);
        symlink(b.join("real"), b.join("linked")).unwrap();
        if with_env {
            write(&b.join("bin/env"), b"env", 0o555);
        }
        write(&cacert.join("etc/ssl/certs/ca-bundle.crt"), b"certs", 0o444);
        let file_pkg = s.join("dddd-just-a-file.patch");
        write(&file_pkg, b"patch", 0o444);
        (dir, vec![a, b, cacert, file_pkg])
    }

    fn symlink_layer(pkgs: &[PathBuf]) -> (Vec<u8>, LayerSummary, SymlinkLayerInfo, Vec<Ent>) {
        let (gz, s, info) =
            write_symlink_layer(pkgs, Codec::Gzip { level: 6 }, Vec::new()).unwrap();
        let tar = gunzip(&gz);
        assert_eq!(s.digest, sha(&gz));
        assert_eq!(s.diff_id, sha(&tar));
        assert_eq!(s.size, gz.len() as u64);
        let ents = entries(&tar);
        (gz, s, info, ents)
    }

    #[test]
    fn symlink_layer_merges_and_first_package_wins() {
        let (_dir, pkgs) = packages(false);
        let (_, _, info, ents) = symlink_layer(&pkgs);
        assert_sorted(&ents);
        let (a, b) = (&pkgs[0], &pkgs[1]);
        let link = |name: &str| {
            let e = find(&ents, name);
            assert_eq!((e.ty, e.mode), (EntryType::Symlink, 0o777), "{name}");
            PathBuf::from(e.link.clone().unwrap())
        };
        assert_eq!(find(&ents, "bin/").ty, EntryType::Directory);
        assert_eq!(find(&ents, "bin/").mode, 0o755);
        assert_eq!(link("bin/alpha"), a.join("bin/alpha"));
        assert_eq!(link("bin/beta"), b.join("bin/beta"));
        assert_eq!(link("bin/tool"), a.join("bin/tool"));
        assert_eq!(
            link("share/man/man1/alpha.1"),
            a.join("share/man/man1/alpha.1")
        );
        assert_eq!(
            link("share/man/man1/beta.1"),
            b.join("share/man/man1/beta.1")
        );
        assert_eq!(link("lib"), a.join("lib"));
        assert_eq!(link("linked"), b.join("linked"));
        assert!(!names(&ents).iter().any(|n| n.starts_with("linked/")));
        assert_eq!(
            link("etc/ssl/certs/ca-bundle.crt"),
            pkgs[2].join("etc/ssl/certs/ca-bundle.crt")
        );
        assert!(!names(&ents).iter().any(|n| n.contains("patch")));
        assert_eq!(
            info.collisions,
            vec!["bin/tool".to_string(), "lib".to_string()]
        );
        assert!(info.has_bash && info.has_cacert && !info.has_env);
        for e in &ents {
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 1), "{}", e.name);
            assert!(e.user.is_empty() && e.group.is_empty());
        }
    }

    #[test]
    fn symlink_layer_adds_system_files() {
        let (_dir, pkgs) = packages(false);
        let (_, _, _, ents) = symlink_layer(&pkgs);
        let tmp = find(&ents, "tmp/");
        assert_eq!((tmp.ty, tmp.mode), (EntryType::Directory, 0o1777));
        let root = find(&ents, "root/");
        assert_eq!((root.ty, root.mode), (EntryType::Directory, 0o700));
        let passwd = find(&ents, "etc/passwd");
        assert_eq!((passwd.ty, passwd.mode), (EntryType::Regular, 0o644));
        assert_eq!(passwd.data, PASSWD);
        assert!(String::from_utf8_lossy(&passwd.data).starts_with("root:x:0:0:"));
        assert_eq!(find(&ents, "etc/group").data, GROUP);
        assert!(!names(&ents).iter().any(|n| n.starts_with("usr")));
    }

    #[test]
    fn symlink_layer_usr_bin_env_only_with_bin_env() {
        let (_dir, pkgs) = packages(true);
        let (_, _, info, ents) = symlink_layer(&pkgs);
        assert!(info.has_env);
        let env = find(&ents, "usr/bin/env");
        assert_eq!(env.ty, EntryType::Symlink);
        assert_eq!(
            PathBuf::from(env.link.clone().unwrap()),
            pkgs[1].join("bin/env")
        );
        assert_eq!(find(&ents, "bin/env").link, env.link);
        assert_eq!(find(&ents, "usr/").mode, 0o755);
    }

    #[test]
    fn symlink_layer_keeps_package_passwd() {
        let (_dir, mut pkgs) = packages(false);
        let users = pkgs[0].parent().unwrap().join("eeee-users");
        write(&users.join("etc/passwd"), b"custom\n", 0o444);
        pkgs.push(users.clone());
        let (_, _, _, ents) = symlink_layer(&pkgs);
        let e = find(&ents, "etc/passwd");
        assert_eq!(e.ty, EntryType::Symlink);
        assert_eq!(
            PathBuf::from(e.link.clone().unwrap()),
            users.join("etc/passwd")
        );
        assert_eq!(find(&ents, "etc/group").data, GROUP);
    }

    #[test]
    fn symlink_layer_is_deterministic() {
        let (_dir, pkgs) = packages(true);
        let (a, sa, ia, _) = symlink_layer(&pkgs);
        let (b, sb, ib, _) = symlink_layer(&pkgs);
        assert_eq!((a, sa, ia), (b, sb, ib));
    }

    #[test]
    fn symlink_layer_of_no_packages_has_only_system_files() {
        let (_, _, info, ents) = symlink_layer(&[]);
        assert_eq!(
            names(&ents),
            ["etc/", "etc/group", "etc/passwd", "root/", "tmp/"]
        );
        assert_eq!(info, SymlinkLayerInfo::default());
    }

    #[test]
    fn symlink_layer_missing_package_is_an_error() {
        let missing = PathBuf::from("/nonexistent/nix/store/xxxx-gone");
        let mut out = Vec::new();
        match write_symlink_layer(
            std::slice::from_ref(&missing),
            Codec::Gzip { level: 6 },
            &mut out,
        ) {
            Err(ArchiveError::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("{:?}", other.map(|(_, s, i)| (s, i))),
        }
        assert!(
            out.is_empty(),
            "nothing is written before the forest is complete"
        );
    }

    /// Throughput over a real tree: `NIXERY_ARCHIVE_BENCH_DIR=/usr/lib/gcc cargo test --release
    /// --lib archive::tests::throughput -- --ignored --nocapture` (optionally
    /// `NIXERY_ARCHIVE_BENCH_LEVELS=1,6`).
    #[test]
    #[ignore]
    fn throughput() {
        let Some(dir) = std::env::var_os("NIXERY_ARCHIVE_BENCH_DIR") else {
            eprintln!("set NIXERY_ARCHIVE_BENCH_DIR to a directory to measure");
            return;
        };
        let levels = std::env::var("NIXERY_ARCHIVE_BENCH_LEVELS").unwrap_or_else(|_| "1,6".into());
        let paths = [PathBuf::from(dir)];
        for level in levels.split(',').map(|l| l.trim().parse::<u32>().unwrap()) {
            let start = Instant::now();
            let (_, s) =
                write_store_layer(Path::new("/"), &paths, Codec::Gzip { level }, io::sink())
                    .unwrap();
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "level {level}: {:.1} MB tar -> {:.1} MB gz in {secs:.2} s = {:.1} MB/s (tar input)",
                s.uncompressed_size as f64 / 1e6,
                s.size as f64 / 1e6,
                s.uncompressed_size as f64 / 1e6 / secs
            );
        }
    }
}
