//! The subscription emails, keyed so each is sent once per delivery, invoice attempt or order.

use super::StoredLine;
use crate::domain::identity::Shopper;
use crate::domain::money::{Currency, Money};
use crate::email::{Notice, count, local_time};
use crate::store::{DeliveryRow, GrowerOrderRow, InvoiceRow, NewAttachment, NewEmail, PlanRow};
use chrono::{DateTime, Duration, NaiveDate, Utc};

fn money(minor: i64, currency: &str) -> String {
    match Currency::parse(currency) {
        Ok(c) => format!("{} {currency}", Money::from_minor(minor, c)),
        Err(_) => format!("{minor} {currency}"),
    }
}

fn notice(
    template: &'static str,
    entity: &str,
    event: &str,
    to: &str,
    name: &str,
    subject: String,
) -> Notice {
    Notice {
        template,
        entity: entity.to_owned(),
        event: event.to_owned(),
        to: to.to_owned(),
        subject,
        greeting: format!("Hello {name},"),
        paragraphs: Vec::new(),
        facts: Vec::new(),
        attachments: Vec::new(),
    }
}

/// "Your box is planned": what to eat (or put in a vase) first.
pub fn box_planned(
    plan: &PlanRow,
    d: &DeliveryRow,
    date: NaiveDate,
    lines: &[StoredLine],
    to: &str,
    name: &str,
) -> NewEmail {
    let mut n = notice(
        "box_planned",
        &d.id,
        "planned",
        to,
        name,
        format!("Your {} box for {date} is planned", plan.name),
    );
    let ready = super::ready_word(plan);
    n.paragraphs.push(format!(
        "Here is what arrives on {date} and when each item is {ready}, so that something is \
         {ready} every day until the next delivery. Start with the first lines."
    ));
    n.facts = lines
        .iter()
        .map(|l| {
            (
                format!("{} × {}", l.qty, l.name),
                format!(
                    "{ready} {} to {}",
                    date + Duration::days(l.ready_from),
                    date + Duration::days(l.ready_until)
                ),
            )
        })
        .collect();
    n.render()
}

pub fn subscription_confirmed(
    plan: &PlanRow,
    sub_id: &str,
    first: NaiveDate,
    to: &str,
    name: &str,
) -> NewEmail {
    let mut n = notice(
        "subscription_confirmed",
        sub_id,
        "confirmed",
        to,
        name,
        format!("Welcome to {}", plan.name),
    );
    let every = match plan.cadence_weeks {
        1 => "week".to_owned(),
        n => format!("{n} weeks"),
    };
    let ready = super::ready_word(plan);
    n.paragraphs.push(format!(
        "Your first box arrives on {first}, then one every {every}. Each box is planned so \
         that something is {ready} every day until the next one, and billed {} before its \
         delivery day starts; until then you can skip or pause it.",
        count(plan.cutoff_hours, "hour")
    ));
    n.facts = vec![(
        "Price per delivery".into(),
        money(plan.price_minor, &plan.currency),
    )];
    n.render()
}

/// "Payment failed": the box is held, and when the card is tried again, in the shopper's own
/// zone (with UTC beside it).
pub fn payment_failed(
    plan: &PlanRow,
    inv: &InvoiceRow,
    retry_at: DateTime<Utc>,
    shopper: &Shopper,
) -> NewEmail {
    let mut n = notice(
        "payment_failed",
        &inv.id,
        &format!("attempt-{}", inv.attempts),
        &shopper.email,
        &shopper.name,
        format!(
            "Payment for your {} box of {} failed",
            plan.name, inv.delivery_date
        ),
    );
    n.paragraphs.push(format!(
        "We could not charge {} for the delivery of {}. The box is held until it is paid. \
         Please update your payment method; we will try again on {}.",
        money(inv.amount_minor, &inv.currency),
        inv.delivery_date,
        local_time(retry_at, shopper.time_zone)
    ));
    n.facts = vec![("Attempt".into(), inv.attempts.to_string())];
    n.render()
}

pub fn suspended(plan: &PlanRow, inv: &InvoiceRow, to: &str, name: &str) -> NewEmail {
    let mut n = notice(
        "subscription_suspended",
        &inv.id,
        "suspended",
        to,
        name,
        format!("Your {} subscription is suspended", plan.name),
    );
    n.paragraphs.push(format!(
        "After {} attempts we could not collect {} for the delivery of {}, so the \
         subscription is suspended and no further boxes will be sent or charged. To start \
         again, update your card and resume the subscription.",
        inv.attempts,
        money(inv.amount_minor, &inv.currency),
        inv.delivery_date
    ));
    n.render()
}

/// A held box will not come: the subscription was cancelled before its invoice was paid.
pub fn invoice_voided(plan: &PlanRow, inv: &InvoiceRow, to: &str, name: &str) -> NewEmail {
    let mut n = notice(
        "invoice_voided",
        &inv.id,
        "void",
        to,
        name,
        format!(
            "Your unpaid {} box of {} will not be sent",
            plan.name, inv.delivery_date
        ),
    );
    n.paragraphs.push(format!(
        "The subscription is cancelled and the payment of {} for the delivery of {} did not \
         go through, so the box will not be sent and nothing is owed for it. We will not try \
         to charge it again.",
        money(inv.amount_minor, &inv.currency),
        inv.delivery_date
    ));
    n.render()
}

/// A price change of `plan`, made at `changed_at` (µs): keyed by that instant, so a price that
/// comes back (A → B → A → B) is announced each time.
pub fn price_changed(
    plan: &PlanRow,
    old_minor: i64,
    changed_at: i64,
    sub_id: &str,
    to: &str,
    name: &str,
) -> NewEmail {
    let mut n = notice(
        "price_changed",
        sub_id,
        &format!("price-{}-{changed_at}", plan.id),
        to,
        name,
        format!("The price of {} changes", plan.name),
    );
    n.paragraphs.push(format!(
        "From your next delivery whose cutoff is still ahead, each {} box costs {} (was {}). \
         Deliveries already past their cutoff keep their price.",
        plan.name,
        money(plan.price_minor, &plan.currency),
        money(old_minor, &plan.currency)
    ));
    n.render()
}

/// A grower's purchase order: the lines due today, with a CSV. Keyed by its first line,
/// since each line is sent once: a second order on the same day (boxes added after the
/// first) is an email of its own, not a duplicate of the first.
pub fn grower_order(supplier: &str, lines: &[GrowerOrderRow], today: NaiveDate) -> NewEmail {
    let mut csv = String::from("order_line,sku,qty,deliver_by,order_by,week\n");
    for l in lines {
        csv.push_str(&format!(
            "{},{},{},{},{},{}\n",
            l.id, l.sku, l.qty, l.ripening_start, l.order_by, l.week
        ));
    }
    let to = lines
        .first()
        .map(|l| l.supplier_email.clone())
        .unwrap_or_default();
    let first = lines.first().map(|l| l.id.as_str()).unwrap_or_default();
    let mut n = notice(
        "grower_order",
        supplier,
        &format!("{today}/{first}"),
        &to,
        supplier,
        format!("Order from pooled for {today}"),
    );
    n.paragraphs.push(
        "Please deliver these to our warehouse by the dates shown; ripening starts on arrival."
            .into(),
    );
    n.facts = lines
        .iter()
        .map(|l| {
            (
                format!("{} × {}", l.qty, l.sku),
                format!("by {}", l.ripening_start),
            )
        })
        .collect();
    n.attachments.push(NewAttachment {
        filename: format!("order-{today}.csv"),
        content_type: "text/csv".into(),
        content: csv.into_bytes(),
    });
    n.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: &str, cadence_weeks: i64) -> PlanRow {
        PlanRow {
            id: "pln_1".into(),
            name: "Weekly".into(),
            kind: kind.into(),
            currency: "EUR".into(),
            price_minor: 2490,
            cadence_weeks,
            portions_per_day: 2,
            cutoff_hours: 48,
            delivery_weekdays: "thu".into(),
            time_zone: "Europe/Berlin".into(),
            variety_cap: 6,
            transit_days: 1,
            created_at: 0,
        }
    }

    #[test]
    fn the_welcome_says_how_often_and_what_every_day_brings() {
        let first = NaiveDate::from_ymd_opt(2026, 12, 10).unwrap();
        let text = |kind, weeks| {
            subscription_confirmed(&plan(kind, weeks), "sub_1", first, "a@example.com", "Ann").text
        };
        let weekly = text("fruit", 1);
        assert!(weekly.contains("arrives on 2026-12-10, then one every week. Each box is planned so that something is ready to eat every day"), "{weekly}");
        assert!(weekly.contains("Price per delivery: 24.90 EUR"), "{weekly}");
        let fortnightly = text("flower", 2);
        assert!(
            fortnightly.contains("then one every 2 weeks."),
            "{fortnightly}"
        );
        assert!(
            fortnightly.contains("something is in bloom every day"),
            "{fortnightly}"
        );
    }
}
