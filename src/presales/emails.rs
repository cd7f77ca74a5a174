//! The presale emails: what each one says, keyed so it is sent once per pledge and moment.
//! Times are shown in the campaign's zone with UTC beside them (deadline bugs start when a
//! shopper and the server read one instant differently).

use super::{Loaded, zone_of};
use crate::domain::money::{Currency, Money, UnitPrice};
use crate::domain::presale::Progress;
use crate::email::{Notice, count};
use crate::store::{NewAttachment, NewEmail, PledgeContact, PledgeRow, PurchaseOrderRow, instant};
use chrono::{DateTime, Utc};

/// `t` in the campaign's zone: `2026-08-01 00:00 CEST (2026-07-31 22:00 UTC)`.
fn local_time(l: &Loaded, t: DateTime<Utc>) -> String {
    crate::email::local_time(t, zone_of(&l.campaign))
}

fn money(l: &Loaded, minor: i64) -> String {
    format!("{} {}", Money::from_minor(minor, l.currency), l.currency)
}

fn units(qty: i64, variant: &Option<String>) -> String {
    match variant {
        Some(v) => format!("{qty} × size {v}"),
        None => format!("{qty}"),
    }
}

fn to_shopper(
    template: &'static str,
    pledge_id: &str,
    event: &str,
    email: &str,
    name: &str,
    subject: String,
) -> Notice {
    Notice {
        template,
        entity: pledge_id.to_owned(),
        event: event.to_owned(),
        to: email.to_owned(),
        subject,
        greeting: format!("Hello {name},"),
        paragraphs: Vec::new(),
        facts: Vec::new(),
        attachments: Vec::new(),
    }
}

pub fn pledge_confirmed(l: &Loaded, p: &PledgeRow, email: &str, name: &str) -> NewEmail {
    let c = &l.campaign;
    let mut n = to_shopper(
        "pledge_confirmed",
        &p.id,
        "confirmed",
        email,
        name,
        format!("You joined {}", c.title),
    );
    n.paragraphs.push(format!(
        "Your pledge is in and your deposit of {} was charged. Everyone pays the same final \
         price, set when the campaign closes, and it will never be above {} per unit.",
        money(l, p.deposit_minor),
        money(l, p.price_ceiling_minor)
    ));
    n.facts = vec![
        ("Units".into(), units(p.qty, &p.variant)),
        ("Deposit".into(), money(l, p.deposit_minor)),
        ("Price ceiling".into(), money(l, p.price_ceiling_minor)),
        ("Closes".into(), local_time(l, instant(c.closes_at))),
    ];
    n.render()
}

/// The campaign failed (below every minimum) or was cancelled by ops: the deposit returns.
pub fn campaign_ended(l: &Loaded, p: &PledgeContact) -> NewEmail {
    let c = &l.campaign;
    let (template, why) = if c.status == "cancelled" {
        ("campaign_cancelled", "was cancelled")
    } else {
        ("campaign_failed", "did not reach the minimum order")
    };
    let mut n = to_shopper(
        template,
        &p.id,
        "refund",
        &p.email,
        &p.name,
        format!("{} {why}: your deposit is refunded", c.title),
    );
    n.paragraphs.push(format!(
        "The campaign {why}, so nothing will be made and nothing more will be charged. Your \
         deposit of {} is refunded in full to your payment method.",
        money(l, p.deposit_minor)
    ));
    n.facts = vec![("Refund".into(), money(l, p.deposit_minor))];
    n.render()
}

pub fn balance_due(
    l: &Loaded,
    p: &PledgeContact,
    price: Money,
    balance: Money,
    due: DateTime<Utc>,
) -> NewEmail {
    let c = &l.campaign;
    let mut n = to_shopper(
        "balance_due",
        &p.id,
        "due",
        &p.email,
        &p.name,
        format!(
            "{} is on: the final price is {price} {}",
            c.title, l.currency
        ),
    );
    n.paragraphs.push(format!(
        "The pool reached {} units, so the price is locked at {price} {} per unit for everyone. \
         We are charging the balance of {} {} (your units at the final price, minus your \
         deposit) to your payment method now.",
        c.pooled_qty, l.currency, balance, l.currency
    ));
    n.facts = vec![
        ("Units".into(), units(p.qty, &p.variant)),
        ("Final price".into(), format!("{price} {}", l.currency)),
        ("Deposit paid".into(), money(l, p.deposit_minor)),
        ("Balance".into(), format!("{balance} {}", l.currency)),
        ("Pay by".into(), local_time(l, due)),
    ];
    n.render()
}

pub fn balance_paid(l: &Loaded, p: &PledgeContact, price: Money) -> NewEmail {
    let c = &l.campaign;
    let mut n = to_shopper(
        "balance_paid",
        &p.id,
        "paid",
        &p.email,
        &p.name,
        format!("{}: you are all paid", c.title),
    );
    n.paragraphs.push(format!(
        "Thank you: your {} at {price} {} each {} paid in full. The order goes to the \
         manufacturer when the balance window ends.",
        count(p.qty, "unit"),
        l.currency,
        if p.qty == 1 { "is" } else { "are" }
    ));
    n.render()
}

pub fn balance_failed(l: &Loaded, p: &PledgeContact, attempt: i64, due: DateTime<Utc>) -> NewEmail {
    let c = &l.campaign;
    let balance = p.balance_minor.unwrap_or(0);
    let mut n = to_shopper(
        "balance_failed",
        &p.id,
        &format!("attempt-{attempt}"),
        &p.email,
        &p.name,
        format!("{}: your balance payment did not go through", c.title),
    );
    n.paragraphs.push(format!(
        "We could not charge the balance of {} to your payment method. Please update it: we \
         try again every day until {}, and after that the pledge lapses{}.",
        money(l, balance),
        local_time(l, due),
        if c.deposit_refundable {
            " and the deposit is refunded"
        } else {
            " and the deposit is kept"
        }
    ));
    n.facts = vec![
        ("Balance".into(), money(l, balance)),
        ("Attempt".into(), attempt.to_string()),
    ];
    n.render()
}

pub fn defaulted(l: &Loaded, p: &PledgeContact, refunded: bool) -> NewEmail {
    let c = &l.campaign;
    let mut n = to_shopper(
        "pledge_defaulted",
        &p.id,
        "defaulted",
        &p.email,
        &p.name,
        format!("{}: your pledge lapsed", c.title),
    );
    n.paragraphs.push(if refunded {
        format!(
            "The balance was not paid by the end of the window, so the pledge lapsed. Your \
             deposit of {} is refunded.",
            money(l, p.deposit_minor)
        )
    } else {
        format!(
            "The balance was not paid by the end of the window, so the pledge lapsed and, as \
             agreed when you joined, the deposit of {} is kept.",
            money(l, p.deposit_minor)
        )
    });
    n.render()
}

/// The pool reached a new price step: the price as it stands now, for everyone.
pub fn tier_unlocked(l: &Loaded, p: &PledgeContact, step: i64, price: Money) -> NewEmail {
    let c = &l.campaign;
    let mut n = to_shopper(
        "tier_unlocked",
        &p.id,
        &format!("step-{step}"),
        &p.email,
        &p.name,
        format!("{} unlocked {price} {} per unit", c.title, l.currency),
    );
    n.paragraphs.push(format!(
        "The pool reached {}, so the price as it stands is {price} {} per unit for everyone, \
         you included. The final price is set when the campaign closes.",
        count(step, "unit"),
        l.currency
    ));
    n.facts = vec![
        ("Pooled so far".into(), c.pooled_qty.to_string()),
        ("Current price".into(), format!("{price} {}", l.currency)),
        ("Your units".into(), p.qty.to_string()),
        ("Closes".into(), local_time(l, instant(c.closes_at))),
    ];
    n.render()
}

pub fn deadline_reminder(l: &Loaded, p: &PledgeContact, progress: &Progress) -> NewEmail {
    let c = &l.campaign;
    let mut n = to_shopper(
        "deadline_reminder",
        &p.id,
        "24h",
        &p.email,
        &p.name,
        format!("{} closes in less than a day", c.title),
    );
    n.paragraphs
        .push(match (progress.next, progress.units_to_next) {
            (Some(next), Some(missing)) => format!(
                "{} more unlock {} {} per unit for everyone. Tell a friend before the \
                 deadline.",
                count(missing, "unit"),
                next.unit_price,
                l.currency
            ),
            _ => "The pool has reached its best price.".into(),
        });
    n.facts = vec![
        ("Pooled so far".into(), c.pooled_qty.to_string()),
        (
            "Current price".into(),
            progress
                .current
                .map_or("not reached yet".into(), |m| format!("{m} {}", l.currency)),
        ),
        ("Closes".into(), local_time(l, instant(c.closes_at))),
    ];
    n.render()
}

/// The purchase order as CSV: one row per variant line. The line totals are the order's total
/// split over the lines by largest remainder, so they sum to it exactly, as an accounts-payable
/// import checks; rounding each line on its own could miss it by a cent per line.
pub fn purchase_order_csv(sku: &str, currency: Currency, po: &PurchaseOrderRow) -> String {
    let price = UnitPrice::from_scaled(po.unit_price_scaled);
    let lines: Vec<serde_json::Value> = serde_json::from_str(&po.lines).unwrap_or_default();
    let qtys: Vec<i64> = lines
        .iter()
        .map(|line| line["qty"].as_i64().unwrap_or(0))
        .collect();
    let weights: Vec<u64> = qtys.iter().map(|&q| q.max(0) as u64).collect();
    let totals = Money::from_minor(po.total_minor, currency)
        .allocate(&weights)
        .unwrap_or_default();
    let mut csv = String::from(
        "purchase_order,campaign,sku,variant,qty,unit_price,currency,line_total,ship_by\n",
    );
    for (i, (line, qty)) in lines.iter().zip(&qtys).enumerate() {
        let total = totals.get(i).map(Money::to_string).unwrap_or_default();
        csv.push_str(&format!(
            "{},{},{},{},{qty},{price},{},{total},{}\n",
            csv_field(&po.id),
            csv_field(&po.campaign_id),
            csv_field(sku),
            csv_field(line["variant"].as_str().unwrap_or("")),
            po.currency,
            po.ship_by
        ));
    }
    csv
}

/// A CSV field: a text that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab or
/// carriage return first) gets a leading `'` (OWASP's CSV injection advice), and a field with
/// a separator, quote or line break is quoted.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

pub fn purchase_order(l: &Loaded, po: &PurchaseOrderRow, email: &str, name: &str) -> NewEmail {
    let c = &l.campaign;
    let price = UnitPrice::from_scaled(po.unit_price_scaled);
    let n = Notice {
        template: "purchase_order",
        entity: po.id.clone(),
        event: "issued".into(),
        to: email.to_owned(),
        subject: format!("Purchase order {} for {} × {}", po.id, po.qty, c.sku),
        greeting: format!("Hello {name},"),
        paragraphs: vec![format!(
            "The {} campaign has settled. Please make {} at {price} {} each, shipped by {}. \
             The per-variant breakdown is attached as CSV.",
            c.title,
            count(po.qty, "unit"),
            po.currency,
            po.ship_by
        )],
        facts: vec![
            ("Quantity".into(), po.qty.to_string()),
            ("Unit price".into(), format!("{price} {}", po.currency)),
            ("Total".into(), money(l, po.total_minor)),
            ("Ship by".into(), po.ship_by.clone()),
        ],
        attachments: vec![NewAttachment {
            filename: format!("{}.csv", po.id),
            content_type: "text/csv".into(),
            content: purchase_order_csv(&c.sku, l.currency, po).into_bytes(),
        }],
    };
    n.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purchase_order_lines_sum_to_the_total_and_cells_are_inert() {
        // 3 × 1.005 = 3.015, booked as 3.02; each line alone would round to 1.00 (half-even).
        let po = PurchaseOrderRow {
            seq: 1,
            id: "po_1".into(),
            campaign_id: "cmp_1".into(),
            manufacturer_id: "mfr_1".into(),
            quote_id: "quo_1".into(),
            currency: "EUR".into(),
            qty: 3,
            unit_price_scaled: 10_050,
            total_minor: 302,
            lines: r#"[{"variant":"=HYPERLINK(\"x\")","qty":1},{"variant":"-L","qty":1},{"variant":"M, tall","qty":1}]"#
                .into(),
            issued_at: 0,
            ship_by: "2026-10-03".into(),
        };
        let csv = purchase_order_csv("@SKU", Currency::parse("EUR").unwrap(), &po);
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(
            rows[1..],
            [
                r#"po_1,cmp_1,'@SKU,"'=HYPERLINK(""x"")",1,1.005,EUR,1.01,2026-10-03"#,
                "po_1,cmp_1,'@SKU,'-L,1,1.005,EUR,1.01,2026-10-03",
                r#"po_1,cmp_1,'@SKU,"M, tall",1,1.005,EUR,1.00,2026-10-03"#,
            ]
        );
        assert_eq!(csv_field("a\rb"), "\"a\rb\"");
    }
}
