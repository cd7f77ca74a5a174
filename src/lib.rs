//! `pooled` pools demand so suppliers can plan on it, and delivers on time.
//!
//! Layout (outer layers depend on inner ones, never the reverse):
//! - [`domain`]: the business rules as pure functions over plain data (no I/O, no clock reads);
//! - [`store`]: the one storage layer over SQLite or PostgreSQL;
//! - [`presales`]: joining, closing and settling presale campaigns;
//! - [`subscriptions`]: fruit and flower boxes: planning, renewal billing, dunning;
//! - [`payments`]: payment intents sent through a [`payments::gateway::PaymentGateway`];
//! - [`http`]: the JSON API, health and metrics, problem+json errors;
//! - [`app`]: wiring from [`config::Settings`] to a running service;
//! - [`clock`]: the time source every operation reads once;
//! - [`batch`]: group commit, many callers' writes in one transaction.

pub mod app;
pub mod batch;
pub mod bench;
pub mod clock;
pub mod config;
pub mod domain;
pub mod email;
pub mod http;
pub mod ids;
pub mod payments;
pub mod presales;
pub mod scheduler;
pub mod store;
pub mod subscriptions;
pub mod telemetry;
