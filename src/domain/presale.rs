//! Presale rules (DESIGN.md "Presale rules"): manufacturer quotes with price breaks, the award
//! (the cheapest way to source a pooled quantity), the one price everyone pays, the ceiling,
//! the tiers shown to shoppers, balances, and the per-variant lines of purchase orders.
//!
//! Quotes use all-units pricing: ordering `x` units at a quote costs `x × price(x)`, where
//! `price(x)` is the price of the highest break with `min_qty ≤ x`; its first `min_qty` is the
//! minimum order and `capacity` the most it can make.

use super::money::{Currency, Money, MoneyError, UnitPrice, allocate_units};
use rust_decimal::Decimal;

/// One price break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub min_qty: i64,
    pub unit_price: UnitPrice,
}

/// A manufacturer's quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub tiers: Vec<Tier>,
    pub capacity: Option<i64>,
    pub lead_time_days: i64,
}

/// The most units a quote may name, as a break or a capacity: far above any real order, and
/// low enough that no award's exact cost can overflow.
pub const MAX_QTY: i64 = 100_000_000;

/// The most quotes a campaign takes: the award tries every combination of their breaks.
pub const MAX_QUOTES: usize = 6;

/// The most combinations of breaks (Π (breaks + 1) over the quotes) the award may try, which
/// keeps every price computation of a campaign in the milliseconds.
pub const MAX_COMBINATIONS: u64 = 1024;

/// Why a quote's breaks are refused.
pub fn check_tiers(tiers: &[Tier], capacity: Option<i64>) -> Result<(), String> {
    let Some(first) = tiers.first() else {
        return Err("must have at least one price break".into());
    };
    if tiers.len() > 20 {
        return Err("must have at most 20 price breaks".into());
    }
    if first.min_qty < 1 {
        return Err("min_qty must be at least 1".into());
    }
    if tiers.iter().any(|t| t.min_qty > MAX_QTY) {
        return Err(format!("min_qty must be at most {MAX_QTY}"));
    }
    for pair in tiers.windows(2) {
        if pair[1].min_qty <= pair[0].min_qty {
            return Err("min_qty must strictly increase from one break to the next".into());
        }
        // A break is a break: more units never cost more per unit.
        if pair[1].unit_price >= pair[0].unit_price {
            return Err("unit_price must strictly decrease as min_qty increases".into());
        }
    }
    if let Some(cap) = capacity
        && cap < first.min_qty
    {
        return Err("capacity must be at least the minimum order".into());
    }
    Ok(())
}

impl Quote {
    /// The minimum order.
    pub fn min_order(&self) -> i64 {
        self.tiers[0].min_qty
    }

    /// The last (largest) break.
    pub fn last_break(&self) -> Tier {
        self.tiers[self.tiers.len() - 1]
    }

    /// The unit price at `qty` units, or `None` below the minimum or above capacity.
    pub fn price_at(&self, qty: i64) -> Option<UnitPrice> {
        if qty < self.min_order() || self.capacity.is_some_and(|c| qty > c) {
            return None;
        }
        self.tiers
            .iter()
            .rev()
            .find(|t| t.min_qty <= qty)
            .map(|t| t.unit_price)
    }
}

/// What one quote supplies in an award.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwardLine {
    /// Index into the quotes the award was computed from.
    pub quote: usize,
    pub qty: i64,
    pub unit_price: UnitPrice,
}

/// The cheapest sourcing of a pooled quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Award {
    pub lines: Vec<AwardLine>,
    /// Units ordered: at least the pooled quantity (more when that is cheaper).
    pub ordered: i64,
    /// Exact cost, Σ qty × unit price.
    pub cost: Decimal,
}

/// The cheapest way to source at least `qty` units from `quotes`: each quote unused or ordered
/// between its minimum and its capacity; split across quotes and over-ordering allowed.
///
/// Exact: for every choice of one break (or none) per quote, every used quote takes at least
/// that break's `min_qty` at that break's price, and the rest goes to the cheapest of them up
/// to capacity (greedy is optimal once prices are fixed). Pricing a quantity beyond its own
/// bracket at the chosen break's price only overstates it, so the true optimum is among these
/// candidates. Quotes are few (a handful, ≤ 20 breaks each). Ties prefer fewer surplus units,
/// then earlier quotes.
pub fn award(quotes: &[Quote], qty: i64) -> Option<Award> {
    if qty < 1 {
        return None;
    }
    let mut best: Option<Award> = None;
    let mut choice = vec![0usize; quotes.len()]; // 0 = unused, k = break k−1
    loop {
        if let Some(candidate) = fill(quotes, &choice, qty) {
            let better = match &best {
                None => true,
                Some(b) => (candidate.cost, candidate.ordered) < (b.cost, b.ordered),
            };
            if better {
                best = Some(candidate);
            }
        }
        // Next combination (odometer over quotes).
        let mut i = 0;
        loop {
            if i == quotes.len() {
                return best;
            }
            choice[i] += 1;
            if choice[i] <= quotes[i].tiers.len() {
                break;
            }
            choice[i] = 0;
            i += 1;
        }
    }
}

/// The cheapest fill of `qty` with one fixed break per used quote, if feasible.
fn fill(quotes: &[Quote], choice: &[usize], qty: i64) -> Option<Award> {
    let mut lines: Vec<(AwardLine, i64)> = Vec::new(); // (line, room above its minimum)
    for (i, (&c, q)) in choice.iter().zip(quotes).enumerate() {
        if c == 0 {
            continue;
        }
        let tier = q.tiers[c - 1];
        let cap = q.capacity.unwrap_or(i64::MAX);
        if tier.min_qty > cap {
            return None;
        }
        lines.push((
            AwardLine {
                quote: i,
                qty: tier.min_qty,
                unit_price: tier.unit_price,
            },
            cap - tier.min_qty,
        ));
    }
    if lines.is_empty() {
        return None;
    }
    let mut missing = qty - lines.iter().map(|(l, _)| l.qty).sum::<i64>();
    // Cheapest first; stable, so equal prices keep quote order.
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.sort_by_key(|&i| lines[i].0.unit_price);
    for i in order {
        if missing <= 0 {
            break;
        }
        let take = missing.min(lines[i].1);
        lines[i].0.qty += take;
        missing -= take;
    }
    if missing > 0 {
        return None;
    }
    let lines: Vec<AwardLine> = lines.into_iter().map(|(l, _)| l).collect();
    let ordered = lines.iter().map(|l| l.qty).sum();
    let cost = lines
        .iter()
        .map(|l| l.unit_price.value() * Decimal::from(l.qty))
        .sum();
    Some(Award {
        lines,
        ordered,
        cost,
    })
}

/// The one price everyone pays at pooled quantity `qty`: award cost / qty, rounded half-even
/// to the currency's minor unit. `None` when nothing can be sourced.
pub fn price_at(quotes: &[Quote], qty: i64, currency: Currency) -> Option<Money> {
    let award = award(quotes, qty)?;
    Money::round(award.cost / Decimal::from(qty), currency).ok()
}

/// The smallest pooled quantity at which the campaign tips (the smallest minimum order).
pub fn tipping_qty(quotes: &[Quote]) -> Option<i64> {
    quotes.iter().map(Quote::min_order).min()
}

/// What a campaign's quotes fix before it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// The most units it can take (`None`: unbounded; `Some(0)` without quotes).
    pub capacity: Option<i64>,
    /// The most anyone will pay per unit (`None` without quotes).
    pub ceiling: Option<Money>,
}

/// Checks a campaign's whole set of quotes (each already passed [`check_tiers`]) and derives
/// its terms; the reason when the set is too large to price.
pub fn terms(quotes: &[Quote], currency: Currency) -> Result<Terms, String> {
    if quotes.len() > MAX_QUOTES {
        return Err(format!("a campaign takes at most {MAX_QUOTES} quotes"));
    }
    let combinations = combinations(quotes);
    if combinations > MAX_COMBINATIONS {
        return Err(format!(
            "the quotes' price breaks allow {combinations} combinations, at most \
             {MAX_COMBINATIONS} (Π (breaks + 1) over the quotes); quote fewer breaks"
        ));
    }
    Ok(Terms {
        capacity: if quotes.is_empty() {
            Some(0)
        } else {
            total_capacity(quotes)
        },
        ceiling: ceiling(quotes, currency),
    })
}

/// How many combinations of breaks the award tries: each quote unused or at one of its breaks.
fn combinations(quotes: &[Quote]) -> u64 {
    quotes
        .iter()
        .fold(1u64, |n, q| n.saturating_mul(q.tiers.len() as u64 + 1))
}

/// The most units the quotes can make together (`None`: unbounded).
pub fn total_capacity(quotes: &[Quote]) -> Option<i64> {
    quotes
        .iter()
        .map(|q| q.capacity)
        .try_fold(0i64, |sum, c| c.map(|c| sum.saturating_add(c)))
}

/// Above this many award computations (reachable quantities × combinations of breaks) the
/// ceiling is taken over the quantities where the price can turn (breaks, capacities and their
/// sums, ±1) rather than over every one.
const EXHAUSTIVE_BUDGET: u64 = 250_000;

/// The highest price over every reachable pooled quantity: nobody ever pays more. With one
/// quote that is the price at its minimum order; with several (and capacities) the price is
/// not monotone in the quantity, so it is computed, not assumed.
///
/// Past `hi` (every capacity used up and every break passed) each cheapest award is the
/// capped quotes cheaper than the marginal one at capacity, plus an unbounded quote at its last
/// break for the rest, so the price only rises from there, towards that last break's price.
/// That limit is the ceiling's bound beyond `hi`: why a quote without capacity beside capped
/// ones can make the ceiling higher than any price up to `hi`.
pub fn ceiling(quotes: &[Quote], currency: Currency) -> Option<Money> {
    let lo = tipping_qty(quotes)?;
    if quotes.len() == 1 {
        return price_at(quotes, lo, currency);
    }
    let hi = quotes
        .iter()
        .map(|q| q.capacity.unwrap_or(q.last_break().min_qty))
        .fold(0i64, i64::saturating_add)
        .max(lo);
    let span = (hi - lo + 1) as u64;
    let candidates: Vec<i64> = if span.saturating_mul(combinations(quotes)) <= EXHAUSTIVE_BUDGET {
        (lo..=hi).collect()
    } else {
        turning_points(quotes, lo, hi)
    };
    let limit = quotes
        .iter()
        .filter(|q| q.capacity.is_none())
        .map(|q| q.last_break().unit_price.value())
        .min()
        .and_then(|p| Money::round(p, currency).ok());
    candidates
        .into_iter()
        .filter_map(|q| price_at(quotes, q, currency))
        .chain(limit)
        .max_by_key(|m| m.minor())
}

/// Quantities where the award's structure can change.
fn turning_points(quotes: &[Quote], lo: i64, hi: i64) -> Vec<i64> {
    let mut points = vec![lo, hi];
    let caps: Vec<i64> = quotes.iter().filter_map(|q| q.capacity).collect();
    for q in quotes {
        points.extend(q.tiers.iter().map(|t| t.min_qty));
    }
    for mask in 1u32..(1 << caps.len().min(12)) {
        let sum: i64 = (0..caps.len())
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| caps[i])
            .sum();
        points.push(sum);
    }
    let base = points.clone();
    for p in base {
        points.push(p - 1);
        points.push(p + 1);
    }
    points.retain(|&p| (lo..=hi).contains(&p));
    points.sort_unstable();
    points.dedup();
    points
}

/// A step of the price shown to shoppers: from `min_qty` pooled units, `unit_price`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceStep {
    pub min_qty: i64,
    pub unit_price: Money,
}

/// The campaign's tiers: at each quote break, the price there, kept when it is lower than
/// every step before it.
pub fn price_steps(quotes: &[Quote], currency: Currency) -> Vec<PriceStep> {
    let mut breaks: Vec<i64> = quotes
        .iter()
        .flat_map(|q| q.tiers.iter().map(|t| t.min_qty))
        .collect();
    breaks.sort_unstable();
    breaks.dedup();
    let mut steps: Vec<PriceStep> = Vec::new();
    for qty in breaks {
        let Some(price) = price_at(quotes, qty, currency) else {
            continue;
        };
        if steps.last().is_none_or(|s| price < s.unit_price) {
            steps.push(PriceStep {
                min_qty: qty,
                unit_price: price,
            });
        }
    }
    steps
}

/// What a shopper sees at `pooled` units: the current price (none below the minimum), the next
/// cheaper step and how many units it still needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub current: Option<Money>,
    pub next: Option<PriceStep>,
    pub units_to_next: Option<i64>,
}

pub fn progress(quotes: &[Quote], pooled: i64, currency: Currency) -> Progress {
    let tipped = tipping_qty(quotes).is_some_and(|t| pooled >= t);
    let current = if tipped {
        price_at(quotes, pooled, currency)
    } else {
        None
    };
    let next = price_steps(quotes, currency)
        .into_iter()
        .find(|s| s.min_qty > pooled && current.is_none_or(|c| s.unit_price < c));
    Progress {
        current,
        units_to_next: next.map(|s| s.min_qty - pooled),
        next,
    }
}

/// The deposit per unit: `percent` of the reference price, rounded half-even.
pub fn deposit_per_unit(reference_price: Money, percent: Decimal) -> Result<Money, MoneyError> {
    reference_price.percent(percent)
}

/// What a pledge still owes at the locked price (negative: the deposit exceeded the price and
/// the difference is refunded).
pub fn balance(qty: i64, final_price: Money, deposit: Money) -> Result<Money, MoneyError> {
    final_price.times(qty)?.checked_sub(deposit)
}

/// Per-variant lines of each awarded quote: the ordered total is spread over the variants in
/// proportion to paid demand (largest remainder), then cut into the awarded quantities in
/// order, so every row (quote) and column (variant) sums exactly.
pub fn purchase_order_lines(award: &Award, demand: &[(String, i64)]) -> Vec<Vec<(String, i64)>> {
    let weights: Vec<u64> = demand.iter().map(|(_, q)| (*q).max(0) as u64).collect();
    // No variants (or no demand by variant): everything goes under the one product.
    let per_variant = allocate_units(award.ordered, &weights).unwrap_or_default();
    let mut columns: Vec<(String, i64)> = demand
        .iter()
        .map(|(v, _)| v.clone())
        .zip(per_variant)
        .collect();
    if columns.is_empty() {
        columns.push((String::new(), award.ordered));
    }
    let mut col = 0;
    award
        .lines
        .iter()
        .map(|line| {
            let mut need = line.qty;
            let mut lines = Vec::new();
            while need > 0 && col < columns.len() {
                let take = need.min(columns[col].1);
                if take > 0 {
                    lines.push((columns[col].0.clone(), take));
                    columns[col].1 -= take;
                    need -= take;
                }
                if columns[col].1 == 0 {
                    col += 1;
                }
            }
            lines
        })
        .collect()
}

/// Why a join was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinRefusal {
    NotOpen,
    /// Fewer units than asked were left (`left` of them).
    SoldOut {
        left: i64,
    },
}

/// Admits joins of `quantities` in order while the campaign's capacity allows (unbounded when
/// `None`), from `pooled` units already taken; returns each answer and the admitted total.
pub fn admit(
    quantities: impl Iterator<Item = i64>,
    pooled: i64,
    capacity: Option<i64>,
) -> (Vec<Result<(), JoinRefusal>>, i64) {
    let mut total = 0;
    let answers = quantities
        .map(|qty| {
            let left = capacity.map_or(i64::MAX, |cap| cap - pooled - total);
            if qty <= left {
                total += qty;
                Ok(())
            } else {
                Err(JoinRefusal::SoldOut { left: left.max(0) })
            }
        })
        .collect();
    (answers, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    fn quote(tiers: &[(i64, &str)], capacity: Option<i64>) -> Quote {
        Quote {
            tiers: tiers
                .iter()
                .map(|&(min_qty, p)| Tier {
                    min_qty,
                    unit_price: UnitPrice::parse(p).unwrap(),
                })
                .collect(),
            capacity,
            lead_time_days: 30,
        }
    }

    #[test]
    fn ordering_more_is_chosen_when_cheaper() {
        let q = quote(&[(100, "300"), (1000, "280")], Some(5000));
        let a = award(std::slice::from_ref(&q), 950).unwrap();
        assert_eq!((a.ordered, a.cost), (1000, Decimal::from(280_000)));
        assert_eq!(
            price_at(std::slice::from_ref(&q), 950, eur())
                .unwrap()
                .to_string(),
            "294.74"
        );
        assert_eq!(ceiling(&[q], eur()).unwrap().to_string(), "300.00");
    }

    #[test]
    fn the_down_jacket_reaches_thirty_percent_off() {
        let q = quote(&[(100, "180"), (500, "160"), (1000, "140")], Some(5000));
        let steps = price_steps(std::slice::from_ref(&q), eur());
        let shown: Vec<_> = steps
            .iter()
            .map(|s| (s.min_qty, s.unit_price.to_string()))
            .collect();
        assert_eq!(
            shown,
            [
                (100, "180.00".into()),
                (500, "160.00".into()),
                (1000, "140.00".into())
            ]
        );
        let p = progress(std::slice::from_ref(&q), 480, eur());
        // Ordering 500 × 160 beats 480 × 180: 80,000 / 480.
        assert_eq!(p.current.unwrap().to_string(), "166.67");
        assert_eq!((p.next.unwrap().min_qty, p.units_to_next), (500, Some(20)));
        assert_eq!(progress(std::slice::from_ref(&q), 99, eur()).current, None);
        assert_eq!(progress(&[q], 1200, eur()).next, None);
    }

    #[test]
    fn capacity_forces_a_split() {
        let a = quote(&[(100, "10")], Some(300));
        let b = quote(&[(200, "12")], Some(1000));
        let award = award(&[a, b], 450).unwrap();
        assert_eq!(award.ordered, 450);
        assert_eq!(
            award
                .lines
                .iter()
                .map(|l| (l.quote, l.qty))
                .collect::<Vec<_>>(),
            [(0, 250), (1, 200)]
        );
    }

    #[test]
    fn an_unbounded_quote_beside_a_capped_one_raises_the_ceiling() {
        // Up to 100 units come from A at 1.00; past them B's 5.00 takes over, so the price
        // climbs towards 5.00 (4.60 at 1,000 units) and the ceiling must cover it.
        let quotes = [quote(&[(10, "1")], Some(100)), quote(&[(10, "5")], None)];
        assert_eq!(price_at(&quotes, 1000, eur()).unwrap().to_string(), "4.60");
        assert_eq!(ceiling(&quotes, eur()).unwrap().to_string(), "5.00");
    }

    #[test]
    fn too_many_quotes_or_combinations_are_refused() {
        let one = quote(&[(10, "5")], Some(100));
        let seven = vec![one.clone(); MAX_QUOTES + 1];
        assert!(
            terms(&seven, eur())
                .unwrap_err()
                .contains("at most 6 quotes")
        );
        let breaks: Vec<(i64, String)> =
            (1..=10).map(|i| (i * 10, format!("{}", 100 - i))).collect();
        let breaks: Vec<(i64, &str)> = breaks.iter().map(|(q, p)| (*q, p.as_str())).collect();
        let wide = quote(&breaks, None);
        // 11 × 11 = 121 combinations are fine; 11³ = 1,331 are not.
        assert!(terms(&[wide.clone(), wide.clone()], eur()).is_ok());
        let err = terms(&[wide.clone(), wide.clone(), wide], eur()).unwrap_err();
        assert!(err.contains("1331 combinations"), "{err}");
        let none = terms(&[], eur()).unwrap();
        assert_eq!((none.capacity, none.ceiling), (Some(0), None));
    }

    #[test]
    fn bad_breaks_are_refused() {
        let t = |min_qty, p| Tier {
            min_qty,
            unit_price: UnitPrice::parse(p).unwrap(),
        };
        assert!(check_tiers(&[], None).is_err());
        assert!(check_tiers(&[t(10, "5"), t(10, "4")], None).is_err());
        assert!(check_tiers(&[t(10, "5"), t(20, "6")], None).is_err());
        assert!(check_tiers(&[t(0, "5")], None).is_err());
        assert!(check_tiers(&[t(10, "5")], Some(9)).is_err());
        assert!(check_tiers(&[t(10, "5"), t(MAX_QTY + 1, "4")], None).is_err());
        assert!(check_tiers(&[t(10, "5"), t(20, "4")], Some(10)).is_ok());
    }

    #[test]
    fn variant_lines_sum_by_row_and_column() {
        let a = quote(&[(100, "10")], Some(300));
        let b = quote(&[(200, "12")], Some(1000));
        let award = award(&[a, b], 450).unwrap();
        let demand = vec![("S".to_string(), 100), ("M".into(), 250), ("L".into(), 100)];
        let lines = purchase_order_lines(&award, &demand);
        assert_eq!(lines[0].iter().map(|l| l.1).sum::<i64>(), 250);
        assert_eq!(lines[1].iter().map(|l| l.1).sum::<i64>(), 200);
        let m: i64 = lines
            .iter()
            .flatten()
            .filter(|l| l.0 == "M")
            .map(|l| l.1)
            .sum();
        assert_eq!(m, 250);
    }

    /// Every way to order at least `qty` units, by brute force over quantities.
    fn brute_force(quotes: &[Quote], qty: i64) -> Option<Decimal> {
        fn go(quotes: &[Quote], qty: i64) -> Option<Decimal> {
            let Some((q, rest)) = quotes.split_first() else {
                return (qty <= 0).then_some(Decimal::ZERO);
            };
            let mut best = go(rest, qty);
            let top = q.capacity.unwrap();
            for x in q.min_order()..=top {
                if let (Some(p), Some(r)) = (q.price_at(x), go(rest, qty - x)) {
                    let c = p.value() * Decimal::from(x) + r;
                    best = Some(best.map_or(c, |b: Decimal| b.min(c)));
                }
            }
            best
        }
        go(quotes, qty)
    }

    fn arb_quote() -> impl Strategy<Value = Quote> {
        (1usize..4, 1i64..8, 2i64..40, 1i64..30).prop_flat_map(
            |(n, first, cap_extra, top_price)| {
                proptest::collection::vec((1i64..6, 1i64..4), n).prop_map(move |steps| {
                    let mut tiers = Vec::new();
                    let (mut min_qty, mut price) = (first, top_price * 4 + 20);
                    for (dq, dp) in steps {
                        tiers.push(Tier {
                            min_qty,
                            unit_price: UnitPrice::from_scaled(price * 10_000),
                        });
                        min_qty += dq;
                        price -= dp;
                    }
                    Quote {
                        capacity: Some(tiers.last().unwrap().min_qty + cap_extra),
                        tiers,
                        lead_time_days: 10,
                    }
                })
            },
        )
    }

    proptest! {
        /// Admission never oversells, admits in order, and refuses only what did not fit.
        #[test]
        fn admission_fills_capacity_in_order_and_never_oversells(
            quantities in prop::collection::vec(1i64..20, 0..60),
            pooled in 0i64..50,
            room in proptest::option::of(0i64..200),
        ) {
            let capacity = room.map(|r| pooled + r);
            let (answers, total) = admit(quantities.iter().copied(), pooled, capacity);
            prop_assert_eq!(answers.len(), quantities.len());
            let mut taken = 0;
            for (qty, answer) in quantities.iter().zip(&answers) {
                let left = capacity.map_or(i64::MAX, |c| c - pooled - taken);
                match answer {
                    Ok(()) => { prop_assert!(*qty <= left); taken += qty; }
                    Err(JoinRefusal::SoldOut { left: said }) => {
                        prop_assert!(*qty > left);
                        prop_assert_eq!(*said, left);
                    }
                    Err(other) => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(taken, total);
            if let Some(c) = capacity { prop_assert!(pooled + total <= c); }
        }

        #[test]
        fn award_cost_is_the_brute_force_optimum(
            quotes in proptest::collection::vec(arb_quote(), 1..3),
            qty in 1i64..60,
        ) {
            let got = award(&quotes, qty).map(|a| a.cost);
            prop_assert_eq!(got, brute_force(&quotes, qty));
        }

        #[test]
        fn awards_respect_minimums_and_capacities(
            quotes in proptest::collection::vec(arb_quote(), 1..4),
            qty in 1i64..120,
        ) {
            if let Some(a) = award(&quotes, qty) {
                prop_assert!(a.ordered >= qty);
                for l in &a.lines {
                    let q = &quotes[l.quote];
                    prop_assert!(l.qty >= q.min_order());
                    prop_assert!(l.qty <= q.capacity.unwrap());
                    prop_assert!(q.price_at(l.qty).unwrap() <= l.unit_price);
                }
            }
        }

        #[test]
        fn with_one_quote_the_price_never_rises(q in arb_quote(), a in 1i64..80, b in 1i64..80) {
            let (lo, hi) = (a.min(b), a.max(b));
            let quotes = [q];
            if lo >= quotes[0].min_order()
                && let (Some(p_lo), Some(p_hi)) = (price_at(&quotes, lo, eur()), price_at(&quotes, hi, eur()))
            {
                prop_assert!(p_hi <= p_lo, "{} at {} > {} at {}", p_hi, hi, p_lo, lo);
            }
        }

        #[test]
        fn the_price_never_exceeds_the_ceiling(
            quotes in proptest::collection::vec(
                (arb_quote(), any::<bool>()).prop_map(|(mut q, unbounded)| {
                    if unbounded { q.capacity = None; }
                    q
                }),
                1..4,
            ),
            qty in prop_oneof![1i64..400, 400i64..1_000_000],
        ) {
            let ceiling = ceiling(&quotes, eur()).unwrap();
            if qty >= tipping_qty(&quotes).unwrap()
                && let Some(p) = price_at(&quotes, qty, eur())
            {
                prop_assert!(p <= ceiling, "{} at {} above ceiling {}", p, qty, ceiling);
            }
        }
    }
}
