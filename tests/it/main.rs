//! One integration test binary: the real service over HTTP, on SQLite and PostgreSQL.

mod helpers;

mod api;
mod cli;
mod crash;
mod email;
mod pages;
mod payments;
mod presales;
mod scheduler;
mod store;
mod subscriptions;
