//! Subscription rules (DESIGN.md "Subscription rules"): delivery dates that tile time without
//! gaps, each delivery's cutoff in the plan's zone, which deliveries bill, and the dunning
//! schedule.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc, Weekday};
use chrono_tz::Tz;

/// `mon` … `sun`.
pub fn parse_weekday(s: &str) -> Option<Weekday> {
    match s.trim().to_ascii_lowercase().as_str() {
        "mon" => Some(Weekday::Mon),
        "tue" => Some(Weekday::Tue),
        "wed" => Some(Weekday::Wed),
        "thu" => Some(Weekday::Thu),
        "fri" => Some(Weekday::Fri),
        "sat" => Some(Weekday::Sat),
        "sun" => Some(Weekday::Sun),
        _ => None,
    }
}

pub fn weekday_name(w: Weekday) -> &'static str {
    match w {
        Weekday::Mon => "mon",
        Weekday::Tue => "tue",
        Weekday::Wed => "wed",
        Weekday::Thu => "thu",
        Weekday::Fri => "fri",
        Weekday::Sat => "sat",
        Weekday::Sun => "sun",
    }
}

/// The first delivery: the first `weekday` on or after `start`.
pub fn first_delivery(start: NaiveDate, weekday: Weekday) -> NaiveDate {
    let ahead = (7 + weekday.num_days_from_monday() as i64
        - start.weekday().num_days_from_monday() as i64)
        % 7;
    start + Duration::days(ahead)
}

/// Delivery dates from the first one, every `cadence_weeks`, that fall in `[from, until)`.
/// Consecutive dates are exactly one period apart, so the periods they cover tile time.
pub fn deliveries_between(
    first: NaiveDate,
    cadence_weeks: i64,
    from: NaiveDate,
    until: NaiveDate,
) -> Vec<NaiveDate> {
    let period = 7 * cadence_weeks;
    let skip = if from > first {
        ((from - first).num_days() + period - 1) / period
    } else {
        0
    };
    let mut d = first + Duration::days(skip * period);
    let mut out = Vec::new();
    while d < until {
        out.push(d);
        d += Duration::days(period);
    }
    out
}

/// The start of `date` in `zone` (the earliest valid local instant, so a DST gap at midnight
/// moves it forward, never backward).
pub fn start_of_day(date: NaiveDate, zone: Tz) -> DateTime<Utc> {
    let mut t = date.and_hms_opt(0, 0, 0).expect("midnight");
    loop {
        if let Some(local) = zone.from_local_datetime(&t).earliest() {
            return local.with_timezone(&Utc);
        }
        t += Duration::minutes(15);
    }
}

/// The cutoff of a delivery: `cutoff_hours` before its day starts in the plan's zone.
pub fn cutoff_at(date: NaiveDate, zone: Tz, cutoff_hours: i64) -> DateTime<Utc> {
    start_of_day(date, zone) - Duration::hours(cutoff_hours)
}

/// Whether a delivery in this status is billed at its cutoff: skipped (and paused) deliveries
/// never are.
pub fn bills(status: &str) -> bool {
    status == "scheduled"
}

/// The status a delivery is shown in on `today` (the plan zone's date): a paid box leaves
/// the warehouse `transit_days` before its date and reads `dispatched` from that day on. An
/// unpaid one is held (`payment_failed`) and leaves once its invoice is paid.
pub fn shown_status(status: &str, date: NaiveDate, today: NaiveDate, transit_days: i64) -> &str {
    if status == "paid" && today >= date - Duration::days(transit_days) {
        "dispatched"
    } else {
        status
    }
}

/// What dunning does after the `failures`-th failed attempt of an invoice first declined at
/// `first_failure`: retry at the next step, or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dunning {
    RetryAt(DateTime<Utc>),
    Suspend,
}

pub fn dunning_step(first_failure: DateTime<Utc>, failures: usize, steps_days: &[i64]) -> Dunning {
    match steps_days.get(failures.saturating_sub(1)) {
        Some(&days) => Dunning::RetryAt(first_failure + Duration::days(days)),
        None => Dunning::Suspend,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_paid_box_is_dispatched_and_only_from_its_dispatch_day() {
        let thu = date("2026-10-08");
        for (status, today, shown) in [
            ("paid", "2026-10-06", "paid"),
            ("paid", "2026-10-07", "dispatched"),
            ("paid", "2026-10-20", "dispatched"),
            ("payment_failed", "2026-10-20", "payment_failed"),
            ("locked", "2026-10-07", "locked"),
            ("skipped", "2026-10-20", "skipped"),
        ] {
            assert_eq!(
                shown_status(status, thu, date(today), 1),
                shown,
                "{status} {today}"
            );
        }
    }

    #[test]
    fn cutoffs_follow_the_zone_across_dst() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // Summer time: Thursday 22 Oct starts at 22:00 UTC the day before; 48 h earlier.
        assert_eq!(
            cutoff_at(date("2026-10-22"), berlin, 48).to_rfc3339(),
            "2026-10-19T22:00:00+00:00"
        );
        // Winter time after 25 Oct: the day starts at 23:00 UTC.
        assert_eq!(
            cutoff_at(date("2026-10-29"), berlin, 48).to_rfc3339(),
            "2026-10-26T23:00:00+00:00"
        );
        assert_eq!(
            first_delivery(date("2026-10-01"), Weekday::Thu),
            date("2026-10-01")
        );
        assert_eq!(
            first_delivery(date("2026-10-02"), Weekday::Thu),
            date("2026-10-08")
        );
    }

    #[test]
    fn dunning_walks_its_steps_then_suspends() {
        let t: DateTime<Utc> = "2026-10-01T00:00:00Z".parse().unwrap();
        let steps = [1, 3, 5];
        assert_eq!(
            dunning_step(t, 1, &steps),
            Dunning::RetryAt(t + Duration::days(1))
        );
        assert_eq!(
            dunning_step(t, 3, &steps),
            Dunning::RetryAt(t + Duration::days(5))
        );
        assert_eq!(dunning_step(t, 4, &steps), Dunning::Suspend);
        assert!(bills("scheduled") && !bills("skipped"));
    }

    proptest! {
        #[test]
        fn delivery_periods_tile_without_gaps(
            start in 0i64..3000, weekday in 0u32..7, cadence in 1i64..3,
            from_off in 0i64..400, len in 1i64..400,
        ) {
            let start = date("2024-01-01") + Duration::days(start);
            let first = first_delivery(start, Weekday::try_from(weekday as u8).unwrap());
            let from = start + Duration::days(from_off);
            let dates = deliveries_between(first, cadence, from, from + Duration::days(len));
            for pair in dates.windows(2) {
                prop_assert_eq!((pair[1] - pair[0]).num_days(), 7 * cadence);
            }
            for d in &dates {
                prop_assert!(*d >= from && *d >= first && (*d - first).num_days() % (7 * cadence) == 0);
            }
            // No delivery date in the range is missed.
            let expected = (0..len).map(|i| from + Duration::days(i))
                .filter(|d| *d >= first && (*d - first).num_days() % (7 * cadence) == 0)
                .count();
            prop_assert_eq!(dates.len(), expected);
        }

        #[test]
        fn skips_never_bill(status in prop_oneof![Just("skipped"), Just("locked"), Just("paid")]) {
            prop_assert!(!bills(status));
        }
    }
}
