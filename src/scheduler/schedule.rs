//! The time math of the scheduler, pure: when a job's slots fall, how a catch-up policy treats
//! the slots missed while no instance ran, and how long to wait before a retry.
//!
//! Wall-clock jobs are a cron expression read in an IANA zone (croner handles DST the way ops
//! expect: a time that doesn't exist runs once right after the gap, a time that occurs twice runs
//! once, at its first occurrence). Interval jobs ("every 15m") are counted in UTC from the Unix
//! epoch, so every instance agrees on their slots without talking to the others.

use chrono::{DateTime, Duration, Offset, SubsecRound, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use std::collections::VecDeque;

/// When a job's slots fall.
#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        cron: Box<Cron>,
        expr: String,
        zone: Tz,
        /// The longest gap between two slots, worked out once ([`longest_gap`]).
        period: Duration,
    },
    Every {
        period: Duration,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("schedule '{spec}': {message}")]
pub struct ScheduleError {
    pub spec: String,
    pub message: String,
}

/// The most slots the planner materialises at once; older ones are counted, not listed.
pub const MAX_SLOTS: usize = 500;

impl Schedule {
    /// `every <n>s|m|h` (UTC) or a 5- or 6-field cron expression read in `zone`.
    pub fn parse(spec: &str, zone: Tz) -> Result<Schedule, ScheduleError> {
        let err = |message: String| ScheduleError {
            spec: spec.to_owned(),
            message,
        };
        let spec = spec.trim();
        if let Some(rest) = spec.strip_prefix("every ") {
            let rest = rest.trim();
            let (digits, unit) = rest.split_at(
                rest.find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len()),
            );
            let n: i64 = digits
                .parse()
                .map_err(|_| err("expected a whole number such as 'every 15m'".into()))?;
            let secs = match unit {
                "s" => n,
                "m" => n * 60,
                "h" => n * 3600,
                _ => return Err(err("the unit must be s, m or h".into())),
            };
            if !(1..=86_400).contains(&secs) || 86_400 % secs != 0 {
                return Err(err("the period must divide a day evenly (1s … 24h)".into()));
            }
            return Ok(Schedule::Every {
                period: Duration::seconds(secs),
            });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(spec)
            .map_err(|e| err(format!("not a cron expression ({e})")))?;
        Ok(Schedule::Cron {
            period: longest_gap(&cron),
            cron: Box::new(cron),
            expr: spec.to_owned(),
            zone,
        })
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every { period } => {
                let p = period.num_microseconds()?;
                let us = t.timestamp_micros();
                DateTime::from_timestamp_micros((us.div_euclid(p) + 1) * p)
            }
            Schedule::Cron { cron, zone, .. } => {
                // croner carries sub-seconds into its result; slots are whole seconds.
                let t = t.trunc_subsecs(0);
                let mut from = t.with_timezone(zone);
                let frequent = self.is_frequent();
                loop {
                    let next = cron.find_next_occurrence(&from, false).ok()?;
                    if next <= t {
                        // croner maps an ambiguous wall time to its first occurrence even when
                        // that lies before `t`; the slot was then, so look past it.
                        from = next + Duration::seconds(1);
                        continue;
                    }
                    // croner moves a time inside a DST gap to the gap's end only for patterns
                    // of single values; with a list, range or step (`30 2,14 * * *`) it drops
                    // it. So a gap before `next` whose skipped minutes the pattern matched is
                    // the slot, whatever croner offered.
                    if !frequent
                        && let Some(gap_end) = first_gap_end(*zone, t, next.with_timezone(&Utc))
                        && gap_end < next
                        && matched_in_gap(cron, gap_end)
                    {
                        return Some(gap_end.with_timezone(&Utc));
                    }
                    let spurious = !frequent
                        && (
                            // A wall-clock time that occurs twice (DST fall-back) runs once, at
                            // its first occurrence; the second reads the same on the wall.
                            next.naive_local() == from.naive_local()
                            // croner also offers the end of every DST gap; that is an
                            // occurrence only if the pattern matched a time inside the gap.
                            || (!cron.is_time_matching(&next).unwrap_or(true)
                                && !matched_in_gap(cron, next))
                        );
                    if !spurious {
                        return Some(next.with_timezone(&Utc));
                    }
                    from = next;
                }
            }
        }
    }

    /// Slots `s` with `after < s <= up_to`, ascending: at most the newest [`MAX_SLOTS`], with
    /// the number of older ones left out.
    pub fn slots_in(
        &self,
        after: DateTime<Utc>,
        up_to: DateTime<Utc>,
    ) -> (Vec<DateTime<Utc>>, u64) {
        if up_to <= after {
            return (Vec::new(), 0);
        }
        match self {
            Schedule::Every { period } => {
                let p = period.num_microseconds().unwrap_or(i64::MAX);
                let first = after.timestamp_micros().div_euclid(p) + 1;
                let last = up_to.timestamp_micros().div_euclid(p);
                if last < first {
                    return (Vec::new(), 0);
                }
                let total = (last - first + 1) as u64;
                let kept = total.min(MAX_SLOTS as u64) as i64;
                let slots = (last - kept + 1..=last)
                    .filter_map(|k| DateTime::from_timestamp_micros(k * p))
                    .collect();
                (slots, total - kept as u64)
            }
            Schedule::Cron { .. } => {
                let mut kept = VecDeque::new();
                let mut dropped = 0;
                let mut t = after;
                while let Some(next) = self.next_after(t).filter(|n| *n <= up_to) {
                    if kept.len() == MAX_SLOTS {
                        kept.pop_front();
                        dropped += 1;
                    }
                    kept.push_back(next);
                    t = next;
                }
                (kept.into(), dropped)
            }
        }
    }

    /// Slots `s` with `after < s <= up_to`, ascending: at most the oldest [`MAX_SLOTS`], and
    /// whether more follow (a catch-up that runs every slot plans them a page at a time).
    pub fn first_slots_in(
        &self,
        after: DateTime<Utc>,
        up_to: DateTime<Utc>,
    ) -> (Vec<DateTime<Utc>>, bool) {
        let mut slots = Vec::new();
        let mut t = after;
        while let Some(next) = self.next_after(t).filter(|n| *n <= up_to) {
            if slots.len() == MAX_SLOTS {
                return (slots, true);
            }
            slots.push(next);
            t = next;
        }
        (slots, false)
    }

    /// The longest gap between two slots: a schedule is only as frequent as its sparsest
    /// stretch (`0,10 2 * * *` is daily, though two of its slots are 10 minutes apart).
    pub fn period(&self) -> Duration {
        match self {
            Schedule::Every { period } | Schedule::Cron { period, .. } => *period,
        }
    }

    /// Whether this is a poller (every 15 minutes or faster): missed slots are folded into a
    /// count instead of recorded one by one.
    pub fn is_frequent(&self) -> bool {
        self.period() <= Duration::minutes(15)
    }

    /// Whether the manual clock stops at each slot. Hourly and faster jobs are pollers whose
    /// business instants are timers (cutoffs, retries, deadlines, reminders), so stopping at
    /// every slot would only slow a month down: they run at the other stops instead.
    pub fn stops_manual_clock(&self) -> bool {
        self.period() > Duration::hours(1)
    }

    /// The zone slots are read in (UTC for interval jobs).
    pub fn zone(&self) -> Tz {
        match self {
            Schedule::Every { .. } => chrono_tz::UTC,
            Schedule::Cron { zone, .. } => *zone,
        }
    }

    /// The schedule in words, for the ops page.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Every { period } => {
                let s = period.num_seconds();
                let (n, unit) = if s % 3600 == 0 {
                    (s / 3600, "hour")
                } else if s % 60 == 0 {
                    (s / 60, "minute")
                } else {
                    (s, "second")
                };
                if n == 1 {
                    format!("every {unit} (UTC)")
                } else {
                    format!("every {n} {unit}s (UTC)")
                }
            }
            Schedule::Cron { expr, zone, .. } => describe_cron(expr)
                .map(|words| format!("{words} ({zone})"))
                .unwrap_or_else(|| format!("cron `{expr}` ({zone})")),
        }
    }

    /// The next `n` slots after `after`, in the schedule's zone and in UTC, marking where the
    /// zone's UTC offset changes (DST) from the slot before.
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Vec<UpcomingSlot> {
        let zone = self.zone();
        let mut previous_offset = zone.offset_from_utc_datetime(&after.naive_utc()).fix();
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            let Some(next) = self.next_after(t) else {
                break;
            };
            let local = next.with_timezone(&zone);
            let offset = local.offset().fix();
            out.push(UpcomingSlot {
                utc: next,
                local: local.format("%a %Y-%m-%d %H:%M %Z").to_string(),
                offset_changed: offset != previous_offset,
            });
            previous_offset = offset;
            t = next;
        }
        out
    }
}

/// The longest gap between consecutive occurrences of `cron` over the week after a fixed
/// reference instant (or the first gap, when that is longer than a week), read on raw UTC
/// occurrences: no DST corrections are needed for an estimate. At most 20,000 occurrences are
/// read (five and a half hours of an every-second pattern), so parsing stays quick.
fn longest_gap(cron: &Cron) -> Duration {
    let reference = DateTime::from_timestamp(946_857_600, 0).unwrap_or_default();
    let next = |t: &DateTime<Utc>| cron.find_next_occurrence(t, false).ok();
    let mut longest = Duration::zero();
    let mut at = next(&reference);
    for _ in 0..20_000 {
        let (Some(a), Some(b)) = (at, at.as_ref().and_then(next)) else {
            break;
        };
        longest = longest.max(b - a);
        if b - reference > Duration::weeks(1) {
            break;
        }
        at = Some(b);
    }
    if longest.is_zero() {
        Duration::days(366)
    } else {
        longest
    }
}

/// The end of the first DST gap (the wall clock jumps forward) in `(after, before]`, as the
/// zone's wall time just after the jump, to the second.
fn first_gap_end(zone: Tz, after: DateTime<Utc>, before: DateTime<Utc>) -> Option<DateTime<Tz>> {
    let offset = |t: DateTime<Utc>| {
        zone.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
    };
    // A day at a time (zones change their offset at most a few times a year), then halving
    // the day that holds the jump.
    let mut lo = after;
    while lo < before {
        let hi = (lo + Duration::days(1)).min(before);
        if offset(hi) > offset(lo) {
            let (mut below, mut above) = (lo, hi);
            while above - below > Duration::seconds(1) {
                let mid = below + (above - below) / 2;
                if offset(mid) > offset(lo) {
                    above = mid;
                } else {
                    below = mid;
                }
            }
            return Some(above.trunc_subsecs(0).with_timezone(&zone));
        }
        lo = hi;
    }
    None
}

/// Whether the pattern matches a wall-clock minute that the DST gap ending at `gap_end` skipped
/// (read as naive time). Gaps are not always an hour: Lord Howe Island's is 30 minutes, Troll
/// station's two hours. At an instant that ends no gap, none.
fn matched_in_gap(cron: &Cron, gap_end: DateTime<Tz>) -> bool {
    let zone = gap_end.timezone();
    let offset = |t: DateTime<Utc>| {
        zone.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
    };
    let end = gap_end.with_timezone(&Utc);
    let skipped_minutes = (offset(end) - offset(end - Duration::seconds(1))) / 60;
    let wall = gap_end.naive_local();
    (1..=i64::from(skipped_minutes)).any(|m| {
        let naive = wall - Duration::minutes(m);
        cron.is_time_matching(&Utc.from_utc_datetime(&naive))
            .unwrap_or(false)
    })
}

/// One future slot as shown to ops.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UpcomingSlot {
    pub utc: DateTime<Utc>,
    pub local: String,
    /// The zone's UTC offset differs from the previous slot's (a DST change lies between).
    pub offset_changed: bool,
}

fn describe_cron(expr: &str) -> Option<String> {
    let f: Vec<&str> = expr.split_whitespace().collect();
    let [min, hour, dom, mon, dow] = f.as_slice() else {
        return None;
    };
    let min: u32 = min.parse().ok()?;
    if *dom != "*" || *mon != "*" {
        return None;
    }
    if *hour == "*" && *dow == "*" {
        return Some(format!("hourly at minute {min}"));
    }
    let hour: u32 = hour.parse().ok()?;
    let at = format!("{hour:02}:{min:02}");
    const DAYS: [&str; 7] = [
        "Sundays",
        "Mondays",
        "Tuesdays",
        "Wednesdays",
        "Thursdays",
        "Fridays",
        "Saturdays",
    ];
    match *dow {
        "*" => Some(format!("daily at {at}")),
        d => {
            let i: usize = d.parse().ok()?;
            Some(format!("{} at {at}", DAYS.get(i % 7)?))
        }
    }
}

/// What to do with slots missed while no instance ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Run every missed slot.
    All,
    /// Run only the newest slot; older ones are coalesced into it.
    Latest,
    /// Run slots that are on time; late ones are skipped.
    Skip,
}

impl CatchUp {
    pub fn parse(s: &str) -> Option<CatchUp> {
        match s {
            "all" => Some(CatchUp::All),
            "latest" => Some(CatchUp::Latest),
            "skip" => Some(CatchUp::Skip),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::All => "all",
            CatchUp::Latest => "latest",
            CatchUp::Skip => "skip",
        }
    }
}

/// The planner's decision for one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotDecision {
    pub at: DateTime<Utc>,
    /// `None`: run it; `Some(reason)`: record it as skipped.
    pub skip: Option<&'static str>,
    /// Whether it runs late (trigger `catchup`) rather than on time (`schedule`).
    pub late: bool,
    /// Older slots folded into this one and not recorded separately.
    pub coalesced: u64,
}

/// Decides the fate of newly planned slots (`due`, ascending, all `<= now`).
///
/// A slot is late when `now − slot > grace`. `All` runs every slot. `Latest` runs only the
/// newest slot; the others are skipped as `coalesced` (recorded one by one, or, when `fold` is
/// set for frequent pollers, only counted on the newest). `Skip` runs on-time slots and skips
/// late ones as `missed_grace` (folded the same way). `uncounted` older slots that were never
/// materialised are added to the count of the first decision.
pub fn plan_catch_up(
    policy: CatchUp,
    grace: Duration,
    now: DateTime<Utc>,
    due: &[DateTime<Utc>],
    uncounted: u64,
    fold: bool,
) -> Vec<SlotDecision> {
    let late = |s: &DateTime<Utc>| now - *s > grace;
    let mut out: Vec<SlotDecision> = Vec::new();
    let mut folded = uncounted;
    let newest = due.len().saturating_sub(1);
    for (i, at) in due.iter().enumerate() {
        let skip = match policy {
            CatchUp::All => None,
            CatchUp::Latest if i == newest => None,
            CatchUp::Latest => Some("coalesced"),
            CatchUp::Skip if late(at) => Some("missed_grace"),
            CatchUp::Skip => None,
        };
        if skip.is_some() && fold {
            folded += 1;
            continue;
        }
        out.push(SlotDecision {
            at: *at,
            skip,
            late: late(at),
            coalesced: std::mem::take(&mut folded),
        });
    }
    if folded > 0 {
        // Everything was folded (Skip with only late slots): keep one skipped row to say so.
        if let Some(at) = due.last() {
            out.push(SlotDecision {
                at: *at,
                skip: Some(if policy == CatchUp::Latest {
                    "coalesced"
                } else {
                    "missed_grace"
                }),
                late: true,
                coalesced: folded - 1,
            });
        }
    }
    out
}

/// The delay before retry number `attempt` (1 = the first retry): exponential from `base`,
/// capped at `cap`, with "equal jitter" — half fixed, half scaled by `jitter` in [0, 1) — so
/// that instances retrying the same failure spread out.
pub fn retry_delay(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = base
        .checked_mul(
            1i32.checked_shl(attempt.saturating_sub(1).min(30))
                .unwrap_or(i32::MAX),
        )
        .unwrap_or(cap)
        .min(cap);
    let half = exp / 2;
    let jitter_ms = (half.num_milliseconds() as f64 * jitter.clamp(0.0, 1.0)) as i64;
    half + Duration::milliseconds(jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Europe::Berlin;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn weekly_berlin_job_follows_the_wall_clock_across_dst() {
        let s = Schedule::parse("0 6 * * 3", Berlin).unwrap();
        let (slots, _) = s.slots_in(utc("2027-03-20T00:00:00Z"), utc("2027-04-01T00:00:00Z"));
        assert_eq!(
            slots,
            [utc("2027-03-24T05:00:00Z"), utc("2027-03-31T04:00:00Z")]
        );
        assert_eq!(s.describe(), "Wednesdays at 06:00 (Europe/Berlin)");
        let up = s.upcoming(utc("2027-03-20T00:00:00Z"), 3);
        assert_eq!(
            up.iter().map(|u| u.offset_changed).collect::<Vec<_>>(),
            [false, true, false]
        );
        assert!(up[1].local.contains("CEST"), "{:?}", up[1]);
    }

    #[test]
    fn gaps_other_than_an_hour_skip_only_their_own_minutes() {
        // The local times of `expr`'s slots in `zone` over `hours` from midnight of `day`.
        let local_slots = |expr: &str, zone: &str, day: &str, hours: i64| {
            let zone: Tz = zone.parse().unwrap();
            let start = zone
                .from_local_datetime(&format!("{day}T00:00:00").parse().unwrap())
                .unwrap()
                .with_timezone(&Utc);
            let s = Schedule::parse(expr, zone).unwrap();
            let (slots, _) = s.slots_in(start, start + Duration::hours(hours));
            slots
                .iter()
                .map(|t| t.with_timezone(&zone).format("%H:%M").to_string())
                .collect::<Vec<_>>()
        };
        // Lord Howe Island jumps 30 minutes (02:00 → 02:30) on 4 October 2026: 01:45 happens,
        // and is the day's only slot (no extra one at the gap's end).
        assert_eq!(
            local_slots("45 1 * * *", "Australia/Lord_Howe", "2026-10-04", 23),
            ["01:45"]
        );
        // Troll station jumps two hours (01:00 → 03:00) on 28 March 2027: a 01:30 slot written
        // in a list runs once, at 03:00, and 13:30 as usual.
        assert_eq!(
            local_slots("30 1,13 * * *", "Antarctica/Troll", "2027-03-28", 22),
            ["03:00", "13:30"]
        );
    }

    #[test]
    fn a_0230_berlin_job_runs_once_on_both_change_days_however_its_hours_are_written() {
        // 02:30 doesn't exist on 28 March 2027 (right after the gap, 03:00 CEST); it happens
        // twice on 25 October 2026 (the first one, CEST). 14:30 is an ordinary slot.
        let (spring, autumn) = ("2027-03-28T01:00:00Z", "2026-10-25T00:30:00Z");
        for (expr, extra) in [
            ("30 2 * * *", None),
            (
                "30 2,14 * * *",
                Some(("2027-03-28T12:30:00Z", "2026-10-25T13:30:00Z")),
            ),
            ("30 1-2 * * *", None),
            (
                "30 2/12 * * *",
                Some(("2027-03-28T12:30:00Z", "2026-10-25T13:30:00Z")),
            ),
        ] {
            let s = Schedule::parse(expr, Berlin).unwrap();
            for (day, expected, early, later) in [
                (
                    "2027-03-28",
                    spring,
                    "2027-03-28T00:30:00Z",
                    extra.map(|e| e.0),
                ),
                (
                    "2026-10-25",
                    autumn,
                    "2026-10-24T23:30:00Z",
                    extra.map(|e| e.1),
                ),
            ] {
                let start = Berlin
                    .from_local_datetime(&format!("{day}T00:00:00").parse().unwrap())
                    .unwrap()
                    .with_timezone(&Utc);
                let (slots, _) = s.slots_in(start, start + Duration::hours(24));
                let mut want = vec![utc(expected)];
                if expr.contains("1-2") {
                    want.insert(0, utc(early)); // 01:30 exists on both days
                }
                want.extend(later.map(utc));
                assert_eq!(slots, want, "{expr} on {day}");
            }
        }
    }

    #[test]
    fn interval_slots_are_aligned_to_the_epoch_and_counted_past_the_cap() {
        let s = Schedule::parse("every 15m", chrono_tz::UTC).unwrap();
        let (slots, older) = s.slots_in(utc("2026-01-01T00:07:00Z"), utc("2026-01-01T01:00:00Z"));
        assert_eq!(slots.len(), 4);
        assert_eq!(slots[0], utc("2026-01-01T00:15:00Z"));
        assert_eq!(older, 0);
        let ten = Schedule::parse("every 10s", chrono_tz::UTC).unwrap();
        let (slots, older) = ten.slots_in(utc("2026-01-01T00:00:00Z"), utc("2026-01-02T01:00:00Z"));
        assert_eq!(slots.len(), MAX_SLOTS);
        assert_eq!(older as usize + MAX_SLOTS, 25 * 360);
        assert_eq!(*slots.last().unwrap(), utc("2026-01-02T01:00:00Z"));
        assert!(ten.is_frequent() && s.is_frequent());
        // The oldest page instead, for a catch-up that runs them all.
        let (first, more) =
            ten.first_slots_in(utc("2026-01-01T00:00:00Z"), utc("2026-01-02T01:00:00Z"));
        assert_eq!((first.len(), more), (MAX_SLOTS, true));
        assert_eq!(first[0], utc("2026-01-01T00:00:10Z"));
        assert_eq!(first[MAX_SLOTS - 1], utc("2026-01-01T01:23:20Z"));
        let (rest, more) = ten.first_slots_in(first[MAX_SLOTS - 1], utc("2026-01-01T01:30:00Z"));
        assert_eq!((rest.len(), more), (40, false));
        assert!(!Schedule::parse("0 5 * * *", Berlin).unwrap().is_frequent());
        assert!(!Schedule::parse("0 * * * *", Berlin).unwrap().is_frequent());
        assert!(
            !Schedule::parse("0 * * * *", Berlin)
                .unwrap()
                .stops_manual_clock()
        );
        assert!(
            Schedule::parse("0 5 * * *", Berlin)
                .unwrap()
                .stops_manual_clock()
        );
        assert!(
            Schedule::parse("*/5 * * * *", Berlin)
                .unwrap()
                .is_frequent()
        );
        // As frequent as its longest gap: daily, though two slots are 10 minutes apart.
        let daily_pair = Schedule::parse("0,10 2 * * *", Berlin).unwrap();
        assert_eq!(
            daily_pair.period(),
            Duration::hours(23) + Duration::minutes(50)
        );
        assert!(!daily_pair.is_frequent() && daily_pair.stops_manual_clock());
        for (expr, period) in [
            ("0 6 * * 3", Duration::weeks(1)),
            ("*/5 9-17 * * *", Duration::hours(15) + Duration::minutes(5)),
            ("* * * * * *", Duration::seconds(1)),
        ] {
            assert_eq!(
                Schedule::parse(expr, Berlin).unwrap().period(),
                period,
                "{expr}"
            );
        }
        assert_eq!(
            Schedule::parse("0 * * * *", Berlin).unwrap().period(),
            Duration::hours(1)
        );
        assert_eq!(s.describe(), "every 15 minutes (UTC)");
        assert_eq!(
            Schedule::parse("every 1h", Berlin).unwrap().describe(),
            "every hour (UTC)"
        );
    }

    #[test]
    fn bad_schedules_say_why() {
        for bad in [
            "every 7m",
            "every 0s",
            "every 5d",
            "every m",
            "61 * * * *",
            "hello",
        ] {
            assert!(Schedule::parse(bad, Berlin).is_err(), "{bad}");
        }
    }

    #[test]
    fn catch_up_policies() {
        let now = utc("2026-01-02T05:00:00Z");
        let hourly: Vec<_> = (0..5).map(|h| now - Duration::hours(4 - h)).collect();
        let grace = Duration::minutes(30);
        let runs = |d: &[SlotDecision]| d.iter().filter(|x| x.skip.is_none()).count();
        let all = plan_catch_up(CatchUp::All, grace, now, &hourly, 0, false);
        assert_eq!((all.len(), runs(&all)), (5, 5));
        assert_eq!(all.iter().filter(|d| d.late).count(), 4);
        let latest = plan_catch_up(CatchUp::Latest, grace, now, &hourly, 0, false);
        assert_eq!((latest.len(), runs(&latest)), (5, 1));
        assert_eq!(latest[4].skip, None);
        assert!(latest[..4].iter().all(|d| d.skip == Some("coalesced")));
        let folded = plan_catch_up(CatchUp::Latest, grace, now, &hourly, 7, true);
        assert_eq!(
            folded,
            [SlotDecision {
                at: now,
                skip: None,
                late: false,
                coalesced: 11
            }]
        );
        let skip = plan_catch_up(CatchUp::Skip, grace, now, &hourly, 0, false);
        assert_eq!((skip.len(), runs(&skip)), (5, 1));
        assert!(skip[..4].iter().all(|d| d.skip == Some("missed_grace")));
        let only_late = plan_catch_up(CatchUp::Skip, grace, now, &hourly[..3], 0, true);
        assert_eq!(only_late.len(), 1);
        assert_eq!(
            (only_late[0].skip, only_late[0].coalesced),
            (Some("missed_grace"), 2)
        );
        assert!(plan_catch_up(CatchUp::All, grace, now, &[], 0, true).is_empty());
    }

    proptest! {
        #[test]
        fn interval_slots_tile(period in prop::sample::select(vec![1i64, 10, 60, 900, 3600]),
                               start in 0i64..10_000_000, len in 0i64..200_000) {
            let s = Schedule::Every { period: Duration::seconds(period) };
            let after = DateTime::from_timestamp(1_700_000_000 + start, 0).unwrap();
            let up_to = after + Duration::seconds(len);
            let (slots, older) = s.slots_in(after, up_to);
            prop_assert_eq!(older as i64 + slots.len() as i64, (up_to.timestamp().div_euclid(period)) - (after.timestamp().div_euclid(period)));
            for w in slots.windows(2) { prop_assert_eq!(w[1] - w[0], Duration::seconds(period)); }
            for x in &slots { prop_assert!(*x > after && *x <= up_to); }
        }

        #[test]
        fn cron_slots_chain_and_never_repeat(zone in prop::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Kolkata"]),
                                             expr in prop::sample::select(vec!["30 2 * * *", "0 6 * * 3", "0 * * * *", "15 1 * * *"]),
                                             day in 0i64..1000) {
            let s = Schedule::parse(expr, zone.parse().unwrap()).unwrap();
            let after = utc("2026-01-01T00:00:00Z") + Duration::days(day);
            let (slots, _) = s.slots_in(after, after + Duration::days(20));
            for w in slots.windows(2) {
                prop_assert!(w[0] < w[1]);
                prop_assert_eq!(s.next_after(w[0]), Some(w[1]));
            }
            if expr.ends_with("* * *") && !expr.starts_with("0 *") {
                // A daily job: exactly one slot per local date.
                let tz: Tz = zone.parse().unwrap();
                let mut dates: Vec<_> = slots.iter().map(|x| x.with_timezone(&tz).date_naive()).collect();
                let n = dates.len();
                dates.dedup();
                prop_assert_eq!(dates.len(), n);
            }
        }

        #[test]
        fn retry_delays_stay_under_the_cap(attempt in 1u32..100, jitter in 0.0f64..1.0) {
            let cap = Duration::minutes(30);
            let d = retry_delay(attempt, Duration::seconds(10), cap, jitter);
            prop_assert!(d <= cap && d >= Duration::seconds(5));
            prop_assert!(retry_delay(attempt, Duration::seconds(10), cap, 0.0) <= retry_delay(attempt + 1, Duration::seconds(10), cap, 0.0));
        }
    }
}
