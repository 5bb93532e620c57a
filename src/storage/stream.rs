//! Hands a layer from the packer (a blocking worker thread) to an async upload in
//! fixed-size chunks while it is still being compressed. A chunk is handed over
//! only when the uploader takes it, which it does once it has room for it (fewer
//! than `storage.upload_chunks_in_flight` parts uploading): the packer fills one
//! chunk while the uploader sends, so a layer in flight costs a bounded number of
//! chunks of memory however large it is, and a slow bucket slows the packer instead
//! of piling bytes up.

use crate::reference::Digest;
use bytes::Bytes;
use std::io::{self, Write};
use tokio::sync::mpsc;

/// What the packer sends.
#[derive(Debug)]
pub enum Piece {
    /// A full chunk; more follow.
    Chunk(Bytes),
    /// The rest of the blob (possibly empty) and what the packer computed over all
    /// of it. A receiver that sees the channel close without this must discard
    /// what it got: the packer failed.
    End {
        tail: Bytes,
        digest: Digest,
        size: u64,
        crc32c: u32,
    },
}

/// The uploader's end.
pub struct BlobReceiver {
    first: Option<Piece>,
    rx: mpsc::Receiver<Piece>,
}

impl BlobReceiver {
    /// The next piece; None when the packer stopped (after `End`, or failing).
    pub async fn next(&mut self) -> Option<Piece> {
        match self.first.take() {
            Some(p) => Some(p),
            None => self.rx.recv().await,
        }
    }

    /// Waits until the packer has produced its first piece, or stopped, without
    /// taking it.
    pub async fn started(&mut self) {
        if self.first.is_none() {
            self.first = self.rx.recv().await;
        }
    }

    #[cfg(test)]
    fn blocking_next(&mut self) -> Option<Piece> {
        match self.first.take() {
            Some(p) => Some(p),
            None => self.rx.blocking_recv(),
        }
    }
}

/// The packer's end: a blocking [`Write`] that cuts the stream into chunks.
pub struct BlobSender {
    tx: mpsc::Sender<Piece>,
    buf: Vec<u8>,
    chunk: usize,
    sent: u64,
    crc: u32,
}

/// A channel for one blob, cut into chunks of `chunk` bytes.
pub fn channel(chunk: usize) -> (BlobSender, BlobReceiver) {
    assert!(chunk > 0, "chunk size must be positive");
    let (tx, rx) = mpsc::channel(1);
    let sender = BlobSender {
        tx,
        buf: Vec::with_capacity(chunk),
        chunk,
        sent: 0,
        crc: 0,
    };
    (sender, BlobReceiver { first: None, rx })
}

fn stopped() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the upload of this layer stopped",
    )
}

impl BlobSender {
    fn send_full_chunk(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        self.crc = super::crc32c::update(self.crc, &full);
        self.sent += full.len() as u64;
        self.tx
            .blocking_send(Piece::Chunk(Bytes::from(full)))
            .map_err(|_| stopped())?;
        // The slot frees when the uploader takes the chunk; holding no permit,
        // this only waits for that.
        futures::executor::block_on(self.tx.reserve())
            .map(drop)
            .map_err(|_| stopped())
    }

    /// Sends the rest with the blob's digest and size, which must describe exactly
    /// the bytes written.
    pub fn finish(mut self, digest: Digest, size: u64) -> io::Result<()> {
        let tail = std::mem::take(&mut self.buf);
        let total = self.sent + tail.len() as u64;
        if total != size {
            return Err(io::Error::other(format!(
                "layer of {size} bytes reported, {total} written"
            )));
        }
        let crc32c = super::crc32c::update(self.crc, &tail);
        self.tx
            .blocking_send(Piece::End {
                tail: Bytes::from(tail),
                digest,
                size,
                crc32c,
            })
            .map_err(|_| stopped())
    }
}

impl Write for BlobSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            self.send_full_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A stream of `data` from a thread of its own, as a packer would send it; when
/// `complete` is false the sender stops before the end, as a failing packer would.
#[cfg(test)]
pub(crate) fn feed(data: Vec<u8>, chunk: usize, complete: bool) -> BlobReceiver {
    let (mut tx, rx) = channel(chunk);
    std::thread::spawn(move || {
        if !complete {
            let _ = tx.write_all(&data[..data.len() / 2]);
            return;
        }
        let digest = Digest::of(&data);
        if tx.write_all(&data).is_ok() {
            let _ = tx.finish(digest, data.len() as u64);
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        Digest::from_hex(&"cd".repeat(32)).unwrap()
    }

    #[test]
    fn cuts_exact_chunks_and_ends_with_the_rest() {
        let (mut tx, mut rx) = channel(4);
        let writer = std::thread::spawn(move || {
            tx.write_all(b"abcdefghij").unwrap();
            tx.finish(digest(), 10).unwrap();
        });
        let mut chunks = Vec::new();
        let mut end = None;
        while let Some(p) = rx.blocking_next() {
            match p {
                Piece::Chunk(c) => chunks.push(c),
                Piece::End {
                    tail, size, crc32c, ..
                } => end = Some((tail, size, crc32c)),
            }
        }
        writer.join().unwrap();
        assert_eq!(chunks, vec![Bytes::from("abcd"), Bytes::from("efgh")]);
        let (tail, size, crc) = end.expect("an end");
        assert_eq!((tail, size), (Bytes::from("ij"), 10));
        assert_eq!(crc, super::super::crc32c::update(0, b"abcdefghij"));
    }

    #[test]
    fn a_size_that_disagrees_is_refused() {
        let (mut tx, _rx) = channel(4);
        tx.write_all(b"abc").unwrap();
        assert!(tx.finish(digest(), 4).is_err());
    }

    #[test]
    fn a_receiver_that_left_stops_the_writer() {
        let (mut tx, rx) = channel(4);
        drop(rx);
        let err = tx.write_all(b"abcdefgh").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_chunk_is_handed_over_only_when_taken() {
        let (mut tx, mut rx) = channel(2);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tx.write_all(b"ab").unwrap();
            done_tx.send(1).unwrap();
            tx.write_all(b"cd").unwrap();
            done_tx.send(2).unwrap();
            tx.finish(digest(), 4).unwrap();
        });
        let wait = std::time::Duration::from_millis(200);
        assert!(
            done_rx.recv_timeout(wait).is_err(),
            "ran ahead of the uploader"
        );
        assert!(matches!(rx.blocking_next(), Some(Piece::Chunk(_))));
        assert_eq!(done_rx.recv().unwrap(), 1);
        assert!(
            done_rx.recv_timeout(wait).is_err(),
            "ran ahead of the uploader"
        );
        assert!(matches!(rx.blocking_next(), Some(Piece::Chunk(_))));
        assert_eq!(done_rx.recv().unwrap(), 2);
        assert!(matches!(rx.blocking_next(), Some(Piece::End { .. })));
    }
}
