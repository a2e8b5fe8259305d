//! Bounded shares of the agent's file descriptors, so that one pod (or one flood of slow
//! TLS handshakes) cannot exhaust the node: connections in flight per pod and in all,
//! and TLS handshakes in progress on the HBONE listeners. What is over a share is refused
//! at once (reset, counted in `selvedge_denials`, logged with its reason); what is left
//! beyond every share is the agent's own reserve (config reloads, the status file, the
//! admin API, new pods' listeners).

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

/// File descriptors kept out of every share, for the agent's own work.
pub const RESERVE_FDS: u64 = 1024;
/// Descriptors one proxied connection holds: the app's socket and the upstream's (a
/// tunnelled one shares its HBONE connection with up to 100 others).
const FDS_PER_CONN: u64 = 2;

/// The shares, as `selvedge run` resolved them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in flight per enrolled pod (both directions).
    pub conns_per_pod: usize,
    /// Connections in flight on the node.
    pub conns_total: usize,
    /// TLS handshakes in progress on every pod's HBONE listener together.
    pub handshakes: usize,
}

impl Limits {
    /// Sized from the agent's open-file limit: all connections together leave
    /// [`RESERVE_FDS`] free, one pod may use a quarter of that, and handshakes (one
    /// descriptor each) an eighth of the limit.
    pub fn from_fd_limit(nofile: u64) -> Self {
        let usable = nofile.saturating_sub(RESERVE_FDS).max(FDS_PER_CONN * 64);
        let total = usable / FDS_PER_CONN;
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Self {
            conns_per_pod: pod_share(to_usize(total)),
            conns_total: to_usize(total),
            handshakes: to_usize((nofile / 8).max(16)),
        }
    }

    /// The limits in force: each one given (`--max-conns`, `--max-conns-per-pod`,
    /// `--max-handshakes`), else its default from `nofile`; a pod's default share follows
    /// the node's share in force, given or not.
    pub fn resolve(
        nofile: u64,
        conns_total: Option<usize>,
        conns_per_pod: Option<usize>,
        handshakes: Option<usize>,
    ) -> Self {
        let defaults = Self::from_fd_limit(nofile);
        let conns_total = conns_total.unwrap_or(defaults.conns_total);
        Self {
            conns_per_pod: conns_per_pod.unwrap_or_else(|| pod_share(conns_total)),
            conns_total,
            handshakes: handshakes.unwrap_or(defaults.handshakes),
        }
    }
}

/// One pod's default share of the node's `conns_total`: a quarter, at least 16.
fn pod_share(conns_total: usize) -> usize {
    (conns_total / 4).max(16)
}

/// A counted share: at most `max` holders at once.
#[derive(Debug)]
pub struct Share {
    held: AtomicUsize,
    max: usize,
}

/// One place in a [`Share`], given back when dropped.
#[derive(Debug)]
pub struct Held(Arc<Share>);

impl Share {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { held: AtomicUsize::new(0), max })
    }

    /// A place, or None when all `max` are held.
    pub fn take(self: &Arc<Self>) -> Option<Held> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Held(self.clone()))
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's places in its pod's share and the node's.
#[derive(Debug)]
pub struct ConnShares {
    pub pod: Arc<Share>,
    pub node: Arc<Share>,
}

impl ConnShares {
    /// Both places, or why not (for the refusal's log line).
    pub fn take(&self) -> Result<(Held, Held), String> {
        let pod = self.pod.take().ok_or_else(|| {
            format!("the pod has {} connections in flight, its limit (--max-conns-per-pod)", self.pod.max())
        })?;
        let node = self.node.take().ok_or_else(|| {
            format!("the node has {} connections in flight, its limit (--max-conns)", self.node.max())
        })?;
        Ok((pod, node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_gives_at_most_max_places_and_takes_them_back_when_dropped() {
        let s = Share::new(2);
        let a = s.take().unwrap();
        let _b = s.take().unwrap();
        assert!(s.take().is_none(), "a third place is refused");
        drop(a);
        assert_eq!(s.held(), 1);
        assert!(s.take().is_some(), "a freed place is given again");
    }

    #[test]
    fn one_pod_cannot_take_the_whole_node_and_the_agent_keeps_a_reserve() {
        let l = Limits::from_fd_limit(20_000);
        assert_eq!(l.conns_total, (20_000 - RESERVE_FDS as usize) / 2);
        assert!(l.conns_per_pod * 2 < 20_000 / 3, "one pod holds under a third of the descriptors: {l:?}");
        assert!(l.handshakes * 8 <= 20_000);
        let tiny = Limits::from_fd_limit(1024);
        assert!(tiny.conns_total >= 64 && tiny.conns_per_pod >= 16, "a low limit still serves: {tiny:?}");
    }

    #[test]
    fn a_pods_default_share_follows_the_node_share_given() {
        assert_eq!(Limits::resolve(20_000, None, None, None), Limits::from_fd_limit(20_000));
        let given = Limits::resolve(20_000, Some(400), None, Some(7));
        assert_eq!((given.conns_total, given.conns_per_pod, given.handshakes), (400, 100, 7));
        assert_eq!(Limits::resolve(20_000, Some(400), Some(3), None).conns_per_pod, 3);
    }

    #[test]
    fn the_node_share_is_checked_after_the_pods_and_both_are_given_back() {
        let shares = ConnShares { pod: Share::new(5), node: Share::new(1) };
        let held = shares.take().unwrap();
        let e = shares.take().unwrap_err();
        assert!(e.contains("--max-conns"), "{e}");
        assert_eq!(shares.pod.held(), 1, "the pod's place taken for the refused one was given back");
        drop(held);
        assert_eq!((shares.pod.held(), shares.node.held()), (0, 0));
    }
}
