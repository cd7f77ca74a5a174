//! The ripening planner (DESIGN.md "Ripening planner"): the cheapest box that has at least
//! `portions_per_day` surely-ready portions (flowers: stems in bloom) on every day until the
//! next delivery, and the backward schedule of each line (warehouse ripening start, grower
//! order-by date).
//!
//! Day 0 is the delivery day. An item shipped with `k` days of warehouse ripening done is
//! surely ready on days `max(r_max − k, 0) ..= max(r_min − k, 0) + w − 1`. Each (item, k)
//! choice covers a run of consecutive days; counts are integers; a variety cap and ethylene
//! separation (no high producer with a sensitive item) make it a small MIP, solved exactly by
//! `good_lp`'s pure-Rust branch and bound.

use good_lp::{
    Expression, ProblemVariables, Solution, SolverModel, Variable, constraint, microlp, variable,
};

/// How much ethylene an item gives off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ethylene {
    None,
    Low,
    Medium,
    High,
}

impl Ethylene {
    /// Every level, least first.
    pub const ALL: [Ethylene; 4] = [
        Ethylene::None,
        Ethylene::Low,
        Ethylene::Medium,
        Ethylene::High,
    ];

    /// Reads the shipped catalog's wording ("very high", "n/a", …), where any word it does not
    /// know means no ethylene worth separating.
    pub fn parse(s: &str) -> Ethylene {
        match s.trim() {
            "high" | "very high" => Ethylene::High,
            "medium" => Ethylene::Medium,
            "low" => Ethylene::Low,
            _ => Ethylene::None,
        }
    }

    /// A level as the API and the store spell it ([`Ethylene::as_str`]); `None` for any other
    /// word, so a typo is refused instead of read as no ethylene.
    pub fn from_name(s: &str) -> Option<Ethylene> {
        Ethylene::ALL.into_iter().find(|e| e.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ethylene::None => "none",
            Ethylene::Low => "low",
            Ethylene::Medium => "medium",
            Ethylene::High => "high",
        }
    }
}

/// A catalog item as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub sku: String,
    pub ripening_days_min: i64,
    pub ripening_days_max: i64,
    pub ready_window_days: i64,
    pub unit_cost_minor: i64,
    pub ethylene_producer: Ethylene,
    pub ethylene_sensitive: bool,
    /// Months (1–12) it can be bought.
    pub available_months: Vec<u32>,
    /// Days the grower needs between order and delivery to our warehouse.
    pub lead_time_days: i64,
}

impl Item {
    /// The days (relative to delivery) on which the item is surely ready when shipped with
    /// `k` days of ripening done, or `None` when no day can be promised.
    pub fn ready_days(&self, k: i64) -> Option<(i64, i64)> {
        let from = (self.ripening_days_max - k).max(0);
        let to = (self.ripening_days_min - k).max(0) + self.ready_window_days - 1;
        (from <= to).then_some((from, to))
    }
}

/// What to plan for.
#[derive(Debug, Clone)]
pub struct BoxRequest<'a> {
    pub items: &'a [Item],
    /// Days the box must cover (7 × cadence weeks).
    pub period_days: i64,
    pub portions_per_day: i64,
    pub exclusions: &'a [String],
    /// Month of the delivery day.
    pub month: u32,
    /// At most this many different items.
    pub variety_cap: usize,
    /// Days from today to the delivery day; with `transit_days` it bounds how much warehouse
    /// ripening (and grower lead time) can still fit: `k + lead + transit ≤ days_ahead`.
    pub days_ahead: i64,
    pub transit_days: i64,
}

/// One line of a planned box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxLine {
    pub sku: String,
    pub qty: i64,
    /// Days of warehouse ripening done before dispatch.
    pub ripened_days: i64,
    /// First and last day (relative to delivery, inclusive) it is surely ready.
    pub ready_from: i64,
    pub ready_until: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxPlan {
    pub lines: Vec<BoxLine>,
    pub cost_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no box can cover every day: {0}")]
    Infeasible(String),
}

/// The choices open to the planner: (item index, k, first day, last day), clipped to the
/// period, for items not excluded, in season, and still orderable in time.
fn choices(req: &BoxRequest<'_>) -> Vec<(usize, i64, i64, i64)> {
    let mut out = Vec::new();
    for (i, item) in req.items.iter().enumerate() {
        if req.exclusions.contains(&item.sku) || !item.available_months.contains(&req.month) {
            continue;
        }
        let latest_k = req.days_ahead - req.transit_days - item.lead_time_days;
        for k in 0..=item.ripening_days_max.min(latest_k) {
            if let Some((from, to)) = item.ready_days(k) {
                let to = to.min(req.period_days - 1);
                if from <= to {
                    out.push((i, k, from, to));
                }
            }
        }
    }
    out
}

/// Whether two items may not share a box.
fn clash(a: &Item, b: &Item) -> bool {
    (a.ethylene_producer == Ethylene::High && b.ethylene_sensitive)
        || (b.ethylene_producer == Ethylene::High && a.ethylene_sensitive)
}

/// The cheapest box covering every day of the period.
pub fn plan_box(req: &BoxRequest<'_>) -> Result<BoxPlan, PlanError> {
    let options = choices(req);
    let need = req.portions_per_day;
    for d in 0..req.period_days {
        if !options.iter().any(|&(_, _, from, to)| from <= d && d <= to) {
            return Err(PlanError::Infeasible(format!(
                "nothing available can be ready on day {d} after delivery"
            )));
        }
    }
    let mut vars = ProblemVariables::new();
    let counts: Vec<Variable> = options
        .iter()
        .map(|_| vars.add(variable().integer().min(0).max(need as f64)))
        .collect();
    let used_items: Vec<usize> = {
        let mut v: Vec<usize> = options.iter().map(|o| o.0).collect();
        v.dedup();
        v
    };
    let chosen: Vec<Variable> = used_items
        .iter()
        .map(|_| vars.add(variable().binary()))
        .collect();
    let index_of = |item: usize| used_items.iter().position(|&u| u == item).expect("listed");
    let cost: Expression = options
        .iter()
        .zip(&counts)
        .map(|(&(i, ..), &n)| req.items[i].unit_cost_minor as f64 * n)
        .sum();
    let mut model = vars.minimise(cost).using(microlp);
    for d in 0..req.period_days {
        let covering: Expression = options
            .iter()
            .zip(&counts)
            .filter(|((_, _, from, to), _)| *from <= d && d <= *to)
            .map(|(_, &n)| Expression::from(n))
            .sum();
        model = model.with(constraint!(covering >= need as f64));
    }
    // A count needs its item chosen; at most `variety_cap` items; no ethylene clashes.
    for (o, &n) in options.iter().zip(&counts) {
        let y = chosen[index_of(o.0)];
        model = model.with(constraint!(n <= need as f64 * y));
    }
    let all: Expression = chosen.iter().map(|&y| Expression::from(y)).sum();
    model = model.with(constraint!(all <= req.variety_cap as f64));
    for (a, &ia) in used_items.iter().enumerate() {
        for (b, &ib) in used_items.iter().enumerate().skip(a + 1) {
            if clash(&req.items[ia], &req.items[ib]) {
                model = model.with(constraint!(chosen[a] + chosen[b] <= 1));
            }
        }
    }
    let solution = model
        .solve()
        .map_err(|e| PlanError::Infeasible(e.to_string()))?;
    let mut lines = Vec::new();
    for (&(i, k, from, to), &n) in options.iter().zip(&counts) {
        let qty = solution.value(n).round() as i64;
        if qty > 0 {
            lines.push(BoxLine {
                sku: req.items[i].sku.clone(),
                qty,
                ripened_days: k,
                ready_from: from,
                ready_until: to,
            });
        }
    }
    // Eat first what is ready first.
    lines.sort_by(|a, b| {
        (a.ready_from, a.ready_until, &a.sku).cmp(&(b.ready_from, b.ready_until, &b.sku))
    });
    let cost_minor = lines
        .iter()
        .map(|l| {
            let item = req.items.iter().find(|i| i.sku == l.sku).expect("planned");
            item.unit_cost_minor * l.qty
        })
        .sum();
    Ok(BoxPlan { lines, cost_minor })
}

/// Whether the request can be met in at least one month of the year (its own `month` is
/// ignored): what a plan, or a subscriber's exclusions, must allow. Months without a box are
/// skipped at their cutoffs, never billed.
pub fn feasible_in_some_month(req: &BoxRequest<'_>) -> bool {
    (1..=12).any(|month| {
        plan_box(&BoxRequest {
            month,
            ..req.clone()
        })
        .is_ok()
    })
}

/// Surely-ready portions on each day of the period.
pub fn coverage(lines: &[BoxLine], period_days: i64) -> Vec<i64> {
    (0..period_days)
        .map(|d| {
            lines
                .iter()
                .filter(|l| l.ready_from <= d && d <= l.ready_until)
                .map(|l| l.qty)
                .sum()
        })
        .collect()
}

/// Whether a box already planned, with lines `(sku, ripened_days)`, can still be ordered for
/// the delivery `req` describes: every line's item is in `req.items` and its grower order-by
/// date ([`backward_schedule`]) is not before today, the rule [`plan_box`] plans by. A box
/// planned weeks ahead stops being orderable as its order-by dates pass. An empty box is no
/// box: it is never orderable.
pub fn still_orderable<'a>(
    req: &BoxRequest<'_>,
    lines: impl Iterator<Item = (&'a str, i64)>,
) -> bool {
    let mut lines = lines.peekable();
    lines.peek().is_some()
        && lines.all(|(sku, ripened_days)| {
            req.items.iter().any(|item| {
                item.sku == sku
                    && ripened_days + req.transit_days + item.lead_time_days <= req.days_ahead
            })
        })
}

/// Working backwards from a delivery on day 0: (dispatch, ripening start, grower order-by),
/// as day offsets.
pub fn backward_schedule(
    ripened_days: i64,
    transit_days: i64,
    lead_time_days: i64,
) -> (i64, i64, i64) {
    let dispatch = -transit_days;
    let ripening_start = dispatch - ripened_days;
    (dispatch, ripening_start, ripening_start - lead_time_days)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_api_names_each_ethylene_level_one_way() {
        for level in Ethylene::ALL {
            assert_eq!(Ethylene::from_name(level.as_str()), Some(level));
        }
        // The shipped data's wording is read by `parse`, never taken from a client.
        for word in ["very high", "n/a", "High", "hihg", ""] {
            assert_eq!(Ethylene::from_name(word), None, "{word}");
        }
        assert_eq!(Ethylene::parse("very high"), Ethylene::High);
        assert_eq!(Ethylene::parse("n/a"), Ethylene::None);
    }

    fn item(sku: &str, r: (i64, i64), w: i64, cost: i64) -> Item {
        Item {
            sku: sku.into(),
            ripening_days_min: r.0,
            ripening_days_max: r.1,
            ready_window_days: w,
            unit_cost_minor: cost,
            ethylene_producer: Ethylene::None,
            ethylene_sensitive: false,
            available_months: (1..=12).collect(),
            lead_time_days: 1,
        }
    }

    fn request<'a>(
        items: &'a [Item],
        exclusions: &'a [String],
        period: i64,
        need: i64,
    ) -> BoxRequest<'a> {
        BoxRequest {
            items,
            period_days: period,
            portions_per_day: need,
            exclusions,
            month: 10,
            variety_cap: 6,
            days_ahead: 30,
            transit_days: 1,
        }
    }

    #[test]
    fn staggers_ripening_to_cover_the_week() {
        // Mangoes ripen in 3–4 days and stay ready 4: one shipped ripe covers days 0–3, one
        // shipped unripe covers days 4–6. Two mangoes beat one expensive orange.
        let items = [item("mango", (3, 4), 4, 20), item("orange", (0, 0), 7, 100)];
        let plan = plan_box(&request(&items, &[], 7, 1)).unwrap();
        assert_eq!(plan.cost_minor, 40, "{plan:?}");
        assert!(coverage(&plan.lines, 7).iter().all(|&c| c >= 1), "{plan:?}");
        let stages: Vec<i64> = plan.lines.iter().map(|l| l.ripened_days).collect();
        assert_eq!(stages, [4, 0], "ripe first, then one that ripens at home");
    }

    #[test]
    fn exclusions_seasons_and_clashes_are_respected() {
        let mut apple = item("apple", (0, 0), 7, 10);
        apple.ethylene_producer = Ethylene::High;
        let mut kiwi = item("kiwi", (0, 0), 7, 4);
        kiwi.ethylene_sensitive = true;
        let orange = item("orange", (0, 0), 7, 30);
        let items = [apple, kiwi, orange];
        // Two portions a day: two kiwis, never a kiwi beside an apple.
        let plan = plan_box(&request(&items, &[], 7, 2)).unwrap();
        let skus: Vec<&str> = plan.lines.iter().map(|l| l.sku.as_str()).collect();
        assert_eq!((skus, plan.cost_minor), (vec!["kiwi"], 8));
        let excluded = ["kiwi".to_string()];
        let plan = plan_box(&request(&items, &excluded, 7, 2)).unwrap();
        assert!(plan.lines.iter().all(|l| l.sku == "apple"));
        let mut summer = items.to_vec();
        for it in &mut summer {
            it.available_months = vec![6, 7, 8];
        }
        assert!(
            plan_box(&request(&summer, &[], 7, 1)).is_err(),
            "nothing in season in October"
        );
    }

    #[test]
    fn late_orders_switch_to_items_that_can_still_make_it() {
        let mut slow = item("mango", (0, 0), 7, 10);
        slow.lead_time_days = 5;
        let fast = item("orange", (0, 0), 7, 40);
        let items = [slow, fast];
        let mut req = request(&items, &[], 7, 1);
        req.days_ahead = 3; // the mango grower needs 5 days: too late
        let plan = plan_box(&req).unwrap();
        assert_eq!(plan.lines[0].sku, "orange");
        assert_eq!(backward_schedule(2, 1, 3), (-1, -3, -6));
    }

    /// The cheapest cover by brute force over counts 0..=need per choice.
    fn brute_force(req: &BoxRequest<'_>) -> Option<i64> {
        let options = choices(req);
        let need = req.portions_per_day;
        let mut best: Option<i64> = None;
        let mut counts = vec![0i64; options.len()];
        loop {
            let mut items_used: Vec<usize> = options
                .iter()
                .zip(&counts)
                .filter(|(_, c)| **c > 0)
                .map(|(o, _)| o.0)
                .collect();
            items_used.sort_unstable();
            items_used.dedup();
            let covered = (0..req.period_days).all(|d| {
                options
                    .iter()
                    .zip(&counts)
                    .filter(|(o, _)| o.2 <= d && d <= o.3)
                    .map(|(_, c)| c)
                    .sum::<i64>()
                    >= need
            });
            let clashes = items_used.iter().any(|&a| {
                items_used
                    .iter()
                    .any(|&b| a != b && clash(&req.items[a], &req.items[b]))
            });
            if covered && !clashes && items_used.len() <= req.variety_cap {
                let cost = options
                    .iter()
                    .zip(&counts)
                    .map(|(o, c)| req.items[o.0].unit_cost_minor * c)
                    .sum();
                best = Some(best.map_or(cost, |b: i64| b.min(cost)));
            }
            let mut i = 0;
            loop {
                if i == counts.len() {
                    return best;
                }
                counts[i] += 1;
                if counts[i] <= need {
                    break;
                }
                counts[i] = 0;
                i += 1;
            }
        }
    }

    fn arb_item() -> impl Strategy<Value = Item> {
        (
            0i64..2,
            0i64..2,
            1i64..4,
            1i64..50,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(rmin, extra, w, cost, high, sensitive)| {
                let mut it = item("x", (rmin, rmin + extra), w, cost);
                it.ethylene_producer = if high { Ethylene::High } else { Ethylene::Low };
                it.ethylene_sensitive = sensitive;
                it
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn the_plan_is_the_cheapest_cover(
            mut items in proptest::collection::vec(arb_item(), 1..4),
            period in 2i64..5,
            need in 1i64..3,
            cap in 1usize..4,
            exclude_first in any::<bool>(),
        ) {
            for (i, it) in items.iter_mut().enumerate() {
                it.sku = format!("item{i}");
            }
            let exclusions = if exclude_first { vec!["item0".to_string()] } else { vec![] };
            let mut req = request(&items, &exclusions, period, need);
            req.variety_cap = cap;
            match plan_box(&req) {
                Ok(plan) => {
                    prop_assert!(coverage(&plan.lines, period).iter().all(|&c| c >= need), "{:?}", plan);
                    prop_assert!(plan.lines.iter().all(|l| !exclusions.contains(&l.sku)));
                    prop_assert_eq!(Some(plan.cost_minor), brute_force(&req));
                }
                Err(_) => prop_assert_eq!(brute_force(&req), None),
            }
        }

        #[test]
        fn a_box_is_feasible_in_some_month_exactly_when_one_exists_and_exclusions_only_narrow_it(
            mut items in proptest::collection::vec(arb_item(), 1..4),
            months in proptest::collection::vec(proptest::collection::vec(1u32..13, 1..3), 3),
            period in 2i64..5,
            need in 1i64..3,
            exclude_first in any::<bool>(),
        ) {
            for (i, it) in items.iter_mut().enumerate() {
                it.sku = format!("item{i}");
                it.available_months = months[i % months.len()].clone();
            }
            let exclusions = if exclude_first { vec!["item0".to_string()] } else { vec![] };
            let req = request(&items, &exclusions, period, need);
            let some_month = (1..=12).any(|month| brute_force(&BoxRequest { month, ..req.clone() }).is_some());
            prop_assert_eq!(feasible_in_some_month(&req), some_month);
            if feasible_in_some_month(&req) {
                prop_assert!(feasible_in_some_month(&request(&items, &[], period, need)));
            }
        }

        #[test]
        fn a_planned_box_stays_orderable_until_a_line_s_order_by_date_passes(
            mut items in proptest::collection::vec(arb_item(), 1..4),
            leads in proptest::collection::vec(0i64..6, 3),
            period in 2i64..5,
            need in 1i64..3,
            days_ahead in 2i64..12,
        ) {
            for (i, it) in items.iter_mut().enumerate() {
                it.sku = format!("item{i}");
                it.lead_time_days = leads[i % leads.len()];
            }
            let mut req = request(&items, &[], period, need);
            req.days_ahead = days_ahead;
            if let Ok(plan) = plan_box(&req) {
                let lines = || plan.lines.iter().map(|l| (l.sku.as_str(), l.ripened_days));
                prop_assert!(still_orderable(&req, lines()), "a fresh plan is orderable: {:?}", plan);
                // The latest order-by date among the lines: a day later, one of them has passed.
                let slack = plan.lines.iter()
                    .map(|l| {
                        let lead = items.iter().find(|i| i.sku == l.sku).unwrap().lead_time_days;
                        days_ahead - (l.ripened_days + req.transit_days + lead)
                    })
                    .min().unwrap();
                for later in 0..=slack + 1 {
                    let closer = BoxRequest { days_ahead: days_ahead - later, ..req.clone() };
                    prop_assert_eq!(still_orderable(&closer, lines()), later <= slack);
                }
                let gone = BoxRequest { items: &items[..0], ..req.clone() };
                prop_assert!(!still_orderable(&gone, lines()), "an item no longer sold cannot be ordered");
            }
            prop_assert!(!still_orderable(&req, std::iter::empty()), "an empty box is no box");
        }
    }
}
