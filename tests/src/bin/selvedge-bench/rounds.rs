//! Rounds: every mode is measured more than once, in mirrored order (baseline, Selvedge,
//! fast path; then fast path, Selvedge, baseline), so a machine that drifts through a run
//! weighs on every mode alike. A row's figure is its median over the rounds that measured
//! it, and the ratio to the baseline is also kept per round (a mode against the baseline
//! of the same round), which shows how far one reading can be trusted.

use serde_json::{json, Map, Value};

/// One round's rows: mode → row → value.
pub type Round = Map<String, Value>;

/// The modes in the order round `i` measures them: as given in even rounds, reversed in
/// odd ones.
pub fn order<'m>(modes: &[&'m str], round: usize) -> Vec<&'m str> {
    let mut order = modes.to_vec();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// Per mode, each row's median over the rounds in which it was measured (a row missing
/// from a round, such as a tool that failed, is left out of that row's median only).
pub fn medians(rounds: &[Round]) -> Map<String, Value> {
    let mut out = Map::new();
    for mode in modes(rounds) {
        let mut rows = Map::new();
        for key in keys(rounds, &mode) {
            let mut values: Vec<f64> = rounds.iter().filter_map(|r| r.get(&mode)?.get(&key)?.as_f64()).collect();
            if let Some(m) = median(&mut values) {
                rows.insert(key, json!(m));
            }
        }
        out.insert(mode, Value::Object(rows));
    }
    out
}

/// Per mode other than the baseline, each row's ratio to the baseline's row of the same
/// round, one per round that measured both (the agents' own rows have no ratio).
pub fn ratios_by_round(rounds: &[Round]) -> Map<String, Value> {
    let mut out = Map::new();
    for mode in modes(rounds).into_iter().filter(|m| m != "baseline") {
        let mut rows = Map::new();
        for key in keys(rounds, &mode).into_iter().filter(|k| !k.starts_with("agent_")) {
            let ratios: Vec<Value> = rounds
                .iter()
                .filter_map(|r| {
                    let (m, b) = (r.get(&mode)?.get(&key)?.as_f64()?, r.get("baseline")?.get(&key)?.as_f64()?);
                    (b > 0.0).then(|| json!(m / b))
                })
                .collect();
            if !ratios.is_empty() {
                rows.insert(key, Value::Array(ratios));
            }
        }
        out.insert(mode, Value::Object(rows));
    }
    out
}

/// The middle value (the mean of the two middle ones for an even count); None if empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Every mode any round measured, in first-seen order.
fn modes(rounds: &[Round]) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for mode in rounds.iter().flat_map(|r| r.keys()) {
        if !all.contains(mode) {
            all.push(mode.clone());
        }
    }
    all
}

/// Every row any round measured for `mode`.
fn keys(rounds: &[Round], mode: &str) -> Vec<String> {
    let mut all: Vec<String> =
        rounds.iter().filter_map(|r| r.get(mode)?.as_object()).flat_map(|rows| rows.keys().cloned()).collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(rows: Value) -> Round {
        rows.as_object().unwrap().clone()
    }

    #[test]
    fn odd_rounds_mirror_the_order_so_drift_weighs_on_every_mode_alike() {
        let modes = ["baseline", "selvedge", "selvedge+fastpath"];
        assert_eq!(order(&modes, 0), modes);
        assert_eq!(order(&modes, 1), ["selvedge+fastpath", "selvedge", "baseline"]);
        assert_eq!(order(&modes, 2), modes);
    }

    #[test]
    fn a_row_is_its_median_over_the_rounds_that_measured_it() {
        let rounds = [
            round(json!({"baseline": {"gbps": 10.0}, "selvedge": {"gbps": 4.0, "agent_cpu": 2.0}})),
            round(json!({"baseline": {"gbps": 20.0}, "selvedge": {"gbps": 6.0}})),
            round(json!({"baseline": {"gbps": 12.0}, "selvedge": {"agent_cpu": 4.0}})),
        ];
        let m = medians(&rounds);
        assert_eq!(m["baseline"]["gbps"], json!(12.0));
        // Two readings: their mean; a failed reading is not a zero.
        assert_eq!(m["selvedge"]["gbps"], json!(5.0));
        assert_eq!(m["selvedge"]["agent_cpu"], json!(3.0));
    }

    #[test]
    fn ratios_pair_each_mode_with_the_baseline_of_its_own_round() {
        let rounds = [
            round(json!({"baseline": {"gbps": 10.0, "agent_cpu": 0.1}, "selvedge": {"gbps": 4.0, "agent_cpu": 2.0}})),
            round(json!({"baseline": {"gbps": 20.0}, "selvedge": {"gbps": 10.0}})),
            round(json!({"baseline": {"gbps": 0.0}, "selvedge": {"gbps": 3.0}})),
        ];
        let r = ratios_by_round(&rounds);
        assert!(r.get("baseline").is_none());
        assert_eq!(r["selvedge"]["gbps"], json!([0.4, 0.5]));
        assert!(r["selvedge"].get("agent_cpu").is_none());
    }

    #[test]
    fn median_of_nothing_is_none() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
    }
}
