//! Checks for job scripts: progress numbers depend on timing, and qsd emits some
//! events before or after a reply depending on where its job was.

use serde_json::{Value, json};

use crate::qmp::parse_line;
use crate::script::StepOutput;

/// The step's lines with progress numbers masked (they depend on timing), compared
/// as a multiset: qsd itself emits an event of a pause before or after the reply,
/// depending on where the job was when the command came.
pub fn same_lines_masked(reference: &StepOutput, tested: &StepOutput) -> Result<(), String> {
    same_lines_with(reference, tested, mask_progress)
}

/// [`same_lines_masked`] with the totals masked too: a mirror's total grows by what
/// guest writes dirty while it copies, so it depends on timing as well.
pub fn same_lines_masked_totals(reference: &StepOutput, tested: &StepOutput) -> Result<(), String> {
    same_lines_with(reference, tested, |v| {
        mask_progress(v);
        mask_keys(v, &["len", "total-progress"]);
    })
}

fn mask_keys(v: &mut Value, keys: &[&str]) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if keys.contains(&k.as_str()) {
                    *x = json!("N");
                } else {
                    mask_keys(x, keys);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| mask_keys(x, keys)),
        _ => {}
    }
}

fn same_lines_with(
    reference: &StepOutput,
    tested: &StepOutput,
    mask: impl Fn(&mut Value),
) -> Result<(), String> {
    let view = |out: &StepOutput| -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        for line in out.monitor(0) {
            let mut v = parse_line(line).map_err(|e| e.to_string())?;
            mask(&mut v);
            lines.push(v.to_string());
        }
        lines.sort();
        Ok(lines)
    };
    let (a, b) = (view(reference)?, view(tested)?);
    if a != b {
        return Err(format!("qsd: {a:#?}\nbulkhead: {b:#?}"));
    }
    Ok(())
}

/// Masks what depends on timing: progress, timestamps, `busy`, `actual-size`.
pub fn mask_progress(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                // `busy` too: qsd's job is busy or asleep on its rate limit
                // depending on the moment.
                // `actual-size` as well: the engines place clusters differently.
                if matches!(
                    k.as_str(),
                    "offset" | "current-progress" | "timestamp" | "busy" | "actual-size"
                ) {
                    *x = json!("N");
                } else {
                    mask_progress(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(mask_progress),
        _ => {}
    }
}

/// The step's lines without the `paused`/`running` pair qsd emits for a job whose
/// node a graph change drains (bulkhead drains nothing: its jobs do not pause; see
/// design/jobs.md), compared as [`same_lines_masked`] does.
pub fn ignoring_drain_pauses(reference: &StepOutput, tested: &StepOutput) -> Result<(), String> {
    let strip = |out: &StepOutput| {
        let mut kept = StepOutput::default();
        for line in out.monitor(0) {
            let drained = parse_line(line).is_ok_and(|v| {
                v["event"] == "JOB_STATUS_CHANGE"
                    && matches!(v["data"]["status"].as_str(), Some("paused" | "running"))
            });
            if !drained {
                kept.push(0, line.clone());
            }
        }
        kept
    };
    same_lines_masked(&strip(reference), &strip(tested))
}
