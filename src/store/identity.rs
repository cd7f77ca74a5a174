//! Shoppers, manufacturers, their hashed bearer tokens, and the pages' sign-in sessions.

use super::{Store, StoreError, StoreResult, instant, micros};
use crate::domain::identity::{Manufacturer, Principal, Shopper};

/// What a stored token hash resolves to.
pub type TokenSubject = Principal;

#[derive(sqlx::FromRow)]
struct ShopperRow {
    id: String,
    name: String,
    email: String,
    time_zone: String,
    payment_token: Option<String>,
    created_at: i64,
}

impl From<ShopperRow> for Shopper {
    fn from(r: ShopperRow) -> Self {
        Shopper {
            id: r.id,
            name: r.name,
            email: r.email,
            // Written only after parse_time_zone; an unknown name can't be stored.
            time_zone: r.time_zone.parse().unwrap_or(chrono_tz::UTC),
            payment_token: r.payment_token,
            created_at: instant(r.created_at),
        }
    }
}

#[derive(sqlx::FromRow)]
struct ManufacturerRow {
    id: String,
    name: String,
    email: String,
    created_at: i64,
}

impl From<ManufacturerRow> for Manufacturer {
    fn from(r: ManufacturerRow) -> Self {
        Manufacturer {
            id: r.id,
            name: r.name,
            email: r.email,
            created_at: instant(r.created_at),
        }
    }
}

const INSERT_TOKEN: &str =
    "INSERT INTO api_tokens (token_hash, role, subject_id, created_at) VALUES ($1, $2, $3, $4)";

impl Store {
    /// Creates a shopper and their token in one transaction.
    pub async fn create_shopper(&self, s: &Shopper, token_hash: &str) -> StoreResult<()> {
        in_tx!(self, |tx| {
            sqlx::query(
                "INSERT INTO shoppers (id, name, email, time_zone, payment_token, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&s.id)
            .bind(&s.name)
            .bind(&s.email)
            .bind(s.time_zone.name())
            .bind(&s.payment_token)
            .bind(micros(s.created_at))
            .execute(&mut *tx)
            .await?;
            sqlx::query(INSERT_TOKEN)
                .bind(token_hash)
                .bind("shopper")
                .bind(&s.id)
                .bind(micros(s.created_at))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn shopper(&self, id: &str) -> StoreResult<Shopper> {
        let row: Option<ShopperRow> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, name, email, time_zone, payment_token, created_at
                 FROM shoppers WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?
        });
        row.map(Shopper::from).ok_or(StoreError::NotFound)
    }

    /// The shoppers of `ids` that exist, by id (one query for a batch).
    pub async fn shoppers(
        &self,
        ids: &[&str],
    ) -> StoreResult<std::collections::HashMap<String, Shopper>> {
        let rows = self
            .rows_by_id(
                "id, name, email, time_zone, payment_token, created_at",
                "shoppers",
                ids,
                |s: &ShopperRow| &s.id,
            )
            .await?;
        Ok(rows.into_iter().map(|(id, s)| (id, s.into())).collect())
    }

    /// Saves the shopper's payment method; later charges use it.
    pub async fn set_payment_token(&self, shopper_id: &str, token: &str) -> StoreResult<()> {
        let done = on_writer!(self, |pool| {
            sqlx::query("UPDATE shoppers SET payment_token = $1 WHERE id = $2")
                .bind(token)
                .bind(shopper_id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if done == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Creates a manufacturer and their token in one transaction.
    pub async fn create_manufacturer(&self, m: &Manufacturer, token_hash: &str) -> StoreResult<()> {
        in_tx!(self, |tx| {
            sqlx::query(
                "INSERT INTO manufacturers (id, name, email, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&m.id)
            .bind(&m.name)
            .bind(&m.email)
            .bind(micros(m.created_at))
            .execute(&mut *tx)
            .await?;
            sqlx::query(INSERT_TOKEN)
                .bind(token_hash)
                .bind("manufacturer")
                .bind(&m.id)
                .bind(micros(m.created_at))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn manufacturer(&self, id: &str) -> StoreResult<Manufacturer> {
        let row: Option<ManufacturerRow> = on_pool!(self, |pool| {
            sqlx::query_as("SELECT id, name, email, created_at FROM manufacturers WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        row.map(Manufacturer::from).ok_or(StoreError::NotFound)
    }

    /// The party a token hash belongs to, if any.
    pub async fn token_subject(&self, token_hash: &str) -> StoreResult<Option<TokenSubject>> {
        let row: Option<(String, String)> = on_pool!(self, |pool| {
            sqlx::query_as("SELECT role, subject_id FROM api_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.and_then(|(role, id)| match role.as_str() {
            "shopper" => Some(Principal::Shopper(id)),
            "manufacturer" => Some(Principal::Manufacturer(id)),
            _ => None,
        }))
    }

    /// Records a page session `id_hash` signed in with the token of `token_hash`, valid until
    /// `expires_at` (µs).
    pub async fn start_page_session(
        &self,
        id_hash: &str,
        token_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreResult<()> {
        on_writer!(self, |pool| {
            sqlx::query(
                "INSERT INTO page_sessions (id_hash, token_hash, created_at, expires_at)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(id_hash)
            .bind(token_hash)
            .bind(now)
            .bind(expires_at)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// The token hash page session `id_hash` signed in with, unless it ended or expired by
    /// `now`.
    pub async fn page_session_token(&self, id_hash: &str, now: i64) -> StoreResult<Option<String>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT token_hash FROM page_sessions WHERE id_hash = $1 AND expires_at > $2",
            )
            .bind(id_hash)
            .bind(now)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Ends page session `id_hash` (sign-out); `false` when there was none.
    pub async fn end_page_session(&self, id_hash: &str) -> StoreResult<bool> {
        let ended = on_writer!(self, |pool| {
            sqlx::query("DELETE FROM page_sessions WHERE id_hash = $1")
                .bind(id_hash)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(ended == 1)
    }
}
