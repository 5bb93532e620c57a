//! The `nix-store --serve` protocol, as far as the registry speaks it: the greeting,
//! a validity query, a closure query and a path-info query, over any reader and
//! writer.
//!
//! A long-lived such process answers closure queries one after another, where each
//! query used to start two Nix processes (`--query --requisites`, then
//! `--dump-db`): a Nix process spends about 30 ms linking its libraries before it
//! does anything, which was most of a query's time and, on a busy registry, of its
//! CPU.
//!
//! The wire format is Nix's: little-endian 64-bit integers, strings as a length and
//! the bytes padded with zeros to 8, sets as a count and their strings. The
//! registry announces protocol 2.5, so the answers have the fields that version
//! defines (2.4 added a path's NAR hash); Nix 2.8 itself speaks 2.7.

use crate::layers::StorePathInfo;
use std::io::{self, Read, Write};

const MAGIC_1: u64 = 0x390c_9deb;
const MAGIC_2: u64 = 0x5452_eecb;
/// What the registry says it speaks: 2.5, so the server sends NAR hashes (2.4 and
/// later) and nothing newer is assumed of it.
const CLIENT_VERSION: u64 = 0x205;
const QUERY_VALID_PATHS: u64 = 1;
const QUERY_PATH_INFOS: u64 = 2;
const QUERY_CLOSURE: u64 = 7;
/// No store path or hash is anywhere near this; a longer string means the stream
/// is not what it should be, and it is not read into memory.
const MAX_STRING: u64 = 1 << 20;
/// Nor has any closure this many paths or references.
const MAX_COUNT: u64 = 1 << 22;

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn write_u64(w: &mut impl Write, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    write_u64(w, s.len() as u64)?;
    w.write_all(s.as_bytes())?;
    w.write_all(&[0; 8][..(8 - s.len() % 8) % 8])
}

fn write_strs(w: &mut impl Write, items: &[String]) -> io::Result<()> {
    write_u64(w, items.len() as u64)?;
    items.iter().try_for_each(|s| write_str(w, s))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_str(r: &mut impl Read) -> io::Result<String> {
    let len = read_u64(r)?;
    if len > MAX_STRING {
        return Err(bad(format!("a string of {len} bytes")));
    }
    let mut b = vec![0; (len as usize).div_ceil(8) * 8];
    r.read_exact(&mut b)?;
    b.truncate(len as usize);
    String::from_utf8(b).map_err(|_| bad("a string that is not UTF-8"))
}

fn read_strs(r: &mut impl Read) -> io::Result<Vec<String>> {
    let n = read_u64(r)?;
    if n > MAX_COUNT {
        return Err(bad(format!("a list of {n} strings")));
    }
    (0..n).map(|_| read_str(r)).collect()
}

/// Sends the greeting; the answer is read by [`read_greeting`].
pub fn write_greeting(w: &mut impl Write) -> io::Result<()> {
    write_u64(w, MAGIC_1)?;
    w.flush()
}

/// Reads the server's greeting and says which version the registry speaks. Errs
/// on anything but protocol 2.4 or later, which sends NAR hashes.
pub fn read_greeting(r: &mut impl Read, w: &mut impl Write) -> io::Result<()> {
    let magic = read_u64(r)?;
    if magic != MAGIC_2 {
        return Err(bad(format!("greeting {magic:#x}, not a nix-store --serve")));
    }
    let version = read_u64(r)?;
    if version & 0xff00 != 0x200 || version & 0xff < 4 {
        return Err(bad(format!(
            "serve protocol {version:#x}; 0x204 or later 0x2xx is needed"
        )));
    }
    write_u64(w, CLIENT_VERSION)?;
    w.flush()
}

/// A query: its command, its flags, then `paths`.
fn write_query(
    w: &mut impl Write,
    command: u64,
    flags: &[u64],
    paths: &[String],
) -> io::Result<()> {
    write_u64(w, command)?;
    flags.iter().try_for_each(|&f| write_u64(w, f))?;
    write_strs(w, paths)?;
    w.flush()
}

/// Asks which of `paths` are valid (registered), without locking or substituting
/// them. A closure query for a path that is not valid ends the session, as Nix's
/// `--serve` stops at its first error; this one only leaves it out of the answer.
pub fn write_valid_paths_query(w: &mut impl Write, paths: &[String]) -> io::Result<()> {
    write_query(w, QUERY_VALID_PATHS, &[0, 0], paths)
}

/// Asks for the runtime closure of `paths` (their outputs not included).
pub fn write_closure_query(w: &mut impl Write, paths: &[String]) -> io::Result<()> {
    write_query(w, QUERY_CLOSURE, &[0], paths)
}

/// The answer to a validity or a closure query: a set of paths.
pub fn read_paths(r: &mut impl Read) -> io::Result<Vec<String>> {
    read_strs(r)
}

/// Asks for the registration of each of `paths`.
pub fn write_path_info_query(w: &mut impl Write, paths: &[String]) -> io::Result<()> {
    write_query(w, QUERY_PATH_INFOS, &[], paths)
}

/// The answer to a path-info query: one entry per valid path (an invalid one is
/// left out), ended by an empty path.
pub fn read_path_infos(r: &mut impl Read) -> io::Result<Vec<StorePathInfo>> {
    let mut out = Vec::new();
    loop {
        let path = read_str(r)?;
        if path.is_empty() {
            return Ok(out);
        }
        let deriver = read_str(r)?;
        let references = read_strs(r)?;
        let _download_size = read_u64(r)?;
        let nar_size = read_u64(r)?;
        let nar_hash = read_str(r)?;
        let _content_address = read_str(r)?;
        let _signatures = read_strs(r)?;
        out.push(StorePathInfo {
            path,
            nar_size,
            references,
            nar_hash,
            deriver,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// The greeting of Nix 2.8's `nix-store --serve` (protocol 0x207).
    fn server_greeting() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(0x5452_eecbu64.to_le_bytes());
        b.extend(0x207u64.to_le_bytes());
        b
    }

    #[test]
    fn strings_are_padded_to_eight_bytes() {
        let mut b = Vec::new();
        write_str(&mut b, "/nix/store/abc").unwrap(); // 14 bytes
        assert_eq!(b.len(), 8 + 16);
        assert_eq!(&b[..8], &14u64.to_le_bytes());
        assert_eq!(&b[22..], &[0, 0]);
        let mut b = Vec::new();
        write_str(&mut b, "12345678").unwrap();
        assert_eq!(b.len(), 16, "no padding when the length is a multiple of 8");
        assert_eq!(read_str(&mut Cursor::new(b)).unwrap(), "12345678");
    }

    #[test]
    fn the_greeting_says_which_version_the_registry_speaks() {
        let mut sent = Vec::new();
        write_greeting(&mut sent).unwrap();
        assert_eq!(sent, 0x390c_9debu64.to_le_bytes());
        let mut sent = Vec::new();
        read_greeting(&mut Cursor::new(server_greeting()), &mut sent).unwrap();
        assert_eq!(sent, 0x205u64.to_le_bytes());
    }

    #[test]
    fn other_greetings_are_refused() {
        let mut not_nix = Cursor::new(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        assert!(read_greeting(&mut not_nix, &mut Vec::new()).is_err());
        let mut old = Vec::new();
        old.extend(0x5452_eecbu64.to_le_bytes());
        old.extend(0x203u64.to_le_bytes());
        let e = read_greeting(&mut Cursor::new(old), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("0x203"), "{e}");
        assert!(read_greeting(&mut Cursor::new(Vec::new()), &mut Vec::new()).is_err());
    }

    #[test]
    fn path_infos_read_as_sent() {
        let mut b = Vec::new();
        for (path, refs) in [
            ("/nix/store/a-x", vec!["/nix/store/a-x"]),
            ("/nix/store/b-y", vec![]),
        ] {
            write_str(&mut b, path).unwrap();
            write_str(&mut b, "/nix/store/d-x.drv").unwrap();
            write_strs(
                &mut b,
                &refs.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            write_u64(&mut b, 712).unwrap();
            write_u64(&mut b, 712).unwrap();
            write_str(
                &mut b,
                "sha256:0jdcyhrshblk319lq8s9w7zylgvjrpzd62sqyfnn59v6zwpa5zqv",
            )
            .unwrap();
            write_str(&mut b, "").unwrap();
            write_strs(&mut b, &["cache:sig".to_string()]).unwrap();
        }
        write_str(&mut b, "").unwrap();
        let infos = read_path_infos(&mut Cursor::new(b)).unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].path, "/nix/store/a-x");
        assert_eq!(infos[0].references, ["/nix/store/a-x"]);
        assert_eq!(infos[0].nar_size, 712);
        assert_eq!(infos[0].deriver, "/nix/store/d-x.drv");
        assert!(infos[0].nar_hash.starts_with("sha256:0jdc"));
        assert!(infos[1].references.is_empty());
    }

    #[test]
    fn a_cut_or_absurd_answer_is_an_error_not_a_huge_allocation() {
        let mut b = Vec::new();
        write_str(&mut b, "/nix/store/a-x").unwrap();
        assert!(
            read_path_infos(&mut Cursor::new(b)).is_err(),
            "cut after the path"
        );
        let huge = u64::MAX.to_le_bytes().to_vec();
        assert!(read_str(&mut Cursor::new(huge.clone())).is_err());
        assert!(read_paths(&mut Cursor::new(huge)).is_err());
    }

    #[test]
    fn queries_are_framed_as_nix_reads_them() {
        let paths = vec!["/nix/store/a-x".to_string()];
        let mut b = Vec::new();
        write_closure_query(&mut b, &paths).unwrap();
        let mut r = Cursor::new(b);
        assert_eq!(read_u64(&mut r).unwrap(), 7);
        assert_eq!(read_u64(&mut r).unwrap(), 0, "outputs not included");
        assert_eq!(read_strs(&mut r).unwrap(), paths);
        let mut b = Vec::new();
        write_path_info_query(&mut b, &paths).unwrap();
        let mut r = Cursor::new(b);
        assert_eq!(read_u64(&mut r).unwrap(), 2);
        assert_eq!(read_strs(&mut r).unwrap(), paths);
        let mut b = Vec::new();
        write_valid_paths_query(&mut b, &paths).unwrap();
        let mut r = Cursor::new(b);
        assert_eq!(read_u64(&mut r).unwrap(), 1);
        assert_eq!(read_u64(&mut r).unwrap(), 0, "no temporary roots");
        assert_eq!(read_u64(&mut r).unwrap(), 0, "no substitution");
        assert_eq!(read_strs(&mut r).unwrap(), paths);
    }
}
