//! `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_LOOKUP_AND_DELETE_BATCH`: a map's entries many per
//! system call (aya has no batch operations). Array and hash maps have the first, hash maps
//! the second (kernel 5.6 on); sockmaps neither.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;
/// Entries asked for per call (doubled while a hash bucket holds more).
const CHUNK: usize = 1024;
const CHUNK_MAX: usize = 1 << 20;

/// `union bpf_attr`'s `batch` member (`linux/bpf.h`), up to `flags`, the last field the
/// command reads.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Call `each` with every value of the map behind `fd` (keys `key_size`, values
/// `value_size` bytes), in one system call per [`CHUNK`] entries.
pub(super) fn each_value(
    fd: BorrowedFd<'_>,
    key_size: u32,
    value_size: u32,
    each: impl FnMut(&[u8]),
) -> io::Result<()> {
    batches(BPF_MAP_LOOKUP_BATCH, fd, key_size, value_size, each)
}

/// Delete every entry of the hash map behind `fd`, [`CHUNK`] per system call; returns how
/// many there were.
pub(super) fn delete_all(fd: BorrowedFd<'_>, key_size: u32, value_size: u32) -> io::Result<usize> {
    let mut n = 0;
    batches(BPF_MAP_LOOKUP_AND_DELETE_BATCH, fd, key_size, value_size, |_| n += 1)?;
    Ok(n)
}

fn batches(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key_size: u32,
    value_size: u32,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let (ks, vs) = (key_size as usize, value_size.max(1) as usize);
    let mut chunk = CHUNK;
    let mut keys = vec![0u8; ks * chunk];
    let mut values = vec![0u8; vs * chunk];
    // Where the next batch starts: an array's key, a hash map's bucket index (a u32).
    let mut from = vec![0u8; ks.max(8)];
    let mut next = vec![0u8; ks.max(8)];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { from.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            map_fd: fd.as_raw_fd() as u32,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` names buffers of `chunk` keys and `chunk` values and two position
        // buffers at least as large as a key and a bucket index, all alive for the call; the
        // kernel writes the filled count back into `attr`.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw mut attr, std::mem::size_of::<BatchAttr>()) };
        // ENOENT: the last batch (possibly empty).
        let last = r < 0;
        if last {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // A hash bucket holds more entries than asked for: ask for more, from the
                // same place.
                Some(libc::ENOSPC) if chunk < CHUNK_MAX => {
                    chunk *= 2;
                    keys.resize(ks * chunk, 0);
                    values.resize(vs * chunk, 0);
                    continue;
                }
                Some(libc::ENOENT) => {}
                _ => return Err(e),
            }
        }
        let got = (attr.count as usize).min(chunk);
        values[..got * vs].chunks_exact(vs).for_each(&mut each);
        if last || got == 0 {
            return Ok(());
        }
        std::mem::swap(&mut from, &mut next);
        first = false;
    }
}

#[cfg(test)]
mod tests;
