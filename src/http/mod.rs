//! The HTTP adapter: the JSON API under `/api/v1`, health and metrics, the OpenAPI document.
//!
//! Each submodule owns its routes and DTOs; this module only merges them and adds the layers
//! every request passes through (tracing, metrics, body limit, idempotency, problem+json
//! fallbacks).

pub mod error;
pub mod extract;
pub mod idempotency;
mod identity;
pub mod observe;
mod ops;
mod pages;
mod payments;
mod presales;
mod subscriptions;

use crate::app::AppState;
use crate::domain::money::{Currency, Money};
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::{Json, Router, middleware, routing::get};
use error::ApiError;
use std::sync::Arc;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

/// A stored minor-unit amount as the API's decimal string in its stored `currency` code.
/// Every stored code was parsed when it was written; one that no longer parses (a currency
/// taken out of the table) shows as an empty amount, which no client can misread, rather than
/// bare minor units (a hundred times the price) or a failed answer.
pub(crate) fn amount_string(minor: i64, currency: &str) -> String {
    Currency::parse(currency)
        .map(|c| Money::from_minor(minor, c).to_string())
        .unwrap_or_default()
}

/// Largest request body accepted (JSON bodies are small; 1 MiB is generous).
pub const BODY_LIMIT: usize = 1 << 20;

#[derive(OpenApi)]
#[openapi(info(
    title = "pooled",
    description = "Joint presales, ripening-aware subscriptions and a scheduler ops can trust."
))]
struct ApiDoc;

/// The whole service as one router.
pub fn router(state: AppState) -> Router {
    let (api, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(identity::router())
        .merge(ops::router())
        .merge(payments::router())
        .merge(presales::router())
        .merge(subscriptions::router())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .split_for_parts();
    openapi.info.version = env!("CARGO_PKG_VERSION").to_owned();
    openapi.info.license = None;
    let openapi = Arc::new(openapi);
    Router::new()
        .merge(api)
        .merge(observe::router())
        .merge(pages::router())
        .route(
            "/api/openapi.json",
            get(move || {
                let doc = Arc::clone(&openapi);
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(observe::track))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::amount_string;

    #[test]
    fn a_stored_amount_reads_in_its_currency_and_an_unknown_one_reads_empty() {
        assert_eq!(amount_string(60000, "EUR"), "600.00");
        assert_eq!(amount_string(-150, "EUR"), "-1.50");
        assert_eq!(amount_string(500, "JPY"), "500");
        assert_eq!(amount_string(60000, "XXX"), "", "never 100× the price");
    }
}
