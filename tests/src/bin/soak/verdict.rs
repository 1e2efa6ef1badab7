//! The growth rule: does a sampled series (an agent's RSS or open fds) grow without bound?
//!
//! The series holds one value per sample (every minute by default). The first `warmup`
//! samples let pools, caches and allocator arenas fill; the value at the end of the warm-up is
//! the baseline. The series fails when either
//!
//! - **bound**: the last value exceeds `baseline * (1 + pct) + slack`, or
//! - **steady rise**: every interval from the baseline to the end rose (at least
//!   [`MIN_RISING_INTERVALS`] of them) and the total rise exceeds `min_rise`: a leak slower
//!   than the bound still shows as a series that never once levels off.
//!
//! A run too short to have a sample after the baseline is reported as not judged, never as
//! passed silently.

/// The steady-rise check needs at least this many intervals after the baseline.
pub const MIN_RISING_INTERVALS: usize = 4;

/// Thresholds for one kind of series.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// Allowed relative growth of the last value over the baseline.
    pub pct: f64,
    /// Allowed absolute growth on top of `pct` (in the series' unit).
    pub slack: f64,
    /// A series rising in every interval fails only if it rose by more than this in total.
    pub min_rise: f64,
}

/// Agent RSS in KiB: 20% + 10 MiB; a steady rise counts above 2 MiB.
pub const RSS_KIB: Rule = Rule {
    pct: 0.20,
    slack: 10.0 * 1024.0,
    min_rise: 2.0 * 1024.0,
};

/// Agent open fds: 25% + 32 (connections in flight vary); a steady rise counts above 8.
pub const FDS: Rule = Rule {
    pct: 0.25,
    slack: 32.0,
    min_rise: 8.0,
};

#[derive(Debug, PartialEq)]
pub enum Verdict {
    Ok(String),
    Grows(String),
    NotJudged(String),
}

impl Verdict {
    pub fn failed(&self) -> bool {
        matches!(self, Verdict::Grows(_))
    }

    pub fn text(&self) -> &str {
        match self {
            Verdict::Ok(t) | Verdict::Grows(t) | Verdict::NotJudged(t) => t,
        }
    }
}

/// Warm-up samples for a run of `samples`: two when there are at least six, else one.
pub fn warmup_for(samples: usize) -> usize {
    if samples >= 6 { 2 } else { 1 }
}

/// Judges `series` (sample i = value at the end of interval i+1) with `warmup` samples of
/// warm-up.
pub fn judge(series: &[f64], warmup: usize, rule: Rule) -> Verdict {
    let warmup = warmup.max(1);
    if series.len() <= warmup {
        return Verdict::NotJudged(format!(
            "not judged: {} sample(s), needs more than the {warmup} warm-up sample(s)",
            series.len()
        ));
    }
    let baseline = series[warmup - 1];
    let last = series[series.len() - 1];
    let limit = baseline * (1.0 + rule.pct) + rule.slack;
    if last > limit {
        return Verdict::Grows(format!(
            "last {last:.0} exceeds the bound {limit:.0} (baseline {baseline:.0} at sample {warmup} + {:.0}% + {:.0})",
            rule.pct * 100.0,
            rule.slack
        ));
    }
    let after: &[f64] = &series[warmup - 1..];
    let intervals = after.len() - 1;
    let rising = after.windows(2).all(|w| w[1] > w[0]);
    if intervals >= MIN_RISING_INTERVALS && rising && last - baseline > rule.min_rise {
        return Verdict::Grows(format!(
            "rose in every one of the {intervals} intervals since the warm-up, {baseline:.0} -> {last:.0} (more than {:.0})",
            rule.min_rise
        ));
    }
    let steady = if intervals < MIN_RISING_INTERVALS {
        "; too few intervals for the steady-rise check".to_string()
    } else if rising {
        // Not a failure, but worth seeing: a longer run would tell.
        format!(
            "; rose in every interval, by {:.0} in total (at most {:.0} allowed)",
            last - baseline,
            rule.min_rise
        )
    } else {
        String::new()
    };
    Verdict::Ok(format!(
        "bounded: baseline {baseline:.0}, last {last:.0}, bound {limit:.0}{steady}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_and_noisy_series_pass() {
        let v = judge(&[100.0, 120.0, 118.0, 121.0, 119.0, 122.0, 120.0], 2, FDS);
        assert!(matches!(v, Verdict::Ok(_)), "{v:?}");
        // Allocator noise: up and down by a few MiB around 30 MiB.
        let rss = [20_000.0, 30_000.0, 31_000.0, 30_500.0, 32_000.0, 31_500.0];
        assert!(!judge(&rss, 2, RSS_KIB).failed());
    }

    #[test]
    fn growth_beyond_the_bound_fails() {
        let v = judge(&[50.0, 60.0, 60.0, 61.0, 150.0], 2, FDS);
        assert!(v.failed(), "{v:?}");
        assert!(v.text().contains("bound"), "{v:?}");
    }

    #[test]
    fn a_slow_steady_rise_fails_even_within_the_bound() {
        // +1 MiB a minute on 30 MiB: within 20% + 10 MiB after 8 minutes, but never levels.
        let series: Vec<f64> = (0..10).map(|m| 30_000.0 + 1024.0 * m as f64).collect();
        let v = judge(&series, 2, RSS_KIB);
        assert!(v.failed(), "{v:?}");
        assert!(v.text().contains("every one"), "{v:?}");
    }

    #[test]
    fn a_tiny_steady_rise_is_allowed_but_named() {
        let series: Vec<f64> = (0..10).map(|m| 30_000.0 + 100.0 * m as f64).collect();
        let v = judge(&series, 2, RSS_KIB);
        assert!(!v.failed(), "{v:?}");
        assert!(v.text().contains("rose in every interval"), "{v:?}");
    }

    #[test]
    fn one_level_interval_breaks_the_steady_rise() {
        let series = [10.0, 20.0, 30.0, 40.0, 40.0, 50.0, 55.0];
        // Bound: 20 * 1.25 + 32 = 57.
        assert!(!judge(&series, 2, FDS).failed());
    }

    #[test]
    fn short_runs_are_not_judged() {
        assert!(matches!(judge(&[10.0], 1, FDS), Verdict::NotJudged(_)));
        assert!(matches!(
            judge(&[10.0, 11.0], 2, FDS),
            Verdict::NotJudged(_)
        ));
        assert!(matches!(judge(&[10.0, 11.0], 1, FDS), Verdict::Ok(_)));
    }

    #[test]
    fn warmup_depends_on_the_run_length() {
        assert_eq!(warmup_for(3), 1);
        assert_eq!(warmup_for(10), 2);
    }
}
