//! The seccomp allowlist of the serving process: the system calls that the queue workers,
//! the transports, io_uring, the NBD client (with TLS) and librbd make, and nothing that
//! starts programs, changes identity, loads code into the kernel, traces or mounts. A call
//! outside the list kills the process (the helper, or the exit status, says so); `--sandbox
//! off` is the way to find which one was missing (strace -f).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // I/O on descriptors
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_flock,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_memfd_create,
    libc::SYS_copy_file_range,
    // files (state file, RBD records and config, /proc and /sys reads)
    libc::SYS_openat,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdirat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_umask,
    libc::SYS_fadvise64,
    libc::SYS_readahead,
    libc::SYS_signalfd4,
    libc::SYS_getcpu,
    libc::SYS_setitimer,
    libc::SYS_getitimer,
    // waiting
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_restart_syscall,
    // memory
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_mincore,
    libc::SYS_membarrier,
    // threads and signals
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_getpriority,
    libc::SYS_prctl,
    libc::SYS_getrlimit,
    libc::SYS_setrlimit,
    libc::SYS_getrusage,
    libc::SYS_times,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_getrandom,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_capget,
    // sockets (vhost-user, NBD, Ceph, vdpa netlink, the helper)
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_socketpair,
    // io_uring
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// The x86-64 system calls that newer architectures do without (they have the `*at`, `p*`
/// and `epoll_pwait` forms only).
#[cfg(target_arch = "x86_64")]
const LEGACY: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_epoll_create,
    libc::SYS_epoll_wait,
    libc::SYS_rename,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_lchown,
    libc::SYS_readlink,
    libc::SYS_arch_prctl,
    libc::SYS_dup2,
];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY: &[libc::c_long] = &[];

/// ioctl requests refused whatever the descriptor: typing into a terminal (TIOCSTI), the
/// console's commands (TIOCLINUX), and making the kernel signal another process (a socket's
/// owner: FIOSETOWN, SIOCSPGRP; FIOASYNC).
const REFUSED_IOCTLS: &[u64] = &[0x5412, 0x541C, 0x8901, 0x8902, 0x5452];

/// fcntl commands refused: those that make the kernel signal another process (SIGIO to an
/// owner of our choosing).
const SIGNALLING_FCNTLS: &[u64] = &[
    libc::F_SETOWN as u64,
    10,  // F_SETSIG
    0xf, // F_SETOWN_EX
];

/// Socket families the process may open.
const SOCKET_FAMILIES: &[libc::c_int] = &[
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

fn arg_equals(arg: u8, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(|e| e.to_string())
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: {e:?}"))?;
    SeccompFilter::new(rules, mismatch, matched, arch)
        .and_then(BpfProgram::try_from)
        .map_err(|e| format!("seccomp: {e}"))
}

/// The allowlist (kill the process on anything else) and, in front of it, clone3 answered
/// with ENOSYS: its flags sit behind a pointer a filter cannot read, so the C library falls
/// back to clone, whose flags are checked to start threads only.
fn programs() -> Result<[BpfProgram; 2], String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain(LEGACY)
        .map(|&n| (n, Vec::new()))
        .collect();
    let rule =
        |conditions: Vec<SeccompCondition>| SeccompRule::new(conditions).map_err(|e| e.to_string());
    let none_of = |arg: u8, values: &[u64]| -> Result<Vec<SeccompRule>, String> {
        let conditions = values
            .iter()
            .map(|&v| {
                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, v)
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(vec![rule(conditions)?])
    };
    rules.insert(libc::SYS_ioctl, none_of(1, REFUSED_IOCTLS)?);
    rules.insert(libc::SYS_fcntl, none_of(1, SIGNALLING_FCNTLS)?);
    // These act on this process or thread only (pid 0): not on another of the same user.
    rules.insert(libc::SYS_prlimit64, vec![rule(vec![arg_equals(0, 0)?])?]);
    rules.insert(
        libc::SYS_sched_setaffinity,
        vec![rule(vec![arg_equals(0, 0)?])?],
    );
    rules.insert(
        libc::SYS_setpriority,
        vec![rule(vec![
            arg_equals(0, libc::PRIO_PROCESS as u64)?,
            arg_equals(1, 0)?,
        ])?],
    );
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .map_err(|e| e.to_string())?;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![thread]).map_err(|e| e.to_string())?],
    );
    let mut families = Vec::new();
    for &f in SOCKET_FAMILIES {
        families.push(SeccompRule::new(vec![arg_equals(0, f as u64)?]).map_err(|e| e.to_string())?);
    }
    rules.insert(libc::SYS_socket, families);
    // Signals to this process only (an export wakes its own main thread; abort raises).
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u64;
    rules.insert(
        libc::SYS_kill,
        vec![SeccompRule::new(vec![arg_equals(0, me)?]).map_err(|e| e.to_string())?],
    );
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![arg_equals(0, me)?]).map_err(|e| e.to_string())?],
    );
    let allow = compile(rules, SeccompAction::KillProcess, SeccompAction::Allow)?;
    let no_clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    // The allowlist last: once it is in, installing another filter would be refused.
    Ok([no_clone3, allow])
}

/// Sets no_new_privs and installs the filters on this thread (and so on every thread it
/// starts from now on).
pub fn apply() -> Result<(), String> {
    for program in programs()? {
        seccompiler::apply_filter(&program)
            .map_err(|e| format!("cannot enter the sandbox: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child under the filters: its wait status.
    fn in_sandboxed_child(body: fn()) -> i32 {
        let programs = programs().unwrap();
        // SAFETY: fork in a multi-threaded test process: the child uses only what glibc keeps
        // usable after fork (its allocator included, which it resets in the child), installs
        // the filters compiled before, and ends with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            for p in &programs {
                if seccompiler::apply_filter(p).is_err() {
                    unsafe { libc::_exit(2) };
                }
            }
            body();
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn a_forbidden_call_kills_the_process() {
        fn exec() {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            // SAFETY: a NUL-terminated path and argv.
            unsafe { libc::execve(argv[0], argv.as_ptr(), std::ptr::null()) };
        }
        let status = in_sandboxed_child(exec);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);

        fn setuid() {
            // SAFETY: plain integer.
            unsafe { libc::syscall(libc::SYS_setuid, 0) };
        }
        assert_eq!(libc::WTERMSIG(in_sandboxed_child(setuid)), libc::SIGSYS);

        fn fork_a_process() {
            // SAFETY: clone without CLONE_THREAD would make a process: the filter kills first.
            unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
        }
        assert_eq!(
            libc::WTERMSIG(in_sandboxed_child(fork_a_process)),
            libc::SIGSYS
        );

        fn type_into_the_terminal() {
            let c = 0u8;
            // SAFETY: TIOCSTI reads one byte through the pointer.
            unsafe { libc::ioctl(0, 0x5412, &c) };
        }
        assert_eq!(
            libc::WTERMSIG(in_sandboxed_child(type_into_the_terminal)),
            libc::SIGSYS
        );

        fn signal_another_process() {
            // SAFETY: plain integers (init as the SIGIO owner of stdin).
            unsafe { libc::fcntl(0, libc::F_SETOWN, 1) };
        }
        assert_eq!(
            libc::WTERMSIG(in_sandboxed_child(signal_another_process)),
            libc::SIGSYS
        );

        fn own_a_socket_for_another() {
            let pid: libc::c_int = 1;
            // SAFETY: a unix socket, and FIOSETOWN reading an int.
            unsafe {
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::ioctl(s, 0x8901, &pid);
            }
        }
        assert_eq!(
            libc::WTERMSIG(in_sandboxed_child(own_a_socket_for_another)),
            libc::SIGSYS
        );

        fn lower_the_users_priority() {
            // SAFETY: plain integers.
            unsafe { libc::setpriority(libc::PRIO_USER, 0, 19) };
        }
        assert_eq!(
            libc::WTERMSIG(in_sandboxed_child(lower_the_users_priority)),
            libc::SIGSYS
        );

        fn kill_another_process() {
            // SAFETY: signal 0 only checks; the filter kills before.
            unsafe { libc::kill(1, 0) };
        }
        assert_eq!(
            libc::WTERMSIG(in_sandboxed_child(kill_another_process)),
            libc::SIGSYS
        );

        fn raw_socket() {
            // SAFETY: plain integers.
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        }
        assert_eq!(libc::WTERMSIG(in_sandboxed_child(raw_socket)), libc::SIGSYS);
    }

    #[test]
    fn what_serving_needs_is_allowed() {
        fn work() {
            // A thread (clone3 refused, clone with CLONE_THREAD allowed), a unix socket, an
            // eventfd, a file read.
            let t = std::thread::spawn(|| 7);
            if t.join().ok() != Some(7) {
                unsafe { libc::_exit(3) };
            }
            // SAFETY: plain integers.
            let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            let e = unsafe { libc::eventfd(0, 0) };
            if s < 0 || e < 0 || std::fs::read("/proc/self/status").is_err() {
                unsafe { libc::_exit(4) };
            }
        }
        let status = in_sandboxed_child(work);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
    }
}
