//! The access log's lines for finished connections, and the lines of AUDIT and dry-run
//! policies that matched a connection, logged by a thread of their own.
//!
//! Logging an event costs a few microseconds in the formatter, serde and the writer, but on
//! the thread that carries every connection it cost more: that code and its data pushed the
//! data path's out of the caches, once per connection at each end. With access logging off
//! (`/logging?level=warn`), the demo lab's time to first byte fell 27 µs and both agents'
//! CPU per connection ~20 µs; the formatter's hot loop explains 4 µs of that. So a finished
//! connection only records its facts here (a few small copies), and the log thread logs the
//! records gathered, in a batch, at most [`LINGER`] after the first of them. A line's
//! timestamp can therefore trail the close by up to [`LINGER`]; its `duration_ms` is exact.
//!
//! Nothing is dropped while the agent runs: past [`CAP`] waiting records, a connection logs
//! its own line, as before. When the guard from [`start`] is dropped (the agent returning
//! from `run`, an error included), what is queued is logged after the batch in progress.
//! Only an agent killed outright loses lines: at most the last [`LINGER`] of them. Without
//! [`start`] (unit tests), lines are logged in place.
//!
//! The log's writer is [`writer`]: stderr, one `write` per line, except on the log thread,
//! whose batch of lines is gathered and written in one `write` when the batch is done (a
//! line per connection per agent made a system call each).

use std::{
    cell::RefCell,
    io::{self, Write},
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};

/// The longest a record waits for its line.
pub const LINGER: Duration = Duration::from_millis(20);
/// A batch this large is logged without waiting for [`LINGER`].
const BATCH: usize = 256;
/// Records waiting beyond this are logged in place by their connection.
const CAP: usize = 16 * 1024;

/// One finished connection, as its access-log line says it.
#[derive(Debug)]
pub struct Closed {
    pub direction: &'static str,
    pub pod: String,
    pub namespace: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub security: &'static str,
    pub src_identity: String,
    pub dst_identity: String,
    pub service: String,
    /// Source → destination (Istio's and the line's `bytes_received`).
    pub request_bytes: u64,
    /// Destination → source (Istio's and the line's `bytes_sent`).
    pub response_bytes: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
}

impl Closed {
    fn log(self) {
        tracing::info!(
            target: "selvedge::access",
            direction = self.direction,
            pod = %self.pod, namespace = %self.namespace,
            src = %self.src, dst = %self.dst,
            security = self.security,
            src_identity = %self.src_identity, dst_identity = %self.dst_identity,
            service = %self.service,
            bytes_sent = self.response_bytes, bytes_received = self.request_bytes,
            duration_ms = self.duration_ms,
            result = if self.error.is_some() { "error" } else { "ok" },
            reason = %self.error.unwrap_or_default(),
            "connection closed"
        );
    }
}

thread_local! {
    /// On the log thread during a batch: the batch's lines, not yet written.
    static GATHERED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// The writer every log line goes through (`tracing_subscriber`'s `with_writer`).
pub fn writer() -> Writer {
    Writer
}

/// See [`writer`].
#[derive(Debug)]
pub struct Writer;

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let gathered = GATHERED.with_borrow_mut(|g| g.as_mut().map(|lines| lines.extend_from_slice(buf)).is_some());
        if gathered {
            return Ok(buf.len());
        }
        io::stderr().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Log `batch`, its lines written to stderr at once (one `write`, as far as the pipe or
/// file takes it).
fn log_batch(batch: Vec<Line>) {
    GATHERED.set(Some(Vec::new()));
    batch.into_iter().for_each(Line::log);
    if let Some(lines) = GATHERED.take() {
        // Nowhere to report a failed write of the log: as for any other line.
        let _ = io::stderr().write_all(&lines);
    }
}

/// A policy that reported on a connection without deciding it: an AUDIT policy, or a
/// dry-run one (its action given). Logged by the log thread like a closed connection, so
/// that the line is not formatted during the connection's authorization.
#[derive(Debug)]
pub struct PolicyMatch {
    pub pod: String,
    pub policy: String,
    pub src: std::net::IpAddr,
    /// The dry-run policy's action; `None` for AUDIT.
    pub dry_run: Option<&'static str>,
}

impl PolicyMatch {
    fn log(self) {
        let Self { pod, policy, src, dry_run } = self;
        match dry_run {
            Some(action) => {
                tracing::info!(target: "selvedge::proxy", pod = %pod, policy = %policy, action, src = %src, "dry-run policy matched (not enforced)")
            }
            None => {
                tracing::info!(target: "selvedge::proxy", pod = %pod, policy = %policy, src = %src, "AUDIT policy matched")
            }
        }
    }

    /// Whether these lines are on (the level filter can change at runtime).
    pub fn enabled() -> bool {
        tracing::enabled!(target: "selvedge::proxy", tracing::Level::INFO)
    }
}

/// A line the log thread logs.
#[derive(Debug)]
pub enum Line {
    Closed(Closed),
    Policy(PolicyMatch),
}

impl Line {
    fn log(self) {
        match self {
            Line::Closed(c) => c.log(),
            Line::Policy(p) => p.log(),
        }
    }
}

impl From<Closed> for Line {
    fn from(c: Closed) -> Self {
        Line::Closed(c)
    }
}

impl From<PolicyMatch> for Line {
    fn from(p: PolicyMatch) -> Self {
        Line::Policy(p)
    }
}

/// Whether the access log is on (the level filter can change at runtime).
pub fn enabled() -> bool {
    tracing::enabled!(target: "selvedge::access", tracing::Level::INFO)
}

/// Log `line`: queued for the log thread once [`start`]ed, else (or when the queue is
/// full) here.
pub fn log(line: impl Into<Line>) {
    let line = line.into();
    match QUEUE.get() {
        Some(queue) => {
            if let Err(line) = queue.push(line) {
                line.log();
            }
        }
        None => line.log(),
    }
}

static QUEUE: OnceLock<Arc<Batches<Line>>> = OnceLock::new();

/// Logs what is still queued when dropped.
#[derive(Debug)]
#[must_use = "dropping it logs what is queued; keep it while connections close"]
pub struct Drain(Arc<Batches<Line>>);

impl Drop for Drain {
    fn drop(&mut self) {
        // After the batch the log thread may be logging (the process ends right after).
        self.0.finish(log_batch);
    }
}

/// Start the log thread; once per process (a second call gets the same queue).
pub fn start() -> std::io::Result<Drain> {
    let mut started = Ok(());
    let queue = QUEUE.get_or_init(|| {
        let queue = Arc::new(Batches::new(BATCH, CAP, LINGER));
        let worker = queue.clone();
        started =
            std::thread::Builder::new().name("access-log".into()).spawn(move || worker.serve(log_batch)).map(drop);
        queue
    });
    started.map(|()| Drain(queue.clone()))
}

/// Items handed from many threads to one that takes them in batches: a batch is taken
/// when it reaches `batch` items or its first item has waited `linger`, and the taker is
/// woken only for a batch's first item and when the batch is full.
#[derive(Debug)]
struct Batches<T> {
    items: Mutex<Vec<T>>,
    filled: Condvar,
    /// Held while a batch is handed on, taken before `items`: [`Self::finish`] waits for it.
    busy: Mutex<()>,
    batch: usize,
    cap: usize,
    linger: Duration,
}

impl<T> Batches<T> {
    fn new(batch: usize, cap: usize, linger: Duration) -> Self {
        Batches { items: Mutex::new(Vec::new()), filled: Condvar::new(), busy: Mutex::new(()), batch, cap, linger }
    }

    /// Queue `item`, or hand it back when `cap` items are waiting.
    fn push(&self, item: T) -> Result<(), T> {
        let mut items = self.items.lock();
        if items.len() >= self.cap {
            return Err(item);
        }
        items.push(item);
        if items.len() == 1 || items.len() == self.batch {
            self.filled.notify_one();
        }
        Ok(())
    }

    /// Everything queued, now.
    fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.items.lock())
    }

    /// Once the batch being handed on (if any) is done, hand on what is left to `last`.
    fn finish(&self, last: impl FnOnce(Vec<T>)) {
        let _busy = self.busy.lock();
        last(self.take());
    }

    /// Hand each batch to `each`, forever.
    fn serve(&self, mut each: impl FnMut(Vec<T>)) -> ! {
        loop {
            {
                let mut items = self.items.lock();
                self.filled.wait_while(&mut items, |i| i.is_empty());
                let deadline = Instant::now() + self.linger;
                while items.len() < self.batch && !self.filled.wait_until(&mut items, deadline).timed_out() {}
            }
            let _busy = self.busy.lock();
            each(self.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// A taker thread that reports each batch.
    fn served(b: &Arc<Batches<u32>>) -> mpsc::Receiver<Vec<u32>> {
        let (tx, rx) = mpsc::channel();
        let b = b.clone();
        std::thread::spawn(move || b.serve(|batch| tx.send(batch).unwrap()));
        rx
    }

    #[test]
    fn a_full_batch_is_taken_at_once_in_order_and_a_partial_one_waits_for_the_linger() {
        // A linger far longer than the test's timeouts: only a full batch can arrive.
        let b = Arc::new(Batches::new(100, 10_000, Duration::from_secs(3600)));
        let rx = served(&b);
        for i in 0..100 {
            b.push(i).unwrap();
        }
        let batch = rx.recv_timeout(Duration::from_secs(5)).expect("a full batch without the linger");
        assert_eq!(batch, (0..100).collect::<Vec<_>>(), "every item once, in order");
        for i in 100..130 {
            b.push(i).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "a partial batch waits for the linger");
        assert_eq!(b.take(), (100..130).collect::<Vec<_>>());
    }

    #[test]
    fn a_lone_item_is_taken_after_the_linger() {
        let b = Arc::new(Batches::new(100, 10_000, Duration::from_millis(20)));
        let rx = served(&b);
        b.push(7).unwrap();
        let batch = rx.recv_timeout(Duration::from_secs(5)).expect("taken within 5 s");
        assert_eq!(batch, [7]);
    }

    #[test]
    fn finishing_waits_for_the_batch_being_handed_on() {
        let b = Arc::new(Batches::new(2, 10_000, Duration::from_secs(3600)));
        let (started, in_batch) = mpsc::channel();
        let (release, held) = mpsc::channel::<()>();
        let done = Arc::new(Mutex::new(Vec::new()));
        {
            let (b, done) = (b.clone(), done.clone());
            std::thread::spawn(move || {
                b.serve(|batch| {
                    started.send(()).unwrap();
                    held.recv().unwrap();
                    done.lock().extend(batch);
                })
            });
        }
        b.push(1).unwrap();
        b.push(2).unwrap();
        in_batch.recv_timeout(Duration::from_secs(5)).expect("the batch is being handed on");
        b.push(3).unwrap();
        let finisher = {
            let (b, done) = (b.clone(), done.clone());
            std::thread::spawn(move || b.finish(|rest| done.lock().extend(rest)))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!finisher.is_finished(), "finish waits while a batch is being handed on");
        release.send(()).unwrap();
        finisher.join().unwrap();
        assert_eq!(*done.lock(), [1, 2, 3], "the batch, then what was left, in order");
    }

    /// Lines written during a batch are gathered, in order, to be written at once; the
    /// batch leaves nothing gathering behind it.
    #[test]
    fn a_batch_gathers_its_lines_and_leaves_later_lines_unbuffered() {
        GATHERED.set(Some(Vec::new()));
        let mut w = writer();
        w.write_all(b"one\n").unwrap();
        w.write_all(b"two\n").unwrap();
        assert_eq!(GATHERED.take().as_deref(), Some(&b"one\ntwo\n"[..]));
        log_batch(Vec::new());
        assert!(GATHERED.take().is_none(), "no gathering outside a batch");
        assert_eq!(w.write(b"").unwrap(), 0);
    }

    #[test]
    fn past_the_cap_items_are_handed_back_and_take_empties_the_queue() {
        // Nobody serves: the queue only fills.
        let b = Batches::new(100, 3, Duration::from_millis(20));
        for i in 0..3 {
            b.push(i).unwrap();
        }
        assert_eq!(b.push(3), Err(3), "the caller logs it itself");
        assert_eq!(b.take(), [0, 1, 2]);
        assert!(b.take().is_empty());
        b.push(4).unwrap();
    }
}
