//! A gzip encoder that compresses one stream on every core and still produces the
//! same bytes whatever the number of threads.
//!
//! The input is cut into fixed 1 MiB blocks. Each block is deflated on its own,
//! primed with the last 32 KiB of the block before it (so matches reach back across
//! block boundaries as in a single stream), and ended with a sync flush, which leaves
//! the deflate stream byte-aligned so the blocks concatenate into one valid deflate
//! stream in one gzip member. This is pigz's scheme. The output depends only on the
//! input, the level and the block size, never on scheduling, so layer digests are
//! stable across machines with different core counts.
//!
//! Pure format logic over `Write`; the only side effect is spawning threads.

use flate2::{Compress, Compression, FlushCompress, Status};
use std::io::{self, Write};
use std::thread::JoinHandle;

const BLOCK: usize = 1 << 20;
const WINDOW: usize = 32 * 1024;
/// Fixed gzip header: no name, mtime 0, no extra flags, OS "unknown".
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

type Job = JoinHandle<io::Result<Vec<u8>>>;

pub struct ParGzEncoder<W: Write> {
    inner: W,
    level: Compression,
    threads: usize,
    current: Vec<u8>,
    /// Full blocks waiting to be sent to the workers, with their dictionaries.
    batch: Vec<(Vec<u8>, Vec<u8>)>,
    /// The last window of input handed to a worker: the next block's dictionary.
    tail: Vec<u8>,
    /// The previous batch, compressing while the next one fills.
    running: Vec<Job>,
    crc: crc32fast::Hasher,
    size: u64,
    started: bool,
}

impl<W: Write> ParGzEncoder<W> {
    pub fn new(inner: W, level: u32) -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Self::with_threads(inner, level, threads)
    }

    /// `threads` changes only the speed, never the output.
    pub fn with_threads(inner: W, level: u32, threads: usize) -> Self {
        ParGzEncoder {
            inner,
            level: Compression::new(level),
            threads: threads.max(1),
            current: Vec::with_capacity(BLOCK),
            batch: Vec::new(),
            tail: Vec::new(),
            running: Vec::new(),
            crc: crc32fast::Hasher::new(),
            size: 0,
            started: false,
        }
    }

    fn start(&mut self) -> io::Result<()> {
        if !self.started {
            self.inner.write_all(&HEADER)?;
            self.started = true;
        }
        Ok(())
    }

    /// Queues the filled block; dispatches a batch when there is one per thread.
    fn seal_block(&mut self) -> io::Result<()> {
        let block = std::mem::replace(&mut self.current, Vec::with_capacity(BLOCK));
        let dict = std::mem::take(&mut self.tail);
        self.tail = block[block.len().saturating_sub(WINDOW)..].to_vec();
        self.batch.push((dict, block));
        if self.batch.len() >= self.threads {
            self.dispatch(false)?;
        }
        Ok(())
    }

    /// Starts compressing the queued blocks, after writing out the previous batch
    /// (in order) so at most two batches are in memory.
    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        self.collect()?;
        let level = self.level;
        let count = self.batch.len();
        for (i, (dict, data)) in self.batch.drain(..).enumerate() {
            let flush = if last && i + 1 == count {
                FlushCompress::Finish
            } else {
                FlushCompress::Sync
            };
            self.running.push(std::thread::spawn(move || {
                deflate_block(level, &dict, &data, flush)
            }));
        }
        Ok(())
    }

    fn collect(&mut self) -> io::Result<()> {
        for job in self.running.drain(..) {
            let out = job
                .join()
                .map_err(|_| io::Error::other("compression thread panicked"))??;
            self.inner.write_all(&out)?;
        }
        Ok(())
    }

    /// Writes the last block and the gzip trailer, and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.start()?;
        let block = std::mem::take(&mut self.current);
        let dict = std::mem::take(&mut self.tail);
        self.batch.push((dict, block));
        self.dispatch(true)?;
        self.collect()?;
        let crc = std::mem::take(&mut self.crc).finalize();
        self.inner.write_all(&crc.to_le_bytes())?;
        // ISIZE is the input length modulo 2^32.
        self.inner.write_all(&(self.size as u32).to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.start()?;
        let n = buf.len().min(BLOCK - self.current.len());
        self.current.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        self.size += n as u64;
        if self.current.len() == BLOCK {
            self.seal_block()?;
        }
        Ok(n)
    }

    /// Flushing must not cut a block short (that would change the bytes), so it
    /// only flushes what has already been compressed.
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn deflate_block(
    level: Compression,
    dict: &[u8],
    data: &[u8],
    flush: FlushCompress,
) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(level, false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let mut out = Vec::with_capacity(data.len() / 2 + 4096);
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = c.total_in() as usize == data.len();
        match (flush, status) {
            (FlushCompress::Finish, Status::StreamEnd) => return Ok(out),
            // A sync flush is complete once all input is taken and the output
            // buffer was not filled up.
            (FlushCompress::Sync, _) if all_in && out.len() < out.capacity() => return Ok(out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: text-like with a slowly changing pattern.
        let mut x: u32 = 12345;
        (0..len)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i % 7 == 0 {
                    b'a' + (x >> 24) as u8 % 26
                } else {
                    b"the quick brown fox "[i % 20]
                }
            })
            .collect()
    }

    fn gz(data: &[u8], threads: usize, chunk: usize) -> Vec<u8> {
        let mut e = ParGzEncoder::with_threads(Vec::new(), 6, threads);
        for part in data.chunks(chunk.max(1)) {
            e.write_all(part).unwrap();
        }
        e.finish().unwrap()
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn round_trips_at_every_size_around_block_edges() {
        for len in [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
            let data = sample(len);
            let bytes = gz(&data, 2, 65536);
            assert_eq!(gunzip(&bytes), data, "len {len}");
            // A single member: the standard tools see one stream.
            let mut single = flate2::read::GzDecoder::new(&bytes[..]);
            let mut first = Vec::new();
            single.read_to_end(&mut first).unwrap();
            assert_eq!(first.len(), len);
        }
    }

    #[test]
    fn output_does_not_depend_on_threads_or_write_sizes() {
        let data = sample(5 * BLOCK + 1234);
        let reference = gz(&data, 1, 1 << 20);
        for (threads, chunk) in [(2, 4096), (3, 1), (8, 777_777), (4, 5 * BLOCK + 1234)] {
            if chunk == 1 {
                // Byte-at-a-time over 5 MiB is slow in debug builds; a prefix is enough.
                let small = &data[..BLOCK + 10];
                assert_eq!(gz(small, threads, 1), gz(small, 1, BLOCK));
                continue;
            }
            assert_eq!(gz(&data, threads, chunk), reference, "{threads} threads");
        }
    }

    #[test]
    fn gzip_tool_accepts_it() {
        let data = sample(2 * BLOCK + 5);
        let bytes = gz(&data, 2, 100_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gz");
        std::fs::write(&path, &bytes).unwrap();
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, data);
    }

    #[test]
    fn dictionaries_keep_the_ratio_close_to_a_single_stream() {
        let data = sample(4 * BLOCK);
        let ours = gz(&data, 2, 1 << 16).len();
        let mut single = flate2::write::GzEncoder::new(Vec::new(), Compression::new(6));
        single.write_all(&data).unwrap();
        let single = single.finish().unwrap().len();
        assert!(
            (ours as f64) < single as f64 * 1.02,
            "parallel {ours} vs single {single}"
        );
    }
}
