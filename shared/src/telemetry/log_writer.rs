//! The log writer: lines go into a buffer in memory, and a thread of its own writes the buffer
//! out in batches, so that no request waits on stdout.
//!
//! Why not `tracing_appender::non_blocking`: it hands every line to its thread through a
//! channel and wakes the thread for it. One line per request then costs a thread wake-up and a
//! `write` of its own, and on this project's 2-core VM that was about 30 µs of the api's CPU per
//! OTP and 15 µs of the worker's, more than formatting the line (BENCHMARKS.md, round 5). Here a
//! line costs a lock and a copy; the thread is woken once for the first line after a quiet
//! spell, then collects for [`COLLECT_FOR`] and writes everything in one go. A burst that fills
//! [`WRITE_SOON`] wakes it early.
//!
//! When the output blocks (a full pipe, a stalled log shipper), lines pile up to
//! [`MAX_BUFFERED`]; past that they are dropped and counted, rather than requests held up.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer gathers lines after the first of a batch: the most a line waits.
const COLLECT_FOR: Duration = Duration::from_millis(20);
/// A batch this large is written at once.
const WRITE_SOON: usize = 256 * 1024;
/// The most held in memory while the output is blocked; later lines are dropped.
const MAX_BUFFERED: usize = 16 * 1024 * 1024;
/// A buffer grown past this by a stall is given back once written, so that the memory a blocked
/// output took does not stay with the program.
const KEEP_CAPACITY: usize = 1024 * 1024;

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// The writer sleeps until a first line comes, and only then needs waking.
    writer_idle: bool,
    closing: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake_writer: Condvar,
    dropped: AtomicU64,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hands out line writers for the `tracing` subscriber; cheap to clone.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Writes what is still buffered and stops the writer thread when dropped.
pub struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchedWriter {
    /// Starts the writer thread, writing to `output`.
    pub fn start(output: impl Write + Send + 'static) -> (Self, WriterGuard) {
        let shared = Arc::new(Shared::default());
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_batches(&for_thread, output))
            .expect("the log writer thread starts");
        (
            Self {
                shared: shared.clone(),
            },
            WriterGuard {
                shared,
                thread: Some(thread),
            },
        )
    }

    /// Lines dropped since start because the output did not keep up.
    pub fn dropped_lines(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread: sleeps while there is nothing to write; once a line comes, collects for
/// [`COLLECT_FOR`] (or until [`WRITE_SOON`] bytes wait) and writes the batch in one go.
fn write_batches(shared: &Shared, mut output: impl Write) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut pending = shared.pending();
            while pending.lines.is_empty() && !pending.closing {
                pending.writer_idle = true;
                pending = shared
                    .wake_writer
                    .wait(pending)
                    .unwrap_or_else(|e| e.into_inner());
            }
            pending.writer_idle = false;
            if !pending.closing && pending.lines.len() < WRITE_SOON {
                pending = shared
                    .wake_writer
                    .wait_timeout(pending, COLLECT_FOR)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            // Swapped, not copied: the two buffers keep their capacity between batches.
            std::mem::swap(&mut batch, &mut pending.lines);
            pending.closing
        };
        // A failed write (stdout closed) loses that batch; nothing else is there to tell.
        let _ = output.write_all(&batch).and_then(|()| output.flush());
        batch.clear();
        batch.shrink_to(KEEP_CAPACITY);
        if closing && shared.pending().lines.is_empty() {
            return;
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.pending().closing = true;
        self.shared.wake_writer.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One line's writer: the subscriber formats a whole line, then writes it with one call.
pub struct LineWriter<'a> {
    shared: &'a Shared,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.pending();
        if pending.lines.len() + line.len() > MAX_BUFFERED {
            drop(pending);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            // Reported as written: a dropped log line must not become the caller's error.
            return Ok(line.len());
        }
        pending.lines.extend_from_slice(line);
        let wake = pending.writer_idle || pending.lines.len() >= WRITE_SOON;
        if pending.writer_idle {
            pending.writer_idle = false;
        }
        drop(pending);
        if wake {
            self.shared.wake_writer.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read, and block.
    #[derive(Clone, Default)]
    struct Output {
        written: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
        blocked: Arc<Mutex<()>>,
    }

    impl Write for Output {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let _unblocked = self.blocked.lock().unwrap();
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(writer: &BatchedWriter, text: &str) {
        writer.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn lines_are_written_in_order_in_few_writes_and_all_by_the_guard() {
        let output = Output::default();
        let (writer, guard) = BatchedWriter::start(output.clone());
        for i in 0..1_000 {
            line(&writer, &format!("line {i}\n"));
        }
        drop(guard);
        let expected: String = (0..1_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(
            String::from_utf8(output.written.lock().unwrap().clone()).unwrap(),
            expected
        );
        let writes = output.writes.load(Ordering::Relaxed);
        assert!(writes <= 3, "1,000 lines in {writes} writes");
        assert_eq!(writer.dropped_lines(), 0);
    }

    #[test]
    fn a_line_after_a_quiet_spell_is_written_within_the_collection_time() {
        let output = Output::default();
        let (writer, _guard) = BatchedWriter::start(output.clone());
        for round in 0..3 {
            line(&writer, &format!("round {round}\n"));
            let deadline = std::time::Instant::now() + COLLECT_FOR * 50;
            while !String::from_utf8_lossy(&output.written.lock().unwrap())
                .contains(&format!("round {round}\n"))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round} never written"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn a_blocked_output_drops_and_counts_lines_past_the_limit_instead_of_blocking() {
        let output = Output::default();
        let blocked = output.blocked.clone();
        let hold = blocked.lock().unwrap();
        let (writer, guard) = BatchedWriter::start(output.clone());
        let kilobyte = format!("{}\n", "x".repeat(1023));
        // The writer takes the first batch and blocks on it; the rest fills the buffer.
        let lines = MAX_BUFFERED / 1024 + 2_000;
        let started = std::time::Instant::now();
        for _ in 0..lines {
            line(&writer, &kilobyte);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "callers never block"
        );
        assert!(writer.dropped_lines() > 0, "some lines were dropped");
        drop(hold);
        drop(guard);
        let written = output.written.lock().unwrap().len() / 1024;
        assert_eq!(
            u64::try_from(written).unwrap() + writer.dropped_lines(),
            u64::try_from(lines).unwrap(),
            "every line was written or counted"
        );
    }
}
