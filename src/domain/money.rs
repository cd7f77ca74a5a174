//! Money: amounts in one ISO 4217 currency, held as integer minor units (what the database
//! stores), parsed from and formatted as the API's decimal strings, rounded half-even, and
//! split by largest remainder so parts always sum to the whole. Unit prices carry up to four
//! decimals. Mixed currencies never add.

use rust_decimal::{Decimal, RoundingStrategy};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown currency {0:?}: use an ISO 4217 code such as EUR")]
    UnknownCurrency(String),
    #[error("{0:?} is not a decimal amount such as 12.50")]
    NotADecimal(String),
    #[error("{currency} amounts have at most {digits} decimal places")]
    TooPrecise { currency: &'static str, digits: u32 },
    #[error("unit prices have at most 4 decimal places")]
    UnitPriceTooPrecise,
    #[error("must be greater than zero")]
    NotPositive,
    #[error("cannot combine {0} with {1}")]
    CurrencyMismatch(&'static str, &'static str),
    #[error("amount out of range")]
    Overflow,
    #[error("nothing to allocate over: every weight is zero")]
    NoWeights,
}

/// ISO 4217 codes we accept, with the digits of their minor unit.
const CURRENCIES: &[(&str, u32)] = &[
    ("EUR", 2),
    ("USD", 2),
    ("GBP", 2),
    ("CHF", 2),
    ("SEK", 2),
    ("NOK", 2),
    ("DKK", 2),
    ("PLN", 2),
    ("CZK", 2),
    ("HUF", 2),
    ("RON", 2),
    ("BGN", 2),
    ("CAD", 2),
    ("AUD", 2),
    ("NZD", 2),
    ("CNY", 2),
    ("HKD", 2),
    ("SGD", 2),
    ("TWD", 2),
    ("INR", 2),
    ("BRL", 2),
    ("MXN", 2),
    ("ZAR", 2),
    ("TRY", 2),
    ("ILS", 2),
    ("AED", 2),
    ("SAR", 2),
    ("THB", 2),
    ("MYR", 2),
    ("PHP", 2),
    ("IDR", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("ISK", 0),
    ("CLP", 0),
    ("VND", 0),
    ("UGX", 0),
    ("PYG", 0),
    ("XOF", 0),
    ("XAF", 0),
    ("KWD", 3),
    ("BHD", 3),
    ("OMR", 3),
    ("JOD", 3),
    ("TND", 3),
    ("LYD", 3),
    ("IQD", 3),
];

/// An ISO 4217 currency: its code and the digits of its minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    minor_units: u32,
}

impl Currency {
    /// Looks up an upper-case code; `eur` is refused rather than guessed.
    pub fn parse(code: &str) -> Result<Currency, MoneyError> {
        CURRENCIES
            .iter()
            .find(|(c, _)| *c == code)
            .map(|&(code, minor_units)| Currency { code, minor_units })
            .ok_or_else(|| MoneyError::UnknownCurrency(code.to_owned()))
    }

    pub fn code(self) -> &'static str {
        self.code
    }

    pub fn minor_units(self) -> u32 {
        self.minor_units
    }

    /// Minor units per major unit (100 for EUR).
    fn scale(self) -> i128 {
        10i128.pow(self.minor_units)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl serde::Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code)
    }
}

/// Parses a plain decimal (`-12.50`, `7`, `0.5`): digits, one optional leading `-`, one
/// optional point. Exponents, `+`, spaces, separators and special values are refused, so what
/// a client sends is exactly what it means.
fn parse_plain_decimal(raw: &str) -> Result<Decimal, MoneyError> {
    let not = || MoneyError::NotADecimal(raw.to_owned());
    let unsigned = raw.strip_prefix('-').unwrap_or(raw);
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty()
        || !digits(int)
        || !digits(frac)
        || (unsigned.contains('.') && frac.is_empty())
    {
        return Err(not());
    }
    // Decimal holds 28 digits; anything longer is out of any range we accept.
    if int.len() + frac.len() > 28 {
        return Err(MoneyError::Overflow);
    }
    raw.parse::<Decimal>().map_err(|_| not())
}

/// Splits `total` (≥ 0) over `weights` by largest remainder: each part is the floor of its
/// exact share, and what is left goes one unit each to the largest remainders (ties to the
/// lower index). Parts sum exactly to `total`. `None` when every weight is zero.
pub fn allocate_units(total: i64, weights: &[u64]) -> Option<Vec<i64>> {
    let sum: i128 = weights.iter().map(|&w| i128::from(w)).sum();
    if sum == 0 {
        return None;
    }
    let whole = i128::from(total.max(0));
    let mut parts: Vec<i128> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(i128, usize)> = Vec::with_capacity(weights.len());
    for (i, &w) in weights.iter().enumerate() {
        let exact = whole * i128::from(w);
        parts.push(exact / sum);
        remainders.push((exact % sum, i));
    }
    let mut left = whole - parts.iter().sum::<i128>();
    // Largest remainder first; equal remainders keep index order (stable sort).
    remainders.sort_by_key(|&(remainder, _)| std::cmp::Reverse(remainder));
    for &(_, i) in &remainders {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    // Each part is at most `total`, so it fits.
    Some(parts.into_iter().map(|p| p as i64).collect())
}

/// An amount in one currency, as an integer count of minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    minor: i64,
    currency: Currency,
}

impl Money {
    pub fn from_minor(minor: i64, currency: Currency) -> Money {
        Money { minor, currency }
    }

    pub fn zero(currency: Currency) -> Money {
        Money::from_minor(0, currency)
    }

    pub fn minor(self) -> i64 {
        self.minor
    }

    pub fn currency(self) -> Currency {
        self.currency
    }

    pub fn is_zero(self) -> bool {
        self.minor == 0
    }

    pub fn is_positive(self) -> bool {
        self.minor > 0
    }

    /// Parses the API's decimal string. More decimals than the currency has are refused, never
    /// silently rounded.
    pub fn parse(raw: &str, currency: Currency) -> Result<Money, MoneyError> {
        let d = parse_plain_decimal(raw)?;
        if d.normalize().scale() > currency.minor_units {
            return Err(MoneyError::TooPrecise {
                currency: currency.code,
                digits: currency.minor_units,
            });
        }
        Money::round(d, currency)
    }

    /// [`Money::parse`] of an amount that must be above zero: a price, a cost, a charge.
    pub fn parse_positive(raw: &str, currency: Currency) -> Result<Money, MoneyError> {
        let m = Money::parse(raw, currency)?;
        if m.is_positive() {
            Ok(m)
        } else {
            Err(MoneyError::NotPositive)
        }
    }

    /// Rounds an exact decimal half-even (banker's rounding, unbiased over many roundings) to
    /// the currency's minor unit.
    pub fn round(amount: Decimal, currency: Currency) -> Result<Money, MoneyError> {
        let rounded = amount
            .round_dp_with_strategy(currency.minor_units, RoundingStrategy::MidpointNearestEven);
        let minor = rounded
            .checked_mul(Decimal::from(currency.scale() as i64))
            .ok_or(MoneyError::Overflow)?;
        i64::try_from(minor)
            .map(|minor| Money { minor, currency })
            .map_err(|_| MoneyError::Overflow)
    }

    /// The amount as a decimal with exactly the currency's minor-unit scale.
    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.minor, self.currency.minor_units)
    }

    fn same_currency(self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch(
                self.currency.code,
                other.currency.code,
            ))
        }
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let minor = self
            .minor
            .checked_add(other.minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::from_minor(minor, self.currency))
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let minor = self
            .minor
            .checked_sub(other.minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::from_minor(minor, self.currency))
    }

    pub fn times(self, qty: i64) -> Result<Money, MoneyError> {
        let minor = self.minor.checked_mul(qty).ok_or(MoneyError::Overflow)?;
        Ok(Money::from_minor(minor, self.currency))
    }

    pub fn negate(self) -> Money {
        Money::from_minor(-self.minor, self.currency)
    }

    /// Splits the amount over `weights` by largest remainder ([`allocate_units`]); parts sum
    /// exactly to the whole, and a negative amount splits into negative parts.
    pub fn allocate(self, weights: &[u64]) -> Result<Vec<Money>, MoneyError> {
        let sign = if self.minor < 0 { -1 } else { 1 };
        let parts = allocate_units(
            self.minor.unsigned_abs().min(i64::MAX as u64) as i64,
            weights,
        )
        .ok_or(MoneyError::NoWeights)?;
        Ok(parts
            .into_iter()
            .map(|p| Money::from_minor(sign * p, self.currency))
            .collect())
    }

    /// A percentage of the amount (a 10% deposit), rounded half-even.
    pub fn percent(self, percent: Decimal) -> Result<Money, MoneyError> {
        let exact = self
            .to_decimal()
            .checked_mul(percent)
            .and_then(|d| d.checked_div(Decimal::ONE_HUNDRED))
            .ok_or(MoneyError::Overflow)?;
        Money::round(exact, self.currency)
    }
}

/// Amounts compare only within one currency.
impl PartialOrd for Money {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        (self.currency == other.currency).then(|| self.minor.cmp(&other.minor))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_decimal())
    }
}

impl serde::Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A unit price: positive, at most four decimals (price breaks such as `12.3450`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitPrice(Decimal);

impl UnitPrice {
    /// The database stores unit prices as integers of 1/10000.
    const SCALE: u32 = 4;

    pub fn parse(raw: &str) -> Result<UnitPrice, MoneyError> {
        UnitPrice::from_decimal(parse_plain_decimal(raw)?)
    }

    pub fn from_decimal(d: Decimal) -> Result<UnitPrice, MoneyError> {
        if d.normalize().scale() > Self::SCALE {
            return Err(MoneyError::UnitPriceTooPrecise);
        }
        if d <= Decimal::ZERO {
            return Err(MoneyError::NotPositive);
        }
        if d >= Decimal::from(1_000_000_000_000i64) {
            return Err(MoneyError::Overflow);
        }
        Ok(UnitPrice(d.normalize()))
    }

    pub fn value(self) -> Decimal {
        self.0
    }

    /// The price as an integer count of 1/10000 (fits: at most 12 integer digits).
    pub fn to_scaled(self) -> i64 {
        let mut d = self.0;
        d.rescale(Self::SCALE);
        i64::try_from(d.mantissa()).unwrap_or(i64::MAX)
    }

    /// A stored price back; trusts what [`UnitPrice::to_scaled`] wrote.
    pub fn from_scaled(scaled: i64) -> UnitPrice {
        UnitPrice(Decimal::new(scaled, Self::SCALE).normalize())
    }

    /// qty × price, rounded half-even to the currency's minor unit.
    pub fn times(self, qty: i64, currency: Currency) -> Result<Money, MoneyError> {
        let exact = self
            .0
            .checked_mul(Decimal::from(qty))
            .ok_or(MoneyError::Overflow)?;
        Money::round(exact, currency)
    }
}

impl fmt::Display for UnitPrice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = self.0.normalize();
        if d.scale() < 2 {
            d.rescale(2);
        }
        write!(f, "{d}")
    }
}

impl serde::Serialize for UnitPrice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(code: &str) -> Currency {
        Currency::parse(code).unwrap()
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn formats_with_the_currencys_minor_digits() {
        assert_eq!(Money::from_minor(60000, c("EUR")).to_string(), "600.00");
        assert_eq!(Money::from_minor(-150, c("EUR")).to_string(), "-1.50");
        assert_eq!(Money::from_minor(600, c("JPY")).to_string(), "600");
        assert_eq!(Money::from_minor(1500, c("KWD")).to_string(), "1.500");
        assert_eq!(
            serde_json::to_string(&Money::from_minor(5, c("EUR"))).unwrap(),
            "\"0.05\""
        );
    }

    #[test]
    fn rounds_half_to_even() {
        let eur = c("EUR");
        assert_eq!(Money::round(d("0.125"), eur).unwrap().minor(), 12);
        assert_eq!(Money::round(d("0.135"), eur).unwrap().minor(), 14);
        assert_eq!(Money::round(d("-0.125"), eur).unwrap().minor(), -12);
        assert_eq!(Money::round(d("2.5"), c("JPY")).unwrap().minor(), 2);
        assert_eq!(Money::round(d("3.5"), c("JPY")).unwrap().minor(), 4);
    }

    #[test]
    fn parsing_refuses_what_it_cannot_represent() {
        let eur = c("EUR");
        assert_eq!(Money::parse("600", eur).unwrap().minor(), 60000);
        assert_eq!(Money::parse("0.5", eur).unwrap().minor(), 50);
        assert_eq!(Money::parse("1.10", eur).unwrap().minor(), 110);
        assert!(matches!(
            Money::parse("1.005", eur),
            Err(MoneyError::TooPrecise { digits: 2, .. })
        ));
        assert!(matches!(
            Money::parse("1.5", c("JPY")),
            Err(MoneyError::TooPrecise { .. })
        ));
        for bad in [
            "", "1,5", "+-1", "+1", "1e3", " 1", "NaN", "1.", ".5", "--1", "1.2.3",
        ] {
            assert!(
                matches!(Money::parse(bad, eur), Err(MoneyError::NotADecimal(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            Money::parse("99999999999999999999", eur),
            Err(MoneyError::Overflow)
        );
        assert!(matches!(
            Currency::parse("eur"),
            Err(MoneyError::UnknownCurrency(_))
        ));
    }

    #[test]
    fn currencies_never_mix() {
        let a = Money::from_minor(100, c("EUR"));
        let b = Money::from_minor(100, c("USD"));
        assert_eq!(
            a.checked_add(b),
            Err(MoneyError::CurrencyMismatch("EUR", "USD"))
        );
        assert!(a.checked_sub(b).is_err());
        assert_eq!(a.checked_add(a).unwrap().minor(), 200);
    }

    #[test]
    fn allocation_gives_leftovers_to_the_largest_remainders() {
        let eur = c("EUR");
        let parts = Money::from_minor(100, eur).allocate(&[1, 1, 1]).unwrap();
        assert_eq!(
            parts.iter().map(|m| m.minor()).collect::<Vec<_>>(),
            [34, 33, 33]
        );
        let parts = Money::from_minor(-100, eur).allocate(&[1, 2]).unwrap();
        assert_eq!(
            parts.iter().map(|m| m.minor()).collect::<Vec<_>>(),
            [-33, -67]
        );
        assert_eq!(
            Money::from_minor(1, eur).allocate(&[0, 0]),
            Err(MoneyError::NoWeights)
        );
    }

    #[test]
    fn an_amount_that_must_be_positive_is_above_zero_and_no_finer_than_its_currency() {
        let eur = c("EUR");
        assert_eq!(Money::parse_positive("12.50", eur).unwrap().minor(), 1250);
        for zero_or_less in ["0", "0.00", "-1"] {
            assert_eq!(
                Money::parse_positive(zero_or_less, eur),
                Err(MoneyError::NotPositive)
            );
        }
        assert!(matches!(
            Money::parse_positive("1.005", eur),
            Err(MoneyError::TooPrecise { .. })
        ));
    }

    #[test]
    fn unit_prices() {
        assert_eq!(UnitPrice::parse("180").unwrap().to_string(), "180.00");
        assert_eq!(UnitPrice::parse("12.3450").unwrap().to_string(), "12.345");
        assert_eq!(UnitPrice::parse("0.0005").unwrap().to_string(), "0.0005");
        assert_eq!(
            UnitPrice::parse("0.00001"),
            Err(MoneyError::UnitPriceTooPrecise)
        );
        assert_eq!(UnitPrice::parse("0"), Err(MoneyError::NotPositive));
        assert_eq!(UnitPrice::parse("-1"), Err(MoneyError::NotPositive));
        let p = UnitPrice::parse("12.345").unwrap();
        assert_eq!(p.to_scaled(), 123450);
        assert_eq!(UnitPrice::from_scaled(123450), p);
        assert_eq!(p.times(3, c("EUR")).unwrap().minor(), 3704); // 37.035 → 37.04
        assert_eq!(
            Money::from_minor(20000, c("EUR"))
                .percent(d("10"))
                .unwrap()
                .minor(),
            2000
        );
    }

    fn currency() -> impl Strategy<Value = Currency> {
        prop_oneof![Just(c("EUR")), Just(c("JPY")), Just(c("KWD"))]
    }

    proptest! {
        #[test]
        fn allocations_sum_to_the_whole(
            minor in -1_000_000_000_000i64..1_000_000_000_000,
            weights in proptest::collection::vec(0u64..1_000_000, 1..20),
        ) {
            prop_assume!(weights.iter().any(|&w| w > 0));
            let whole = Money::from_minor(minor, c("EUR"));
            let parts = whole.allocate(&weights).unwrap();
            prop_assert_eq!(parts.iter().map(|p| i128::from(p.minor())).sum::<i128>(), i128::from(minor));
            // Each part is within one minor unit of its exact share.
            let total: i128 = weights.iter().map(|&w| i128::from(w)).sum();
            for (part, &w) in parts.iter().zip(&weights) {
                let exact_times_total = i128::from(minor) * i128::from(w);
                let diff = (i128::from(part.minor()) * total - exact_times_total).abs();
                prop_assert!(diff < total, "part {} weight {}", part.minor(), w);
            }
        }

        #[test]
        fn parse_and_format_round_trip(minor in i64::MIN / 2..i64::MAX / 2, cur in currency()) {
            let m = Money::from_minor(minor, cur);
            prop_assert_eq!(Money::parse(&m.to_string(), cur).unwrap(), m);
        }

        #[test]
        fn rounding_shares_through_allocate_loses_nothing(
            minor in 0i64..100_000_000,
            n in 1usize..12,
        ) {
            // Rounding each exact share separately can create or lose a cent; allocate cannot.
            let whole = Money::from_minor(minor, c("EUR"));
            let parts = whole.allocate(&vec![1; n]).unwrap();
            prop_assert_eq!(parts.iter().map(|p| p.minor()).sum::<i64>(), minor);
            let max = parts.iter().map(|p| p.minor()).max().unwrap();
            let min = parts.iter().map(|p| p.minor()).min().unwrap();
            prop_assert!(max - min <= 1);
        }

        #[test]
        fn percent_is_within_half_a_minor_unit(minor in 0i64..1_000_000_000, pct in 1u32..=5000) {
            let percent = Decimal::new(i64::from(pct), 2); // 0.01 … 50.00
            let got = Money::from_minor(minor, c("EUR")).percent(percent).unwrap();
            let exact = Decimal::from(minor) * percent / Decimal::ONE_HUNDRED;
            prop_assert!((Decimal::from(got.minor()) - exact).abs() <= Decimal::new(5, 1));
        }

        #[test]
        fn one_unit_costs_its_rounded_price(scaled in 1i64..10_000_000_000, cur in currency()) {
            let price = UnitPrice::from_scaled(scaled);
            prop_assert_eq!(price.times(1, cur).unwrap(), Money::round(price.value(), cur).unwrap());
            prop_assert_eq!(UnitPrice::parse(&price.to_string()).unwrap(), price);
        }
    }
}
