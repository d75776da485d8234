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
//! [`MAX_BUFFERED`]; past that they are dropped and counted, rather than requests held up. The
//! last quarter is kept for warnings and errors.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer gathers lines after the first of a batch.
const COLLECT_FOR: Duration = Duration::from_millis(20);
/// A batch this large is written at once.
const WRITE_SOON: usize = 256 * 1024;
/// The most held in memory, waiting and being written together, while the output is slow;
/// later lines are dropped.
const MAX_BUFFERED: usize = 8 * 1024 * 1024;
/// Lines below `warn` stop at this much held, so that a flood of them (anyone can make the api
/// log a line per request) leaves room for the warnings and errors an operator needs.
const ROUTINE_LIMIT: usize = MAX_BUFFERED / 4 * 3;
/// A buffer grown past this by a stall is given back once written, so that the memory a blocked
/// output took does not stay with the program.
const KEEP_CAPACITY: usize = 1024 * 1024;
/// How long the program's exit waits for the last lines to be written: an output that does
/// not take them (a stalled pipe) must not keep the program from ending.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// Bytes the writer thread took and is writing: they count toward [`MAX_BUFFERED`] too.
    being_written: usize,
    /// The writer sleeps until a first line comes, and only then needs waking.
    writer_idle: bool,
    closing: bool,
    /// The writer thread has written what was there at closing and ended.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer thread; also tells the closing guard that the thread ended.
    wake: Condvar,
    dropped: AtomicU64,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count_dropped(&self, bytes: &[u8]) {
        let lines = bytes.iter().filter(|b| **b == b'\n').count().max(1);
        self.dropped
            .fetch_add(u64::try_from(lines).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Hands out line writers for the `tracing` subscriber; cheap to clone.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Writes what is still buffered, for up to [`CLOSE_TIMEOUT`], when dropped. Lines logged
/// after that are dropped and counted.
pub struct WriterGuard {
    shared: Arc<Shared>,
}

impl BatchedWriter {
    /// Starts the writer thread, writing to `output`.
    pub fn start(output: impl Write + Send + 'static) -> (Self, WriterGuard) {
        let shared = Arc::new(Shared::default());
        let for_thread = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_batches(&for_thread, output))
            .expect("the log writer thread starts");
        (
            Self {
                shared: shared.clone(),
            },
            WriterGuard { shared },
        )
    }

    /// Lines dropped since start: the output did not keep up, failed, or was closed.
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
                pending = shared.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
            pending.writer_idle = false;
            if !pending.closing && pending.lines.len() < WRITE_SOON {
                pending = shared
                    .wake
                    .wait_timeout(pending, COLLECT_FOR)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            // Swapped, not copied: the two buffers keep their capacity between batches.
            std::mem::swap(&mut batch, &mut pending.lines);
            pending.being_written = batch.len();
            pending.closing
        };
        if !batch.is_empty()
            && output
                .write_all(&batch)
                .and_then(|()| output.flush())
                .is_err()
        {
            // stdout closed or full disk: the batch is lost, and counted.
            shared.count_dropped(&batch);
        }
        batch.clear();
        batch.shrink_to(KEEP_CAPACITY);
        let mut pending = shared.pending();
        pending.being_written = 0;
        // Closing: what was there when it began is written; later lines are not waited for.
        if closing {
            pending.closed = true;
            shared.wake.notify_all();
            return;
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        let mut pending = self.shared.pending();
        pending.closing = true;
        self.shared.wake.notify_all();
        let (pending, _timed_out) = self
            .shared
            .wake
            .wait_timeout_while(pending, CLOSE_TIMEOUT, |pending| !pending.closed)
            .unwrap_or_else(|e| e.into_inner());
        // A writer stuck on its output is left to it; the program is ending.
        drop(pending);
    }
}

/// One line's writer: the subscriber formats a whole line, then writes it with one call.
pub struct LineWriter<'a> {
    shared: &'a Shared,
    /// How much may be held for this line to be kept: [`MAX_BUFFERED`] for warnings and
    /// errors, [`ROUTINE_LIMIT`] for the rest.
    limit: usize,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.pending();
        let held = pending.lines.len() + pending.being_written;
        if pending.closed || held + line.len() > self.limit {
            drop(pending);
            self.shared.count_dropped(line);
            // Reported as written: a dropped log line must not become the caller's error.
            return Ok(line.len());
        }
        let before = pending.lines.len();
        pending.lines.extend_from_slice(line);
        // Woken for the first line after a quiet spell, and once when a batch grows large.
        let wake =
            pending.writer_idle || (before < WRITE_SOON && pending.lines.len() >= WRITE_SOON);
        pending.writer_idle = false;
        drop(pending);
        if wake {
            self.shared.wake.notify_all();
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
            limit: ROUTINE_LIMIT,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let important = *meta.level() <= tracing::Level::WARN;
        LineWriter {
            shared: &self.shared,
            limit: if important {
                MAX_BUFFERED
            } else {
                ROUTINE_LIMIT
            },
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
        /// Writes that began (and may be waiting on `blocked`).
        entered: Arc<AtomicU64>,
        blocked: Arc<Mutex<()>>,
    }

    impl Write for Output {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let _unblocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
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

    fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
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
        line(&writer, "after the end\n");
        assert_eq!(writer.dropped_lines(), 1, "a line after closing is counted");
    }

    #[test]
    fn a_line_after_a_quiet_spell_is_written_within_the_collection_time() {
        let output = Output::default();
        let (writer, _guard) = BatchedWriter::start(output.clone());
        for round in 0..3 {
            line(&writer, &format!("round {round}\n"));
            wait_for(&format!("round {round} written"), || {
                String::from_utf8_lossy(&output.written.lock().unwrap())
                    .contains(&format!("round {round}\n"))
            });
        }
    }

    #[test]
    fn a_blocked_output_drops_and_counts_lines_past_the_limit_and_does_not_hold_the_exit() {
        let output = Output::default();
        let blocked = output.blocked.clone();
        let hold = blocked.lock().unwrap();
        let (writer, guard) = BatchedWriter::start(output.clone());
        let kilobyte = format!("{}\n", "x".repeat(1023));
        // The writer takes a first line and blocks writing it.
        line(&writer, &kilobyte);
        wait_for("the writer blocks on its output", || {
            output.entered.load(Ordering::SeqCst) > 0
        });
        let room = ROUTINE_LIMIT / 1024 - 1;
        let started = std::time::Instant::now();
        for _ in 0..room + 100 {
            line(&writer, &kilobyte);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "callers never block"
        );
        assert_eq!(writer.dropped_lines(), 100, "the lines past the limit");
        // A warning still finds room: the last quarter is kept for them.
        let mut warning = LineWriter {
            shared: &writer.shared,
            limit: MAX_BUFFERED,
        };
        warning.write_all(b"warning\n").unwrap();
        assert_eq!(writer.dropped_lines(), 100, "the warning was kept");

        // An exit while the output is still blocked waits for it only so long.
        let closing = std::time::Instant::now();
        drop(guard);
        let waited = closing.elapsed();
        assert!(
            waited >= CLOSE_TIMEOUT && waited < CLOSE_TIMEOUT * 3,
            "waited {waited:?}"
        );
        drop(hold);
        wait_for("the first line and the batch after it written", || {
            output.written.lock().unwrap().len() == (room + 1) * 1024 + b"warning\n".len()
        });
        assert!(output.written.lock().unwrap().ends_with(b"warning\n"));
    }
}
