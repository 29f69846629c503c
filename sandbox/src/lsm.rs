//! Landlock: no path-based filesystem access at all, no TCP bind or connect, and no
//! signals or abstract unix sockets outside the worker.
//!
//! Runs in every worker, on the main thread before other threads exist (a Landlock
//! domain is inherited by threads created afterwards). The ruleset handles every
//! access right the kernel knows and adds no rule, so everything it handles is denied.
//! Descriptors opened by the supervisor are not affected: Landlock checks at open time,
//! in the opener's domain. Best effort: a kernel without Landlock, or with an older
//! ABI, enforces what it can and the rest is reported unavailable. No untrusted input.

use landlock::{
    ABI, Access, AccessFs, AccessNet, LandlockStatus, Ruleset, RulesetAttr, RulesetStatus, Scope,
};

use crate::Report;

/// The newest ABI whose rights we ask for; the crate downgrades to what the kernel has.
const WANTED: ABI = ABI::V6;

pub(crate) fn landlock(report: &mut Report) {
    let restricted = Ruleset::default()
        .handle_access(AccessFs::from_all(WANTED))
        .and_then(|r| r.handle_access(AccessNet::from_all(WANTED)))
        .and_then(|r| r.scope(Scope::from_all(WANTED)))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self());
    let status = match restricted {
        Ok(status) => status,
        Err(e) => {
            report.unavailable("landlock", e);
            return;
        }
    };
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi,
        LandlockStatus::NotEnabled => {
            report.unavailable("landlock", "not enabled in this kernel");
            return;
        }
        LandlockStatus::NotImplemented => {
            report.unavailable("landlock", "not built into this kernel");
            return;
        }
    };
    if status.ruleset == RulesetStatus::NotEnforced {
        report.unavailable("landlock", "ruleset not enforced");
        return;
    }
    report.applied("landlock");
    let abi_number = abi as i32;
    if abi >= ABI::V4 {
        report.applied("landlock-net");
    } else {
        report.unavailable("landlock-net", format!("kernel ABI {abi_number}"));
    }
    if abi >= ABI::V6 {
        report.applied("landlock-scope");
    } else {
        report.unavailable("landlock-scope", format!("kernel ABI {abi_number}"));
    }
}
