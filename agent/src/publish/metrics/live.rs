//! The open connections, for `/connections` and `selvedge connections`.
//!
//! One entry per open connection, held for its whole life, so an entry is kept small: the
//! names it shares with other connections (pod, namespace, identities) are one interned copy
//! each; the words it takes from a fixed set (direction, security) are a byte each; the
//! addresses are an address and a port, not a socket address sized for IPv6 flow labels.
//! The listing is built from them when asked.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use crate::addr::Compact;

/// An open connection to list, in the words of its record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listing<'a> {
    pub direction: &'static str,
    pub pod: &'a str,
    pub namespace: &'a str,
    /// Serialized as "ip:port".
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub security: &'static str,
    pub src_identity: &'a str,
    pub dst_identity: &'a str,
}

/// One open connection, as `/connections` and `selvedge connections` show it: its id,
/// its listing's fields, when it opened. Borrows from the registry: a listing takes no
/// reference to a shared name, so it can never keep one alive (a name is forgotten when
/// the last connection naming it goes).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveConnection<'a> {
    pub id: u64,
    #[serde(flatten)]
    pub conn: Listing<'a>,
    pub opened_unix_ms: u64,
}

/// What is held per open connection (its id is the key).
#[derive(Debug)]
struct Held {
    pod: Arc<str>,
    namespace: Arc<str>,
    src_identity: Arc<str>,
    dst_identity: Arc<str>,
    opened_unix_ms: u64,
    src: Compact,
    dst: Compact,
    direction: u8,
    security: u8,
}

/// A unique id per connection, for the admin API's connection list.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// The open connections and the names and words they share.
#[derive(Default)]
pub struct Live {
    conns: BTreeMap<u64, Held>,
    names: HashSet<Arc<str>>,
    /// The fixed-set words entries refer to by index.
    words: Vec<&'static str>,
}

impl Live {
    /// List an open connection; returns its id.
    pub fn track(&mut self, c: &Listing<'_>, opened_unix_ms: u64) -> u64 {
        let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        let held = Held {
            pod: self.intern(c.pod),
            namespace: self.intern(c.namespace),
            src_identity: self.intern(c.src_identity),
            dst_identity: self.intern(c.dst_identity),
            opened_unix_ms,
            src: c.src.into(),
            dst: c.dst.into(),
            direction: self.word(c.direction),
            security: self.word(c.security),
        };
        self.conns.insert(id, held);
        id
    }

    pub fn untrack(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            for name in [c.pod, c.namespace, c.src_identity, c.dst_identity] {
                self.release(name);
            }
        }
    }

    /// Every open connection, oldest first.
    pub fn list(&self) -> Vec<LiveConnection<'_>> {
        let word = |i: u8| self.words.get(usize::from(i)).copied().unwrap_or("unknown");
        self.conns
            .iter()
            .map(|(&id, c)| LiveConnection {
                id,
                conn: Listing {
                    direction: word(c.direction),
                    pod: &c.pod,
                    namespace: &c.namespace,
                    src: c.src.into(),
                    dst: c.dst.into(),
                    security: word(c.security),
                    src_identity: &c.src_identity,
                    dst_identity: &c.dst_identity,
                },
                opened_unix_ms: c.opened_unix_ms,
            })
            .collect()
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.names.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.names.insert(a.clone());
        a
    }

    /// One connection's reference is going: the set forgets a name nobody else holds.
    fn release(&mut self, name: Arc<str>) {
        if Arc::strong_count(&name) == 2 {
            self.names.remove(&name);
        }
    }

    /// The index of a fixed-set word (a handful exist: directions, securities).
    fn word(&mut self, w: &'static str) -> u8 {
        if let Some(i) = self.words.iter().position(|&x| x == w) {
            return i as u8;
        }
        if self.words.len() > usize::from(u8::MAX) {
            return u8::MAX; // cannot happen with the callers' words; listed as "unknown"
        }
        self.words.push(w);
        (self.words.len() - 1) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing<'a>(direction: &'static str, pod: &'a str, src: &str) -> Listing<'a> {
        Listing {
            direction,
            pod,
            namespace: "lab",
            src: src.parse().unwrap(),
            dst: "[2001:db8::1]:8080".parse().unwrap(),
            security: "mutual_tls",
            src_identity: "spiffe://td/ns/lab/sa/a",
            dst_identity: "spiffe://td/ns/lab/sa/b",
        }
    }

    #[test]
    fn lists_what_was_tracked_and_forgets_names_with_their_last_connection() {
        let mut live = Live::default();
        let a = live.track(&listing("outbound", "web", "198.18.0.1:40000"), 7);
        let b = live.track(&listing("inbound", "web", "198.18.0.2:40001"), 8);
        let list = live.list();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].id, list[0].conn.direction, list[0].opened_unix_ms), (a, "outbound", 7));
        assert_eq!((list[1].id, list[1].conn.direction, list[1].conn.security), (b, "inbound", "mutual_tls"));
        assert_eq!(list[1].conn.src, "198.18.0.2:40001".parse::<SocketAddr>().unwrap());
        assert_eq!(list[1].conn.dst, "[2001:db8::1]:8080".parse::<SocketAddr>().unwrap());
        assert!(std::ptr::eq(list[0].conn.pod, list[1].conn.pod), "one shared copy of each name");
        // The JSON the admin API serves: the listing's fields beside the id, as before.
        let json = serde_json::to_value(&list[1]).unwrap();
        assert_eq!(json["id"], b);
        assert_eq!(json["src"], "198.18.0.2:40001");
        assert_eq!(json["dst_identity"], "spiffe://td/ns/lab/sa/b");
        assert_eq!(json["opened_unix_ms"], 8);
        live.untrack(a);
        assert_eq!(live.names.len(), 4, "still named by the other connection");
        live.untrack(b);
        assert!(live.conns.is_empty() && live.names.is_empty());
    }

    #[test]
    fn an_entry_is_small() {
        // Held for each open connection's whole life (with its key in the map's node).
        assert!(std::mem::size_of::<Held>() <= 120, "{}", std::mem::size_of::<Held>());
    }
}
