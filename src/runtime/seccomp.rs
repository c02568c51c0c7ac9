//! The default seccomp filter: the system calls docker's default profile leaves out of its
//! allow-list answer EPERM (clone3 ENOSYS, so C libraries fall back to clone, whose
//! namespace flags are refused). Built with `seccompiler` (rust-vmm); installed by
//! `sys::install_seccomp` in the command's process just before it drops its capabilities,
//! so no_new_privs is not needed (and stays off unless asked for, as in docker).
//!
//! This is docker's list of blocked calls ("Significant syscalls blocked by the default
//! profile") plus the newer ones its allow-list does not name (the new mount API, io_uring);
//! calls that capabilities already refuse are listed anyway, as docker does.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// Blocked outright. (`c_long` is i64 on every architecture with a filter here.)
#[allow(clippy::useless_conversion)]
fn blocked() -> Vec<i64> {
    let mut v: Vec<libc::c_long> = vec![
        libc::SYS_acct,
        libc::SYS_add_key,
        libc::SYS_bpf,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_delete_module,
        libc::SYS_finit_module,
        libc::SYS_get_mempolicy,
        libc::SYS_init_module,
        libc::SYS_kcmp,
        libc::SYS_kexec_file_load,
        libc::SYS_kexec_load,
        libc::SYS_keyctl,
        libc::SYS_lookup_dcookie,
        libc::SYS_mbind,
        libc::SYS_mount,
        libc::SYS_move_pages,
        libc::SYS_name_to_handle_at,
        libc::SYS_nfsservctl,
        libc::SYS_open_by_handle_at,
        libc::SYS_perf_event_open,
        libc::SYS_pivot_root,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_quotactl,
        libc::SYS_reboot,
        libc::SYS_request_key,
        libc::SYS_set_mempolicy,
        libc::SYS_setns,
        libc::SYS_settimeofday,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_umount2,
        libc::SYS_unshare,
        libc::SYS_userfaultfd,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_ioperm,
        libc::SYS_iopl,
        libc::SYS_sysfs,
        libc::SYS__sysctl,
        libc::SYS_uselib,
        libc::SYS_ustat,
    ]);
    v.into_iter().map(i64::from).collect()
}

fn arch() -> Result<TargetArch> {
    Ok(if cfg!(target_arch = "x86_64") {
        TargetArch::x86_64
    } else if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else if cfg!(target_arch = "riscv64") {
        TargetArch::riscv64
    } else {
        anyhow::bail!("seccomp: no filter for this architecture (use --security-opt seccomp=unconfined)")
    })
}

/// The default filters (EPERM list, then clone3 -> ENOSYS), compiled.
#[allow(clippy::useless_conversion)]
pub fn default_filters() -> Result<Vec<BpfProgram>> {
    let arch = arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = blocked().into_iter().map(|n| (n, vec![])).collect();
    // clone with a namespace flag (its flags are argument 0 on every architecture strata
    // builds for).
    let ns = [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWCGROUP,
    ];
    let clone_rules = ns
        .iter()
        .map(|f| {
            let f = *f as u64;
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(f),
                f,
            )?])
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    rules.insert(i64::from(libc::SYS_clone), clone_rules);
    let eperm = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .context("building the seccomp filter")?;
    let mut c3 = BTreeMap::new();
    c3.insert(i64::from(libc::SYS_clone3), vec![]);
    let enosys = SeccompFilter::new(
        c3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok(vec![eperm.try_into()?, enosys.try_into()?])
}

/// Install compiled filters in this thread (and what it execs). Not through seccompiler's
/// `apply_filter`, which always sets no_new_privs.
pub fn install(filters: &[BpfProgram]) -> Result<()> {
    for f in filters {
        crate::sys::install_seccomp(f).context("installing the seccomp filter")?;
    }
    Ok(())
}
