//! The double-entry journal: accounts, and entries whose lines always sum to zero.
//!
//! Debits are positive, credits negative, so "balanced" is simply "sums to zero". An entry is
//! built through [`JournalEntry::new`] or [`JournalEntry::transfer`], which refuse unbalanced or
//! mixed-currency lines; the database refuses them again (see the payments migration).

use super::money::{Currency, Money, MoneyError};

/// The accounts of the ledger. Shopper-specific lines carry the shopper as a party, so "the
/// payments of one shopper" are the `gateway_clearing` lines tagged with that shopper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Account {
    /// Money the gateway collected for us and has not paid out: debited by every charge,
    /// credited by every refund. Reconciles with the gateway's record.
    GatewayClearing,
    /// Presale deposits taken and not yet applied, refunded or forfeited.
    DepositsHeld,
    /// Presale balances collected.
    Balances,
    /// Refunds decided and not yet paid out by the gateway.
    Refunds,
    /// Deposits kept from defaulted pledges.
    Forfeits,
    /// What the platform pays itself when paid units cost more than shoppers paid.
    PlatformShortfall,
    /// Subscription deliveries billed and paid.
    SubscriptionRevenue,
    /// What we owe manufacturers and growers for purchase orders issued.
    ManufacturerPayables,
    /// One-off charges made by ops.
    Adjustments,
}

impl Account {
    pub const ALL: [Account; 9] = [
        Account::GatewayClearing,
        Account::DepositsHeld,
        Account::Balances,
        Account::Refunds,
        Account::Forfeits,
        Account::PlatformShortfall,
        Account::SubscriptionRevenue,
        Account::ManufacturerPayables,
        Account::Adjustments,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Account::GatewayClearing => "gateway_clearing",
            Account::DepositsHeld => "deposits_held",
            Account::Balances => "balances",
            Account::Refunds => "refunds",
            Account::Forfeits => "forfeits",
            Account::PlatformShortfall => "platform_shortfall",
            Account::SubscriptionRevenue => "subscription_revenue",
            Account::ManufacturerPayables => "manufacturer_payables",
            Account::Adjustments => "adjustments",
        }
    }

    pub fn parse(name: &str) -> Option<Account> {
        Account::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

/// One line: an amount on an account, optionally on behalf of a shopper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub account: Account,
    pub shopper_id: Option<String>,
    /// Minor units; debit positive, credit negative, never zero.
    pub amount_minor: i64,
}

/// Why an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("a journal entry needs at least two non-zero lines")]
    TooFewLines,
    #[error("journal entry lines sum to {0} minor units, not zero")]
    Unbalanced(i128),
    #[error(transparent)]
    Money(#[from] MoneyError),
}

/// A balanced journal entry in one currency, with the cause it is booked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub currency: Currency,
    /// What caused it (`payment_intent`, `pledge`, `campaign`, …) and which one.
    pub cause_type: &'static str,
    pub cause_id: String,
    /// Which moment of the cause; `(cause_type, cause_id, event)` is booked once.
    pub event: &'static str,
    pub memo: String,
    pub lines: Vec<Line>,
}

impl JournalEntry {
    /// An entry from lines that must sum to zero; zero lines are dropped.
    pub fn new(
        currency: Currency,
        cause: (&'static str, &str, &'static str),
        memo: impl Into<String>,
        lines: Vec<Line>,
    ) -> Result<JournalEntry, LedgerError> {
        let lines: Vec<Line> = lines.into_iter().filter(|l| l.amount_minor != 0).collect();
        if lines.len() < 2 {
            return Err(LedgerError::TooFewLines);
        }
        let sum: i128 = lines.iter().map(|l| i128::from(l.amount_minor)).sum();
        if sum != 0 {
            return Err(LedgerError::Unbalanced(sum));
        }
        let (cause_type, cause_id, event) = cause;
        Ok(JournalEntry {
            currency,
            cause_type,
            cause_id: cause_id.to_owned(),
            event,
            memo: memo.into(),
            lines,
        })
    }

    /// The common two-line entry: `amount` debited to `debit`, credited to `credit`, both on
    /// behalf of `shopper` when given.
    pub fn transfer(
        cause: (&'static str, &str, &'static str),
        memo: impl Into<String>,
        debit: Account,
        credit: Account,
        amount: Money,
        shopper: Option<&str>,
    ) -> Result<JournalEntry, LedgerError> {
        let line = |account, amount_minor| Line {
            account,
            shopper_id: shopper.map(str::to_owned),
            amount_minor,
        };
        JournalEntry::new(
            amount.currency(),
            cause,
            memo,
            vec![
                line(debit, amount.minor()),
                line(credit, amount.negate().minor()),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CAUSE: (&str, &str, &str) = ("test", "t1", "posted");

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    fn line(account: Account, amount_minor: i64) -> Line {
        Line {
            account,
            shopper_id: None,
            amount_minor,
        }
    }

    #[test]
    fn unbalanced_and_one_sided_entries_are_refused() {
        let lines = vec![
            line(Account::GatewayClearing, 100),
            line(Account::DepositsHeld, -99),
        ];
        assert_eq!(
            JournalEntry::new(eur(), CAUSE, "x", lines),
            Err(LedgerError::Unbalanced(1))
        );
        let lines = vec![
            line(Account::GatewayClearing, 0),
            line(Account::Balances, 0),
        ];
        assert_eq!(
            JournalEntry::new(eur(), CAUSE, "x", lines),
            Err(LedgerError::TooFewLines)
        );
        let zero = Money::zero(eur());
        assert!(
            JournalEntry::transfer(CAUSE, "x", Account::Refunds, Account::Balances, zero, None)
                .is_err()
        );
    }

    #[test]
    fn account_names_round_trip() {
        for a in Account::ALL {
            assert_eq!(Account::parse(a.as_str()), Some(a));
        }
        assert_eq!(Account::parse("cash"), None);
    }

    proptest! {
        #[test]
        fn transfers_always_balance(minor in 1i64..=i64::MAX) {
            let amount = Money::from_minor(minor, eur());
            let entry = JournalEntry::transfer(
                CAUSE, "x", Account::GatewayClearing, Account::DepositsHeld, amount, Some("sh_1"),
            ).unwrap();
            let sum: i128 = entry.lines.iter().map(|l| i128::from(l.amount_minor)).sum();
            prop_assert_eq!(sum, 0);
        }

        #[test]
        fn split_entries_balance(total in 1i64..10_000_000, weights in proptest::collection::vec(1u64..100, 1..8)) {
            // One debit split over several credits by largest remainder still sums to zero.
            let amount = Money::from_minor(total, eur());
            let mut lines = vec![line(Account::GatewayClearing, total)];
            for part in amount.allocate(&weights).unwrap() {
                lines.push(line(Account::ManufacturerPayables, -part.minor()));
            }
            prop_assert!(JournalEntry::new(eur(), CAUSE, "x", lines).is_ok());
        }
    }
}
