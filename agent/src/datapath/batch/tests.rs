//! Batch lookups against real kernel maps made for the test (needs CAP_BPF: run as root).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use super::{delete_all, each_value};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const ARRAY: u32 = 2;
const HASH: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn create(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> OwnedFd {
    let mut attr = CreateAttr { map_type, key_size, value_size, max_entries, ..CreateAttr::default() };
    // SAFETY: a plain attribute struct for BPF_MAP_CREATE.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &raw mut attr, size_of::<CreateAttr>()) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {} (run the tests as root)", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this descriptor to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn put(fd: &OwnedFd, key: &[u8], value: &[u8]) {
    use std::os::fd::AsRawFd;
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..ElemAttr::default()
    };
    // SAFETY: key and value buffers of the map's sizes, alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_ELEM, &raw mut attr, size_of::<ElemAttr>()) };
    assert_eq!(r, 0, "BPF_MAP_UPDATE_ELEM: {}", std::io::Error::last_os_error());
}

#[test]
fn an_arrays_every_slot_is_read() {
    let map = create(ARRAY, 4, 4, 4096);
    for slot in [0u32, 7, 1023, 1024, 4095] {
        put(&map, &slot.to_ne_bytes(), &(slot + 1).to_ne_bytes());
    }
    let mut seen = Vec::new();
    each_value(map.as_fd(), 4, 4, |v| seen.push(u32::from_ne_bytes(v.try_into().unwrap()))).unwrap();
    assert_eq!(seen.len(), 4096, "every slot, set or not");
    let set: Vec<u32> = seen.iter().copied().filter(|v| *v != 0).collect();
    assert_eq!(set, [1, 8, 1024, 1025, 4096]);
}

#[test]
fn a_hash_maps_entries_are_all_read_once() {
    let map = create(HASH, 16, 8, 65536);
    for i in 0..3000u64 {
        put(&map, &[i.to_ne_bytes(), (!i).to_ne_bytes()].concat(), &(i * 3).to_ne_bytes());
    }
    let mut seen = Vec::new();
    each_value(map.as_fd(), 16, 8, |v| seen.push(u64::from_ne_bytes(v.try_into().unwrap()))).unwrap();
    seen.sort_unstable();
    assert_eq!(seen, (0..3000u64).map(|i| i * 3).collect::<Vec<_>>());
}

#[test]
fn an_empty_hash_map_reads_as_empty() {
    let map = create(HASH, 8, 8, 16);
    let mut n = 0;
    each_value(map.as_fd(), 8, 8, |_| n += 1).unwrap();
    assert_eq!(n, 0);
}

#[test]
fn a_hash_map_is_emptied_in_batches() {
    let map = create(HASH, 16, 4, 65536);
    for i in 0..5000u64 {
        put(&map, &[i.to_ne_bytes(), (i * 7).to_ne_bytes()].concat(), &1u32.to_ne_bytes());
    }
    assert_eq!(delete_all(map.as_fd(), 16, 4).unwrap(), 5000);
    let mut left = 0;
    each_value(map.as_fd(), 16, 4, |_| left += 1).unwrap();
    assert_eq!(left, 0, "nothing is left");
    assert_eq!(delete_all(map.as_fd(), 16, 4).unwrap(), 0, "an empty map: nothing to delete");
}
