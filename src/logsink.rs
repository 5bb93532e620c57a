//! Where the log lines go when stderr is not a terminal: a request's access line
//! through a buffer that a thread of its own writes out, every other line at once.
//!
//! Every request logs an access line. Written straight to stderr, that is a
//! write(2) per request under the stderr lock, which the HTTP workers contend for:
//! with two workers, most requests also paid a futex wait and wake (0.63 futex
//! calls per request under `wrk`, all of them this lock). Here an access line is a
//! copy into memory; the thread writes what gathered within [`GATHER`] in one call.
//! actix-web logs that line only as the answer's last bytes go out, so it never
//! was in the log before the client had its answer. Every other line (a build's
//! progress, a warning) is written before the call that logged it returns, as
//! before: what a request logs on its way is in the log when it is answered.
//!
//! An access line is written in env_logger's format by this module itself,
//! without env_logger's per-record buffer, indentation and colour stripping: it is
//! one line without colour, and skipping those steps serves 4-10% more warm
//! manifests a second.
//!
//! Order is kept: lines reach stderr in the order they were logged, since a line
//! written at once first writes out those buffered before it. An access line waits
//! at most about [`GATHER`], unless stderr itself blocks; then the buffer fills to
//! its capacity and loggers wait for stderr as they did before, so memory stays
//! bounded. [`finish`] writes out what is left and makes every later line
//! synchronous, and a panic writes the buffer out before its own message.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How long the thread lets access lines gather after the first one: the most
/// one waits, and at 40,000 requests a second about 80 lines to one write.
pub const GATHER: Duration = Duration::from_millis(2);

/// Bytes buffered at most; past that a logger writes itself, and waits for stderr.
const CAPACITY: usize = 1 << 20;

/// The target of actix-web's access log, whose lines may wait in the buffer.
const ACCESS_LOG: &str = "actix_web::middleware::logger";

static STDERR_SINK: OnceLock<Arc<Shared<io::Stderr>>> = OnceLock::new();

/// The logger: env_logger filtered by `RUST_LOG` (`info` by default), with
/// millisecond timestamps; its access lines go through the buffer when stderr
/// is not a terminal (on a terminal colours matter more than speed).
pub fn init() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.format_timestamp_millis();
    if io::stderr().is_terminal() {
        builder.init();
        return;
    }
    let shared = STDERR_SINK.get_or_init(|| start(io::stderr(), CAPACITY));
    builder.target(env_logger::Target::Pipe(Box::new(Sink(shared.clone()))));
    let inner = builder.build();
    let max_level = inner.filter();
    let routed = Routed {
        inner,
        sink: shared.clone(),
    };
    if log::set_boxed_logger(Box::new(routed)).is_err() {
        return; // a logger is installed already
    }
    log::set_max_level(max_level);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(shared) = STDERR_SINK.get() {
            shared.write_out_if_free();
        }
        previous(info);
    }));
}

/// Writes out every buffered line; from now on each line is written at once.
/// Called as the process ends.
pub fn finish() {
    if let Some(shared) = STDERR_SINK.get() {
        shared.finish();
    }
}

/// Access lines into the buffer, every other line through env_logger.
struct Routed {
    inner: env_logger::Logger,
    sink: Arc<Shared<io::Stderr>>,
}

impl log::Log for Routed {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    /// env_logger's filter decides for every line, its own `log` applying it to
    /// the lines it writes.
    fn log(&self, record: &log::Record<'_>) {
        if record.target() != ACCESS_LOG {
            return self.inner.log(record);
        }
        if self.inner.matches(record) {
            let mut line = Vec::with_capacity(160);
            access_line(&mut line, time::OffsetDateTime::now_utc(), record);
            self.sink.push(&line, true);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// A record as env_logger's default format writes it with millisecond
/// timestamps (`[2026-12-01T02:43:18.463Z INFO  target] message`), for a record
/// of one line; the tests hold the two to the same bytes.
fn access_line(out: &mut Vec<u8>, at: time::OffsetDateTime, record: &log::Record<'_>) {
    let _ = writeln!(
        out,
        "[{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z {:<5} {}] {}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond(),
        record.level(),
        record.target(),
        record.args()
    );
}

struct Shared<W> {
    state: Mutex<State>,
    ready: Condvar,
    /// Taken while `state` is held, so writes reach `out` in the order their
    /// lines entered the buffer.
    out: Mutex<W>,
    capacity: usize,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    direct: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A logger that panicked mid-copy leaves at worst a partial line.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn start<W: Write + Send + 'static>(out: W, capacity: usize) -> Arc<Shared<W>> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        ready: Condvar::new(),
        out: Mutex::new(out),
        capacity,
    });
    let writer = shared.clone();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || writer.write_out_forever())
        .expect("spawning the log writer thread");
    shared
}

impl<W: Write> Shared<W> {
    /// Buffers `line` if it may wait, else writes it (after what is buffered).
    fn push(&self, line: &[u8], may_wait: bool) {
        let mut state = lock(&self.state);
        if !may_wait || state.direct || state.buf.len() + line.len() > self.capacity {
            return self.write_out(state, line);
        }
        let first = state.buf.is_empty();
        state.buf.extend_from_slice(line);
        drop(state);
        if first {
            // Only the first line of a batch wakes the writer: a notify is a
            // syscall whether or not anyone waits.
            self.ready.notify_one();
        }
    }

    fn write_out_forever(&self) {
        let mut spare = Vec::new();
        loop {
            let mut state = lock(&self.state);
            while state.buf.is_empty() {
                state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            drop(state);
            std::thread::sleep(GATHER);
            let mut state = lock(&self.state);
            std::mem::swap(&mut state.buf, &mut spare);
            let mut out = lock(&self.out);
            drop(state);
            let _ = out.write_all(&spare);
            let _ = out.flush();
            drop(out);
            spare.clear();
            if spare.capacity() > self.capacity {
                spare = Vec::new();
            }
        }
    }

    /// Writes what is buffered, then `line`. `out` is taken before `state` is let
    /// go, so that nothing logged later overtakes them.
    fn write_out(&self, mut state: MutexGuard<'_, State>, line: &[u8]) {
        let pending = std::mem::take(&mut state.buf);
        let mut out = lock(&self.out);
        drop(state);
        let _ = out.write_all(&pending);
        let _ = out.write_all(line);
        let _ = out.flush();
    }

    fn finish(&self) {
        let mut state = lock(&self.state);
        state.direct = true;
        self.write_out(state, &[]);
    }

    /// For the panic hook: never waits, since the panicking thread may hold a lock.
    fn write_out_if_free(&self) {
        let Ok(mut state) = self.state.try_lock() else {
            return;
        };
        let Ok(mut out) = self.out.try_lock() else {
            return;
        };
        let pending = std::mem::take(&mut state.buf);
        drop(state);
        let _ = out.write_all(&pending);
        let _ = out.flush();
    }

    #[cfg(test)]
    fn buffered(&self) -> usize {
        lock(&self.state).buf.len()
    }
}

/// What env_logger writes to: one call per log record, never an access line.
struct Sink<W>(Arc<Shared<W>>);

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.0.push(line, false);
        Ok(line.len())
    }

    /// env_logger flushes after every record; the line is on its way already.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A writer the test reads, and can hold still.
    #[derive(Clone, Default)]
    struct Shown {
        bytes: Arc<Mutex<Vec<u8>>>,
        held: Arc<Mutex<()>>,
    }

    impl Write for Shown {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _held = lock(&self.held);
            lock(&self.bytes).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shown {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.bytes).clone()).unwrap()
        }
    }

    /// Logs `line` as [`Routed`] does: an access line may wait, any other goes
    /// through env_logger's writer.
    fn log_line(shared: &Arc<Shared<Shown>>, line: &str, access: bool) {
        if access {
            shared.push(line.as_bytes(), true);
        } else {
            let mut sink = Sink(shared.clone());
            sink.write_all(line.as_bytes()).unwrap();
            sink.flush().unwrap();
        }
    }

    #[test]
    fn an_access_line_reads_as_env_logger_writes_it() {
        let shown = Shown::default();
        let mut builder = env_logger::Builder::new();
        builder
            .parse_filters("info")
            .format_timestamp_millis()
            .target(env_logger::Target::Pipe(Box::new(shown.clone())));
        let logger = builder.build();
        let args = format_args!("127.0.0.1 \"GET /v2/ HTTP/1.1\" 200 2 0.07ms");
        let record = log::Record::builder()
            .args(args)
            .level(log::Level::Info)
            .target(ACCESS_LOG)
            .build();
        log::Log::log(&logger, &record);
        let at =
            time::OffsetDateTime::from_unix_timestamp_nanos(1_764_557_000_007_000_000).unwrap();
        let mut ours = Vec::new();
        access_line(&mut ours, at, &record);
        let ours = String::from_utf8(ours).unwrap();
        let theirs = shown.text();
        assert!(
            ours.starts_with("[2025-12-01T02:43:20.007Z INFO  "),
            "{ours}"
        );
        // The same bytes but for the time: same shape, then the rest equal.
        let time_of = |line: &str| line[1..25].to_string();
        let shape = |t: String| t.replace(|c: char| c.is_ascii_digit(), "0");
        assert_eq!(shape(time_of(&ours)), shape(time_of(&theirs)), "{theirs}");
        assert_eq!(ours[25..], theirs[25..]);
    }

    #[test]
    fn every_line_arrives_whole_and_in_each_threads_order() {
        let shown = Shown::default();
        let shared = start(shown.clone(), 4096);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        log_line(&shared, &format!("thread {t} line {i}\n"), i % 3 != 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        shared.finish();
        let text = shown.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8000, "{}", &text[..text.len().min(500)]);
        for t in 0..4 {
            let own: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> = (0..2000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(own, expected, "thread {t}'s lines");
        }
    }

    #[test]
    fn a_line_other_than_an_access_line_is_written_at_once_after_those_buffered() {
        let shown = Shown::default();
        let shared = start(shown.clone(), 4096);
        log_line(&shared, "GET /a\n", true);
        log_line(&shared, "GET /b\n", true);
        log_line(&shared, "build x: done\n", false);
        assert_eq!(shown.text(), "GET /a\nGET /b\nbuild x: done\n");
    }

    #[test]
    fn a_lone_access_line_is_written_without_further_logging() {
        let shown = Shown::default();
        let shared = start(shown.clone(), 4096);
        log_line(&shared, "only line\n", true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while shown.text().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(shown.text(), "only line\n");
    }

    #[test]
    fn a_blocked_stderr_fills_the_buffer_to_its_capacity_and_no_further() {
        let shown = Shown::default();
        let shared = start(shown.clone(), 90);
        let hold = lock(&shown.held);
        // The first line goes to the writer thread, which blocks in write.
        log_line(&shared, "first\n", true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.buffered() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            shared.buffered(),
            0,
            "the writer thread took the first line"
        );
        // Ten lines of 9 bytes fill the buffer.
        for i in 0..10 {
            log_line(&shared, &format!("line {i:03}\n"), true);
        }
        assert_eq!(shared.buffered(), 90);
        // The next line does not fit: its logger waits for stderr.
        let late = {
            let shared = shared.clone();
            std::thread::spawn(move || log_line(&shared, "line 010\n", true))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !late.is_finished(),
            "a logger past the capacity waits for stderr"
        );
        drop(hold);
        late.join().unwrap();
        shared.finish();
        let expected: String = std::iter::once("first\n".to_string())
            .chain((0..11).map(|i| format!("line {i:03}\n")))
            .collect();
        assert_eq!(shown.text(), expected);
    }

    #[test]
    fn after_finish_each_line_is_written_at_once() {
        let shown = Shown::default();
        let shared = start(shown.clone(), 4096);
        log_line(&shared, "before\n", true);
        shared.finish();
        assert_eq!(shown.text(), "before\n");
        log_line(&shared, "after\n", true);
        assert_eq!(shown.text(), "before\nafter\n");
    }
}
