//! Shoppers and manufacturers: sign-up, payment method, profile.

use super::error::ApiError;
use super::extract::{ApiJson, Caller, Validation};
use crate::app::AppState;
use crate::domain::identity::{
    Manufacturer, Shopper, parse_email, parse_name, parse_payment_token, parse_time_zone,
};
use crate::ids::{hash_token, new_id, new_token};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_shopper))
        .routes(routes!(get_shopper))
        .routes(routes!(set_payment_method))
        .routes(routes!(create_manufacturer))
        .routes(routes!(get_manufacturer))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShopperIn {
    name: String,
    email: String,
    /// IANA zone for the shopper's dates; UTC when absent.
    time_zone: Option<String>,
    /// A payment method token (sandbox: pm_ok, pm_decline, pm_insufficient_funds, pm_flaky).
    payment_token: Option<String>,
}

/// A party as returned at creation: the token is shown this once.
#[derive(Serialize, ToSchema)]
pub struct CreatedParty {
    id: String,
    name: String,
    email: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_zone: Option<String>,
    token: String,
}

#[derive(Serialize, ToSchema)]
pub struct ShopperOut {
    id: String,
    name: String,
    email: String,
    time_zone: String,
    has_payment_method: bool,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl From<Shopper> for ShopperOut {
    fn from(s: Shopper) -> Self {
        ShopperOut {
            id: s.id,
            name: s.name,
            email: s.email,
            time_zone: s.time_zone.name().to_owned(),
            has_payment_method: s.payment_token.is_some(),
            created_at: s.created_at,
        }
    }
}

/// Sign up as a shopper (public). Answers the bearer token once.
#[utoipa::path(post, path = "/api/v1/shoppers", tag = "identity", request_body = ShopperIn,
    responses((status = 201, body = CreatedParty), (status = 422, body = super::error::Problem)))]
async fn create_shopper(
    State(state): State<AppState>,
    ApiJson(input): ApiJson<ShopperIn>,
) -> Result<(StatusCode, Json<CreatedParty>), ApiError> {
    let mut v = Validation::default();
    let name = v.check("name", parse_name(&input.name));
    let email = v.check("email", parse_email(&input.email));
    let time_zone = match &input.time_zone {
        Some(tz) => v.check("time_zone", parse_time_zone(tz)),
        None => Some(chrono_tz::UTC),
    };
    let payment_token = match &input.payment_token {
        Some(t) => v.check("payment_token", parse_payment_token(t)).map(Some),
        None => Some(None),
    };
    v.finish()?;
    let (Some(name), Some(email), Some(time_zone), Some(payment_token)) =
        (name, email, time_zone, payment_token)
    else {
        unreachable!("validation passed");
    };
    let shopper = Shopper {
        id: new_id("shp"),
        name,
        email,
        time_zone,
        payment_token,
        created_at: state.clock.now(),
    };
    let token = new_token("pld_shp");
    state
        .store
        .create_shopper(&shopper, &hash_token(&token))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedParty {
            id: shopper.id,
            name: shopper.name,
            email: shopper.email,
            time_zone: Some(shopper.time_zone.name().to_owned()),
            token,
        }),
    ))
}

/// A shopper's profile (that shopper or ops).
#[utoipa::path(get, path = "/api/v1/shoppers/{id}", tag = "identity",
    responses((status = 200, body = ShopperOut), (status = 404, body = super::error::Problem)))]
async fn get_shopper(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ShopperOut>, ApiError> {
    caller.may_see_shopper(&id)?;
    Ok(Json(state.store.shopper(&id).await?.into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentMethodIn {
    payment_token: String,
}

/// Save the payment method later charges use (that shopper only).
#[utoipa::path(put, path = "/api/v1/shoppers/{id}/payment-method", tag = "identity",
    request_body = PaymentMethodIn,
    responses((status = 200, body = ShopperOut), (status = 404, body = super::error::Problem)))]
async fn set_payment_method(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<PaymentMethodIn>,
) -> Result<Json<ShopperOut>, ApiError> {
    // Only the shopper themself: another shopper gets a 404, any other role a 403.
    if caller.require_shopper()? != id {
        return Err(ApiError::not_found("no such shopper"));
    }
    let token = parse_payment_token(&input.payment_token)
        .map_err(|m| ApiError::field("payment_token", m))?;
    state.store.set_payment_token(&id, &token).await?;
    Ok(Json(state.store.shopper(&id).await?.into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManufacturerIn {
    name: String,
    email: String,
}

#[derive(Serialize, ToSchema)]
pub struct ManufacturerOut {
    id: String,
    name: String,
    email: String,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// Register a manufacturer or grower (ops only). Answers the bearer token once.
#[utoipa::path(post, path = "/api/v1/manufacturers", tag = "identity",
    request_body = ManufacturerIn,
    responses((status = 201, body = CreatedParty), (status = 403, body = super::error::Problem)))]
async fn create_manufacturer(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<ManufacturerIn>,
) -> Result<(StatusCode, Json<CreatedParty>), ApiError> {
    caller.require_admin()?;
    let mut v = Validation::default();
    let name = v.check("name", parse_name(&input.name));
    let email = v.check("email", parse_email(&input.email));
    v.finish()?;
    let (Some(name), Some(email)) = (name, email) else {
        unreachable!("validation passed");
    };
    let manufacturer = Manufacturer {
        id: new_id("mfr"),
        name,
        email,
        created_at: state.clock.now(),
    };
    let token = new_token("pld_mfr");
    state
        .store
        .create_manufacturer(&manufacturer, &hash_token(&token))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedParty {
            id: manufacturer.id,
            name: manufacturer.name,
            email: manufacturer.email,
            time_zone: None,
            token,
        }),
    ))
}

/// A manufacturer's profile (that manufacturer or ops).
#[utoipa::path(get, path = "/api/v1/manufacturers/{id}", tag = "identity",
    responses((status = 200, body = ManufacturerOut), (status = 404, body = super::error::Problem)))]
async fn get_manufacturer(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ManufacturerOut>, ApiError> {
    caller.may_see_manufacturer(&id)?;
    let m = state.store.manufacturer(&id).await?;
    Ok(Json(ManufacturerOut {
        id: m.id,
        name: m.name,
        email: m.email,
        created_at: m.created_at,
    }))
}
