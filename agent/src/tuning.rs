//! Process tuning that must happen before `main` does anything else.
//!
//! # Why the agent re-executes itself once
//!
//! Every byte an agent moves across nodes is copied in user space twice: into a TLS record
//! before it is sealed (rustls), and out of a record once it is opened. glibc's `memcpy`
//! does copies of a few KiB and up with `rep movsb` on CPUs that advertise fast string
//! moves. On the lab's AMD EPYC, `rep movsb` crawls when the destination sits a few bytes
//! past the source modulo 4 KiB: a 16 KiB copy ran at 3.4 GB/s in that case, against
//! 46 GB/s for glibc's vector loop. Under one iperf3 stream the copy into TLS records took
//! 28 % of the sending agent's CPU (3.5 times the encryption itself); with `rep movsb` off,
//! 9 %, and the two agents' CPU per GB fell by a seventh (`ARCHITECTURE.md`, Performance).
//!
//! glibc reads its tunables only when a process starts, so `selvedge run` starts itself
//! again, once, with `glibc.cpu.x86_rep_movsb_threshold` raised past any copy it makes
//! (the vector loop then does them all; glibc still switches to non-temporal stores for
//! copies bigger than the cache). An operator who sets that tunable in `GLIBC_TUNABLES`
//! keeps their value; nothing happens with other C libraries, on other architectures, or
//! in secure-execution mode (where glibc ignores tunables).

/// The glibc tunable, and the value that keeps every copy under 1 GiB off `rep movsb`.
const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";
const VALUE: &str = "1073741824";

/// `GLIBC_TUNABLES` as it should be, or `None` when it already names the tunable.
pub fn tunables_with_copy_threshold(current: Option<&str>) -> Option<String> {
    match current.map(str::trim).filter(|s| !s.is_empty()) {
        Some(c) if c.split(':').any(|t| t.split_once('=').map_or(t, |(name, _)| name) == TUNABLE) => None,
        Some(c) => Some(format!("{c}:{TUNABLE}={VALUE}")),
        None => Some(format!("{TUNABLE}={VALUE}")),
    }
}

/// Re-execute this process (same binary, arguments and PID) with the copy threshold set;
/// returns only when that is not needed or not possible (the reason is printed, and the
/// agent runs on untuned: slower, never wrong).
pub fn reexec_with_copy_threshold() {
    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: getauxval reads the auxiliary vector the kernel gave the process.
        if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
            return;
        }
        let current = std::env::var("GLIBC_TUNABLES").ok();
        let Some(value) = tunables_with_copy_threshold(current.as_deref()) else { return };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| "selvedge".into());
        // The binary's own path, so the process keeps its name (`/proc/self/exe` would
        // make it "exe"); that link only when the file was replaced since it started.
        let exe = std::env::current_exe().ok().filter(|p| p.exists()).unwrap_or_else(|| "/proc/self/exe".into());
        let err = std::process::Command::new(exe).arg0(arg0).args(args).env("GLIBC_TUNABLES", value).exec();
        eprintln!("selvedge: could not restart with {TUNABLE} set ({err}); running with glibc's default copies");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_added_beside_other_tunables() {
        let want = format!("{TUNABLE}={VALUE}");
        assert_eq!(tunables_with_copy_threshold(None), Some(want.clone()));
        assert_eq!(tunables_with_copy_threshold(Some(" ")), Some(want.clone()));
        assert_eq!(
            tunables_with_copy_threshold(Some("glibc.malloc.arena_max=2")),
            Some(format!("glibc.malloc.arena_max=2:{want}"))
        );
    }

    #[test]
    fn an_operators_own_threshold_is_kept() {
        assert_eq!(tunables_with_copy_threshold(Some("glibc.cpu.x86_rep_movsb_threshold=4096")), None);
        assert_eq!(
            tunables_with_copy_threshold(Some("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=8192")),
            None
        );
        // A longer name that starts the same is another tunable.
        assert!(tunables_with_copy_threshold(Some("glibc.cpu.x86_rep_movsb_threshold_x=1")).is_some());
    }
}
