//! Parties of the service (shoppers, manufacturers, ops) and the checks on their details.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// Who a bearer token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Shopper(String),
    Manufacturer(String),
}

/// A shopper: pledges to presales, subscribes to boxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shopper {
    pub id: String,
    pub name: String,
    pub email: String,
    pub time_zone: Tz,
    /// The saved payment method at the gateway, if any.
    pub payment_token: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A manufacturer or grower: quotes, watches demand, receives purchase orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manufacturer {
    pub id: String,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
}

/// A display name: trimmed, 1–200 characters, no control characters.
pub fn parse_name(raw: &str) -> Result<String, &'static str> {
    let name = raw.trim();
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.chars().count() > 200 {
        return Err("must be at most 200 characters");
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(name.to_owned())
}

/// An email address, checked the way a mail relay would reject it (one `@`, a dotted domain,
/// no spaces), not by the full RFC 5322 grammar. The domain is lowercased.
pub fn parse_email(raw: &str) -> Result<String, &'static str> {
    let email = raw.trim();
    let Some((local, domain)) = email.split_once('@') else {
        return Err("must be an email address such as ana@example.com");
    };
    let valid_domain = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if local.is_empty()
        || local.len() > 64
        || email.len() > 254
        || local
            .chars()
            .any(|c| c.is_whitespace() || c == '@' || c.is_control())
        || !valid_domain
    {
        return Err("must be an email address such as ana@example.com");
    }
    Ok(format!("{local}@{}", domain.to_ascii_lowercase()))
}

/// An IANA time zone name.
pub fn parse_time_zone(raw: &str) -> Result<Tz, &'static str> {
    raw.parse()
        .map_err(|_| "must be an IANA time zone such as Europe/Berlin")
}

/// A payment method token as issued by the gateway (`pm_…`).
pub fn parse_payment_token(raw: &str) -> Result<String, &'static str> {
    let ok = raw.len() <= 100
        && raw.strip_prefix("pm_").is_some_and(|rest| {
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if ok {
        Ok(raw.to_owned())
    } else {
        Err("must be a payment method token such as pm_ok")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(parse_email(" Ana@Example.COM ").unwrap(), "Ana@example.com");
        for bad in [
            "",
            "ana",
            "ana@",
            "@example.com",
            "ana@example",
            "a b@example.com",
            "ana@exa mple.com",
        ] {
            assert!(parse_email(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_and_tokens() {
        assert_eq!(parse_name("  Ana  ").unwrap(), "Ana");
        assert!(parse_name("   ").is_err());
        assert!(parse_name(&"x".repeat(201)).is_err());
        assert!(parse_payment_token("pm_ok").is_ok());
        assert!(parse_payment_token("pm_").is_err());
        assert!(parse_payment_token("card_123").is_err());
        assert!(parse_time_zone("Europe/Berlin").is_ok());
        assert!(parse_time_zone("Europe/Nowhere").is_err());
    }
}
