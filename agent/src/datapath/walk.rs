//! What the kernel holds, read from the pins alone, so that it can be read on a thread of
//! its own. Walking the maps is thousands of system calls (the 4,096-slot array alone is
//! one lookup per slot, a hash map one per key); done on the runtime's thread it stalled
//! every connection the agent carries for about 10 ms every 5 s.

use std::{os::fd::AsFd, path::PathBuf};

use aya::maps::{Map, MapData, MapInfo, SockHash};
use selvedge_common::{maps, PairKey};

use super::batch;

/// Reads the pinned maps and links under one pin directory. Cheap to clone; every walk
/// opens the pins afresh (a few system calls), so it sees whatever is pinned now.
#[derive(Debug, Clone)]
pub struct KernelWalk {
    pin_dir: PathBuf,
}

/// What one walk found.
#[derive(Debug, Default, Clone)]
pub struct KernelFacts {
    /// (map, entries, capacity); 0 and 0 for a map whose pin could not be read.
    pub maps: Vec<(&'static str, u64, u64)>,
    /// (link, program id, program name, program type)
    pub programs: Vec<(String, u32, String, String)>,
}

impl KernelWalk {
    pub(super) fn new(pin_dir: PathBuf) -> Self {
        Self { pin_dir }
    }

    /// Walk the maps and the links. Blocking: run it off the runtime's threads. The inbound
    /// listener map cannot be read back (see `Datapath::inbound_set`), so its entry count,
    /// `inbound_set`, is what the agent set.
    pub fn walk(&self, inbound_set: u64) -> KernelFacts {
        let any = |_: &[u8]| true;
        let enrolled = self.count(maps::ENROLLED, any);
        let slots = self.count(maps::SLOTS, |v| v.iter().any(|b| *b != 0));
        let orig = self.count(maps::ORIG_DST, any);
        let pairs = self.count_sockhash(maps::PAIRS);
        let inbound_cap =
            MapInfo::from_pin(self.pin(maps::INBOUND_LISTENERS)).map_or(0, |i| u64::from(i.max_entries()));
        KernelFacts {
            maps: vec![
                (maps::ENROLLED, enrolled.0, enrolled.1),
                (maps::SLOTS, slots.0, slots.1),
                (maps::INBOUND_LISTENERS, inbound_set, inbound_cap),
                (maps::ORIG_DST, orig.0, orig.1),
                (maps::PAIRS, pairs.0, pairs.1),
            ],
            programs: self.programs(),
        }
    }

    fn pin(&self, map: &str) -> PathBuf {
        self.pin_dir.join("maps").join(map)
    }

    /// (entries whose value `counts`, capacity) of the pinned array or hash map `name`,
    /// read a batch of entries per system call; (0, 0) when the pin cannot be read.
    fn count(&self, name: &str, counts: impl Fn(&[u8]) -> bool) -> (u64, u64) {
        let Ok(data) = MapData::from_pin(self.pin(name)) else { return (0, 0) };
        let Ok(info) = data.info() else { return (0, 0) };
        let mut n = 0u64;
        let read = batch::each_value(data.fd().as_fd(), info.key_size(), info.value_size(), |v| {
            n += u64::from(counts(v));
        });
        if let Err(e) = read {
            tracing::debug!(map = name, "batch lookup failed: {e}");
        }
        (n, u64::from(info.max_entries()))
    }

    /// A sockhash has no batch lookup: its keys one by one (it is empty unless the fast
    /// path is on).
    fn count_sockhash(&self, name: &str) -> (u64, u64) {
        let Ok(data) = MapData::from_pin(self.pin(name)) else { return (0, 0) };
        let capacity = data.info().map_or(0, |i| u64::from(i.max_entries()));
        let entries = Map::from_map_data(data)
            .and_then(SockHash::<_, PairKey>::try_from)
            .map_or(0, |m| m.keys().filter(Result::is_ok).count() as u64);
        (entries, capacity)
    }

    /// Each pinned link and the program the kernel has attached through it: (link, program
    /// id, program name, program type).
    fn programs(&self) -> Vec<(String, u32, String, String)> {
        let mut by_id = std::collections::BTreeMap::new();
        for info in aya::programs::loaded_programs().filter_map(Result::ok) {
            let name = info.name_as_str().unwrap_or_default().to_string();
            by_id.insert(info.id(), (name, format!("{:?}", info.program_type())));
        }
        super::links(&self.pin_dir)
            .into_iter()
            .map(|link| {
                let path = self.pin_dir.join("links").join(&link);
                let prog = aya::programs::links::PinnedLink::from_pin(&path)
                    .ok()
                    .and_then(|p| aya::programs::links::FdLink::from(p).info().ok())
                    .map(|i| i.program_id())
                    .unwrap_or(0);
                let (name, kind) = by_id.get(&prog).cloned().unwrap_or_else(|| ("?".into(), "?".into()));
                (link, prog, name, kind)
            })
            .collect()
    }
}
