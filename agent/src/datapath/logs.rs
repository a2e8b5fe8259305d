//! Kernel-side log records (aya-log) forwarded into the agent's `tracing` output.
//!
//! aya-log 0.3 hands records to a `log::Log`; this bridge turns each into a tracing event
//! under the `selvedge::ebpf` target. The logger owns the ring buffer's fd and must be both
//! kept alive and polled, so it lives in a task that waits for the fd to become readable.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

#[derive(Debug, Clone, Copy)]
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args().to_string();
        match record.level() {
            log::Level::Error => tracing::error!(target: "selvedge::ebpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "selvedge::ebpf", "{msg}"),
            log::Level::Info => tracing::info!(target: "selvedge::ebpf", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "selvedge::ebpf", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "selvedge::ebpf", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Start forwarding; a missing log map (object built without logging) is not an error.
pub(super) fn start(ebpf: &mut Ebpf) {
    let logger = match EbpfLogger::init_with_logger(ebpf, ToTracing) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("eBPF logs unavailable: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring-buffer fd and lives inside the AsyncFd, so the fd
    // stays open for as long as it is registered.
    let Ok(mut fd) = (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }) else {
        tracing::warn!("eBPF logs unavailable: cannot poll the log ring buffer");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
