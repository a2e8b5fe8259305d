//! Applies a seccomp profile in the format the kubelet hands a container runtime for a
//! `Localhost` profile (the OCI / Docker JSON: `defaultAction`, `syscalls` with `names`,
//! `action`, `errnoRet` and `args`), with the kernel's own seccomp — the lab's way to run
//! the agent under `deploy/seccomp/selvedge-agent.json` exactly as the DaemonSet does.
//!
//! It compiles the subset that profile uses: actions `SCMP_ACT_ALLOW`, `SCMP_ACT_ERRNO`
//! (with `errnoRet`/`defaultErrnoRet`), `SCMP_ACT_LOG`, `SCMP_ACT_KILL_PROCESS`; argument
//! conditions `SCMP_CMP_EQ` and `SCMP_CMP_MASKED_EQ`. Anything else, and a syscall name it
//! does not know, is an error rather than a filter that means something else. Rules are
//! tried in order, the first match decides; 32-bit and x32 calls are killed, as libseccomp
//! does for an architecture the profile does not list.

use std::{io, path::PathBuf};

/// The DaemonSet's profile for the agent container.
pub fn agent_profile() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy").join("seccomp").join("selvedge-agent.json")
}

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Profile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    syscalls: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    names: Vec<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<Arg>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Arg {
    index: u32,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

/// A compiled filter, ready to install in a child before it executes.
#[derive(Debug, Clone)]
pub struct Filter(Vec<libc::sock_filter>);

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
// struct seccomp_data: nr at 0, arch at 4, args at 16 (8 bytes each, low word first).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt, jf, k }
}

const LD_W_ABS: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const JEQ_K: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const JGE_K: u32 = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
const AND_K: u32 = libc::BPF_ALU | libc::BPF_AND | libc::BPF_K;
const RET_K: u32 = libc::BPF_RET | libc::BPF_K;

fn action(name: &str, errno: Option<u32>) -> Result<u32, String> {
    match name {
        "SCMP_ACT_ALLOW" => Ok(RET_ALLOW),
        "SCMP_ACT_ERRNO" => Ok(RET_ERRNO | (errno.unwrap_or(libc::EPERM as u32) & 0xffff)),
        "SCMP_ACT_LOG" => Ok(RET_LOG),
        "SCMP_ACT_KILL_PROCESS" => Ok(RET_KILL_PROCESS),
        other => Err(format!("action {other} is not supported here")),
    }
}

impl Filter {
    /// Compile `profile` (JSON) for this machine (x86-64). `default_override` replaces
    /// the default action (e.g. `SCMP_ACT_LOG`, to find what a program would be refused).
    pub fn compile(profile: &str, default_override: Option<&str>) -> Result<Self, String> {
        if !cfg!(target_arch = "x86_64") {
            return Err("the lab compiles seccomp profiles for x86-64 only".into());
        }
        let p: Profile = serde_json::from_str(profile).map_err(|e| format!("profile: {e}"))?;
        if !p.architectures.iter().any(|a| a == "SCMP_ARCH_X86_64") {
            return Err("the profile does not list SCMP_ARCH_X86_64".into());
        }
        let default = action(default_override.unwrap_or(&p.default_action), p.default_errno_ret)?;
        let mut prog = vec![
            stmt(LD_W_ABS, OFF_ARCH),
            jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
            stmt(RET_K, RET_KILL_PROCESS),
            stmt(LD_W_ABS, OFF_NR),
            jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
            stmt(RET_K, RET_KILL_PROCESS),
        ];
        for rule in &p.syscalls {
            let ret = action(&rule.action, rule.errno_ret)?;
            for name in &rule.names {
                let nr = number(name).ok_or_else(|| format!("syscall {name} is not in the lab's table"))?;
                prog.extend(rule_block(nr, &rule.args, ret)?);
            }
        }
        prog.push(stmt(RET_K, default));
        Ok(Self(prog))
    }

    /// Install it on the calling thread, for good (no_new_privs first, as runtimes do).
    /// Async-signal-safe: meant for `pre_exec`.
    pub fn install(&self) -> io::Result<()> {
        let prog = libc::sock_fprog { len: self.0.len() as u16, filter: self.0.as_ptr().cast_mut() };
        // SAFETY: plain prctl/seccomp calls; `prog` points into `self`, alive for the call.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::syscall(libc::SYS_seccomp, 1 /* SECCOMP_SET_MODE_FILTER */, 0, &prog) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// `if nr == NR && every condition holds: return RET`; the accumulator holds the
/// syscall number again when the block falls through.
fn rule_block(nr: u32, args: &[Arg], ret: u32) -> Result<Vec<libc::sock_filter>, String> {
    let mut conds = Vec::new();
    for a in args {
        if a.index > 5 {
            return Err(format!("argument index {}", a.index));
        }
        let (mask, want) = match a.op.as_str() {
            "SCMP_CMP_EQ" => (u64::MAX, a.value),
            "SCMP_CMP_MASKED_EQ" => (a.value, a.value_two),
            other => return Err(format!("operator {other} is not supported here")),
        };
        let base = OFF_ARGS + 8 * a.index;
        for (off, shift) in [(base, 0), (base + 4, 32)] {
            conds.push((off, (mask >> shift) as u32, (want >> shift) as u32));
        }
    }
    // Each condition: load, and, compare (3 instructions); on a mismatch, jump to the
    // reload of the number at the end.
    let body = conds.len() * 3 + 1; // + the return
    let skip = u8::try_from(body + usize::from(!conds.is_empty())).map_err(|_| "rule too long".to_string())?;
    let mut out = vec![jump(JEQ_K, nr, 0, skip)];
    for (i, (off, mask, want)) in conds.iter().enumerate() {
        let to_reload = u8::try_from((conds.len() - i - 1) * 3 + 1).map_err(|_| "rule too long".to_string())?;
        out.push(stmt(LD_W_ABS, *off));
        out.push(stmt(AND_K, *mask));
        out.push(jump(JEQ_K, *want, 0, to_reload));
    }
    out.push(stmt(RET_K, ret));
    if !conds.is_empty() {
        out.push(stmt(LD_W_ABS, OFF_NR));
    }
    Ok(out)
}

/// The x86-64 number of a syscall the profiles here name (and of the ones the tests show
/// refused).
pub fn number(name: &str) -> Option<u32> {
    let nr = match name {
        "accept" => libc::SYS_accept,
        "accept4" => libc::SYS_accept4,
        "access" => libc::SYS_access,
        "alarm" => libc::SYS_alarm,
        "arch_prctl" => libc::SYS_arch_prctl,
        "bind" => libc::SYS_bind,
        "bpf" => libc::SYS_bpf,
        "brk" => libc::SYS_brk,
        "capget" => libc::SYS_capget,
        "capset" => libc::SYS_capset,
        "chdir" => libc::SYS_chdir,
        "chmod" => libc::SYS_chmod,
        "clock_getres" => libc::SYS_clock_getres,
        "clock_gettime" => libc::SYS_clock_gettime,
        "clock_nanosleep" => libc::SYS_clock_nanosleep,
        "clone" => libc::SYS_clone,
        "clone3" => libc::SYS_clone3,
        "close" => libc::SYS_close,
        "close_range" => libc::SYS_close_range,
        "connect" => libc::SYS_connect,
        "copy_file_range" => libc::SYS_copy_file_range,
        "creat" => libc::SYS_creat,
        "dup" => libc::SYS_dup,
        "dup2" => libc::SYS_dup2,
        "dup3" => libc::SYS_dup3,
        "epoll_create" => libc::SYS_epoll_create,
        "epoll_create1" => libc::SYS_epoll_create1,
        "epoll_ctl" => libc::SYS_epoll_ctl,
        "epoll_pwait" => libc::SYS_epoll_pwait,
        "epoll_pwait2" => libc::SYS_epoll_pwait2,
        "epoll_wait" => libc::SYS_epoll_wait,
        "eventfd" => libc::SYS_eventfd,
        "eventfd2" => libc::SYS_eventfd2,
        "execve" => libc::SYS_execve,
        "exit" => libc::SYS_exit,
        "exit_group" => libc::SYS_exit_group,
        "faccessat" => libc::SYS_faccessat,
        "faccessat2" => libc::SYS_faccessat2,
        "fadvise64" => libc::SYS_fadvise64,
        "fallocate" => libc::SYS_fallocate,
        "fchdir" => libc::SYS_fchdir,
        "fchmod" => libc::SYS_fchmod,
        "fchmodat" => libc::SYS_fchmodat,
        "fcntl" => libc::SYS_fcntl,
        "fdatasync" => libc::SYS_fdatasync,
        "finit_module" => libc::SYS_finit_module,
        "flock" => libc::SYS_flock,
        "fstat" => libc::SYS_fstat,
        "fstatfs" => libc::SYS_fstatfs,
        "fsync" => libc::SYS_fsync,
        "ftruncate" => libc::SYS_ftruncate,
        "futex" => libc::SYS_futex,
        "futex_waitv" => libc::SYS_futex_waitv,
        "get_robust_list" => libc::SYS_get_robust_list,
        "getcwd" => libc::SYS_getcwd,
        "getdents" => libc::SYS_getdents,
        "getdents64" => libc::SYS_getdents64,
        "getegid" => libc::SYS_getegid,
        "geteuid" => libc::SYS_geteuid,
        "getgid" => libc::SYS_getgid,
        "getgroups" => libc::SYS_getgroups,
        "getpeername" => libc::SYS_getpeername,
        "getpgid" => libc::SYS_getpgid,
        "getpgrp" => libc::SYS_getpgrp,
        "getpid" => libc::SYS_getpid,
        "getppid" => libc::SYS_getppid,
        "getpriority" => libc::SYS_getpriority,
        "getrandom" => libc::SYS_getrandom,
        "getresgid" => libc::SYS_getresgid,
        "getresuid" => libc::SYS_getresuid,
        "getrlimit" => libc::SYS_getrlimit,
        "getrusage" => libc::SYS_getrusage,
        "getsid" => libc::SYS_getsid,
        "getsockname" => libc::SYS_getsockname,
        "getsockopt" => libc::SYS_getsockopt,
        "gettid" => libc::SYS_gettid,
        "gettimeofday" => libc::SYS_gettimeofday,
        "getuid" => libc::SYS_getuid,
        "init_module" => libc::SYS_init_module,
        "inotify_add_watch" => libc::SYS_inotify_add_watch,
        "inotify_init" => libc::SYS_inotify_init,
        "inotify_init1" => libc::SYS_inotify_init1,
        "inotify_rm_watch" => libc::SYS_inotify_rm_watch,
        "io_uring_setup" => libc::SYS_io_uring_setup,
        "ioctl" => libc::SYS_ioctl,
        "kexec_load" => libc::SYS_kexec_load,
        "keyctl" => libc::SYS_keyctl,
        "kill" => libc::SYS_kill,
        "link" => libc::SYS_link,
        "linkat" => libc::SYS_linkat,
        "listen" => libc::SYS_listen,
        "lseek" => libc::SYS_lseek,
        "lstat" => libc::SYS_lstat,
        "madvise" => libc::SYS_madvise,
        "membarrier" => libc::SYS_membarrier,
        "mincore" => libc::SYS_mincore,
        "mkdir" => libc::SYS_mkdir,
        "mkdirat" => libc::SYS_mkdirat,
        "mmap" => libc::SYS_mmap,
        "mount" => libc::SYS_mount,
        "mprotect" => libc::SYS_mprotect,
        "mremap" => libc::SYS_mremap,
        "msync" => libc::SYS_msync,
        "munmap" => libc::SYS_munmap,
        "nanosleep" => libc::SYS_nanosleep,
        "newfstatat" => libc::SYS_newfstatat,
        "open" => libc::SYS_open,
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "openat" => libc::SYS_openat,
        "openat2" => libc::SYS_openat2,
        "pause" => libc::SYS_pause,
        "perf_event_open" => libc::SYS_perf_event_open,
        "pipe" => libc::SYS_pipe,
        "pipe2" => libc::SYS_pipe2,
        "pivot_root" => libc::SYS_pivot_root,
        "poll" => libc::SYS_poll,
        "ppoll" => libc::SYS_ppoll,
        "prctl" => libc::SYS_prctl,
        "pread64" => libc::SYS_pread64,
        "preadv" => libc::SYS_preadv,
        "preadv2" => libc::SYS_preadv2,
        "prlimit64" => libc::SYS_prlimit64,
        "pselect6" => libc::SYS_pselect6,
        "ptrace" => libc::SYS_ptrace,
        "pwrite64" => libc::SYS_pwrite64,
        "pwritev" => libc::SYS_pwritev,
        "pwritev2" => libc::SYS_pwritev2,
        "read" => libc::SYS_read,
        "readlink" => libc::SYS_readlink,
        "readlinkat" => libc::SYS_readlinkat,
        "readv" => libc::SYS_readv,
        "recvfrom" => libc::SYS_recvfrom,
        "recvmmsg" => libc::SYS_recvmmsg,
        "recvmsg" => libc::SYS_recvmsg,
        "rename" => libc::SYS_rename,
        "renameat" => libc::SYS_renameat,
        "renameat2" => libc::SYS_renameat2,
        "restart_syscall" => libc::SYS_restart_syscall,
        "rmdir" => libc::SYS_rmdir,
        "rseq" => libc::SYS_rseq,
        "rt_sigaction" => libc::SYS_rt_sigaction,
        "rt_sigpending" => libc::SYS_rt_sigpending,
        "rt_sigprocmask" => libc::SYS_rt_sigprocmask,
        "rt_sigreturn" => libc::SYS_rt_sigreturn,
        "rt_sigsuspend" => libc::SYS_rt_sigsuspend,
        "rt_sigtimedwait" => libc::SYS_rt_sigtimedwait,
        "sched_getaffinity" => libc::SYS_sched_getaffinity,
        "sched_getparam" => libc::SYS_sched_getparam,
        "sched_getscheduler" => libc::SYS_sched_getscheduler,
        "sched_setaffinity" => libc::SYS_sched_setaffinity,
        "sched_yield" => libc::SYS_sched_yield,
        "select" => libc::SYS_select,
        "sendfile" => libc::SYS_sendfile,
        "sendmmsg" => libc::SYS_sendmmsg,
        "sendmsg" => libc::SYS_sendmsg,
        "sendto" => libc::SYS_sendto,
        "set_robust_list" => libc::SYS_set_robust_list,
        "set_tid_address" => libc::SYS_set_tid_address,
        "setns" => libc::SYS_setns,
        "setrlimit" => libc::SYS_setrlimit,
        "setsockopt" => libc::SYS_setsockopt,
        "shutdown" => libc::SYS_shutdown,
        "sigaltstack" => libc::SYS_sigaltstack,
        "signalfd" => libc::SYS_signalfd,
        "signalfd4" => libc::SYS_signalfd4,
        "socket" => libc::SYS_socket,
        "socketpair" => libc::SYS_socketpair,
        "splice" => libc::SYS_splice,
        "stat" => libc::SYS_stat,
        "statfs" => libc::SYS_statfs,
        "statx" => libc::SYS_statx,
        "symlink" => libc::SYS_symlink,
        "symlinkat" => libc::SYS_symlinkat,
        "sysinfo" => libc::SYS_sysinfo,
        "tee" => libc::SYS_tee,
        "tgkill" => libc::SYS_tgkill,
        "time" => libc::SYS_time,
        "timerfd_create" => libc::SYS_timerfd_create,
        "timerfd_gettime" => libc::SYS_timerfd_gettime,
        "timerfd_settime" => libc::SYS_timerfd_settime,
        "tkill" => libc::SYS_tkill,
        "truncate" => libc::SYS_truncate,
        "umask" => libc::SYS_umask,
        "umount2" => libc::SYS_umount2,
        "uname" => libc::SYS_uname,
        "unlink" => libc::SYS_unlink,
        "unlinkat" => libc::SYS_unlinkat,
        "unshare" => libc::SYS_unshare,
        "utimensat" => libc::SYS_utimensat,
        "wait4" => libc::SYS_wait4,
        "waitid" => libc::SYS_waitid,
        "write" => libc::SYS_write,
        "writev" => libc::SYS_writev,
        _ => return None,
    };
    u32::try_from(nr).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_the_agents_profile_and_refuses_what_it_cannot_mean() {
        let text = std::fs::read_to_string(agent_profile()).unwrap();
        Filter::compile(&text, None).expect("every name and rule of the shipped profile");
        let bad = |syscalls: &str| {
            let p = format!(
                r#"{{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64"],"syscalls":[{syscalls}]}}"#
            );
            Filter::compile(&p, None).unwrap_err()
        };
        assert!(bad(r#"{"names":["no_such_call"],"action":"SCMP_ACT_ALLOW"}"#).contains("no_such_call"));
        assert!(bad(r#"{"names":["read"],"action":"SCMP_ACT_TRACE"}"#).contains("SCMP_ACT_TRACE"));
        assert!(bad(
            r#"{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":1,"op":"SCMP_CMP_GT"}]}"#
        )
        .contains("SCMP_CMP_GT"));
        assert!(bad(r#"{"names":["read"],"action":"SCMP_ACT_ALLOW","includes":{}}"#).contains("includes"));
        let no_arch = r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_AARCH64"]}"#;
        assert!(Filter::compile(no_arch, None).is_err());
    }

    #[test]
    fn a_rule_with_a_condition_falls_through_with_the_number_reloaded() {
        let block = rule_block(
            56,
            &[Arg { index: 0, value: 0x7E02_0000, value_two: 0, op: "SCMP_CMP_MASKED_EQ".into() }],
            RET_ALLOW,
        )
        .unwrap();
        // jeq nr; 2 × (ld, and, jeq); ret; ld nr
        assert_eq!(block.len(), 1 + 6 + 1 + 1);
        assert_eq!(block[0].jf, 8, "a different number skips the whole block");
        assert_eq!((block[3].jf, block[6].jf), (4, 1), "a failed condition lands on the reload");
        assert_eq!(block[8].k, OFF_NR);
    }
}
