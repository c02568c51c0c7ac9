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

use anyhow::{anyhow, Context, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};
use serde_json::Value;

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
        return Err(super::RuntimeError::Seccomp(
            "seccomp: no filter for this architecture (use --security-opt seccomp=unconfined)".into(),
        )
        .into());
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
    let mut v: Vec<BpfProgram> = vec![eperm.try_into()?, enosys.try_into()?];
    v.extend(x32_filter(arch)?);
    Ok(v)
}

/// On x86_64: the x32 ABI's calls (number | 0x40000000) answer ENOSYS, so a call another
/// filter refuses cannot be made through them where the kernel has x32 enabled
/// (seccompiler compares the number alone). docker's profile allows x32, but no image strata
/// runs needs it. None elsewhere.
fn x32_filter(arch: TargetArch) -> Result<Option<BpfProgram>> {
    if !cfg!(target_arch = "x86_64") {
        return Ok(None);
    }
    const X32: i64 = 0x4000_0000;
    // x32 numbers end below 548 (the x32 table's last entry is 547).
    let rules: BTreeMap<i64, Vec<SeccompRule>> = (0..548).map(|n| (X32 | n, vec![])).collect();
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| anyhow!("building the x32 filter: {e}"))?;
    Ok(Some(f.try_into()?))
}

/// Install compiled filters in this thread (and what it execs). Not through seccompiler's
/// `apply_filter`, which always sets no_new_privs.
pub fn install(filters: &[BpfProgram]) -> Result<()> {
    for f in filters {
        crate::sys::install_seccomp(f).context("installing the seccomp filter")?;
    }
    Ok(())
}

/// A docker seccomp profile action.
fn action(name: &str, errno: Option<u32>) -> Result<SeccompAction> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32)),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno.unwrap_or(0)),
        other => {
            return Err(super::RuntimeError::Seccomp(format!(
                "action '{other}' is not supported (ALLOW, ERRNO, KILL, KILL_PROCESS, TRAP, LOG, TRACE)"
            ))
            .into())
        }
    })
}

/// docker's name of this architecture in `includes.arches`.
fn docker_arch() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        "amd64"
    } else if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "riscv64"
    }
}

/// The running kernel's (major, minor).
fn kernel_version() -> (u32, u32) {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Does a rule's `includes` (every condition holds) / `excludes` (none does) let it in, for
/// a container with capabilities `caps` ("CAP_..." names)?
fn applies(rule: &Value, caps: &[String]) -> bool {
    let names = |v: &Value, k: &str| -> Vec<String> {
        v.get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let kernel_at_least = |v: &str| {
        let mut it = v.split('.').filter_map(|x| x.parse::<u32>().ok());
        kernel_version() >= (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    if let Some(inc) = rule.get("includes") {
        let c = names(inc, "caps");
        if !c.iter().all(|x| caps.contains(x)) {
            return false;
        }
        let a = names(inc, "arches");
        if !a.is_empty() && !a.iter().any(|x| x == docker_arch()) {
            return false;
        }
        if let Some(k) = inc.get("minKernel").and_then(Value::as_str) {
            if !kernel_at_least(k) {
                return false;
            }
        }
    }
    if let Some(exc) = rule.get("excludes") {
        let c = names(exc, "caps");
        if c.iter().any(|x| caps.contains(x)) {
            return false;
        }
        let a = names(exc, "arches");
        if a.iter().any(|x| x == docker_arch()) {
            return false;
        }
        if let Some(k) = exc.get("minKernel").and_then(Value::as_str) {
            if kernel_at_least(k) {
                return false;
            }
        }
    }
    true
}

/// The conditions of one docker rule (`args`, all of which must hold).
fn conditions(rule: &Value) -> Result<Vec<SeccompCondition>> {
    let mut v = Vec::new();
    for a in rule.get("args").and_then(Value::as_array).into_iter().flatten() {
        let index = a
            .get("index")
            .and_then(Value::as_u64)
            .context("arg without an index")?;
        let value = a.get("value").and_then(Value::as_u64).unwrap_or(0);
        let two = a.get("valueTwo").and_then(Value::as_u64).unwrap_or(0);
        let op = a.get("op").and_then(Value::as_str).context("arg without an op")?;
        let (op, value) = match op {
            "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, value),
            "SCMP_CMP_NE" => (SeccompCmpOp::Ne, value),
            "SCMP_CMP_LT" => (SeccompCmpOp::Lt, value),
            "SCMP_CMP_LE" => (SeccompCmpOp::Le, value),
            "SCMP_CMP_GT" => (SeccompCmpOp::Gt, value),
            "SCMP_CMP_GE" => (SeccompCmpOp::Ge, value),
            // libseccomp: (arg & value) == valueTwo.
            "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(value), two),
            o => return Err(super::RuntimeError::Seccomp(format!("unknown comparison '{o}'")).into()),
        };
        let index = u8::try_from(index)
            .ok()
            .filter(|i| *i < 6)
            .context("arg index above 5")?;
        v.push(SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)?);
    }
    Ok(v)
}

/// Compile a docker seccomp profile (JSON) for a container with capabilities `caps`.
///
/// seccompiler builds one filter per action, so the profile becomes several filters,
/// installed in order: first the profile's default action with every call a rule names let
/// through, then one filter per other action (default allow) that applies it to its calls.
/// The kernel runs them all and takes the strictest answer, and among answers of one kind
/// the filter installed last, so each call gets the action its rule gives it. Calls this
/// architecture does not have are skipped, as docker does.
pub fn profile_filters(json: &[u8], caps: &[String]) -> Result<Vec<BpfProgram>> {
    let arch = arch()?;
    let p: Value = serde_json::from_slice(json).context("not JSON")?;
    let default_errno = p.get("defaultErrnoRet").and_then(Value::as_u64).map(|v| v as u32);
    let default = action(
        p.get("defaultAction")
            .and_then(Value::as_str)
            .context("no defaultAction")?,
        default_errno,
    )?;
    // Per action: call -> rules (an empty rule list matches the call whatever its args).
    let mut groups: Vec<(SeccompAction, BTreeMap<i64, Vec<SeccompRule>>)> = Vec::new();
    let mut unconditional: Vec<(SeccompAction, i64)> = Vec::new();
    for (i, r) in p
        .get("syscalls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let ctx = || format!("syscalls[{i}]");
        if !applies(r, caps) {
            continue;
        }
        let errno = r.get("errnoRet").and_then(Value::as_u64).map(|v| v as u32);
        let act = action(
            r.get("action")
                .and_then(Value::as_str)
                .with_context(|| format!("{}: no action", ctx()))?,
            errno,
        )
        .with_context(ctx)?;
        if act == default {
            continue;
        }
        let conds = conditions(r).with_context(ctx)?;
        let mut names: Vec<&str> = r
            .get("names")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(n) = r.get("name").and_then(Value::as_str) {
            names.push(n);
        }
        let gi = match groups.iter().position(|(a, _)| *a == act) {
            Some(g) => g,
            None => {
                groups.push((act.clone(), BTreeMap::new()));
                groups.len() - 1
            }
        };
        for n in names {
            let Some(nr) = super::syscalls::number(n) else {
                log::debug!("seccomp profile: no system call '{n}' here; skipped");
                continue;
            };
            if conds.is_empty() {
                unconditional.push((act.clone(), nr));
                groups[gi].1.insert(nr, vec![]);
            } else if !unconditional.contains(&(act.clone(), nr)) {
                groups[gi]
                    .1
                    .entry(nr)
                    .or_default()
                    .push(SeccompRule::new(conds.clone()).with_context(ctx)?);
            }
        }
    }
    let mut out = Vec::new();
    if default != SeccompAction::Allow {
        // Everything a rule names passes this one, under that rule's conditions.
        let mut pass: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (_, g) in &groups {
            for (nr, rules) in g {
                pass.entry(*nr).or_default().extend(rules.iter().cloned());
            }
        }
        // A call some rule names without conditions passes whatever its arguments.
        for (_, nr) in &unconditional {
            pass.insert(*nr, vec![]);
        }
        let f = SeccompFilter::new(pass, default.clone(), SeccompAction::Allow, arch)
            .map_err(|e| anyhow!("building the filter: {e}"))?;
        out.push(f.try_into()?);
    }
    for (act, rules) in groups {
        if act == SeccompAction::Allow || rules.is_empty() {
            continue;
        }
        let f = SeccompFilter::new(rules, SeccompAction::Allow, act, arch)
            .map_err(|e| anyhow!("building the filter: {e}"))?;
        out.push(f.try_into()?);
    }
    out.extend(x32_filter(arch)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles() {
        let caps = vec!["CAP_CHOWN".to_string()];
        let p = br#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
            {"names":["read","write","no_such_call"],"action":"SCMP_ACT_ALLOW"},
            {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
            {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
            {"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}}]}"#;
        // The default filter and the ENOSYS one (and on x86_64 the x32 one).
        let x32 = cfg!(target_arch = "x86_64") as usize;
        assert_eq!(profile_filters(p, &caps).unwrap().len(), 2 + x32);
        let allow = br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#;
        assert_eq!(profile_filters(allow, &caps).unwrap().len(), 1 + x32);
        if x32 == 1 {
            // Within the kernel's limit of 4096 instructions.
            assert!(x32_filter(TargetArch::x86_64).unwrap().unwrap().len() < 4096);
        }
        for bad in [
            &br#"{"syscalls":[]}"#[..],
            br#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#,
            br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":7,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
            b"not json",
        ] {
            assert!(profile_filters(bad, &caps).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(crate::runtime::syscalls::number("clone3"), Some(435));
        assert!(crate::runtime::syscalls::number("mkdirat").is_some());
    }
}
