//! The rules of the business as plain functions over plain data.
//!
//! Nothing in here is async, touches SQL or HTTP, or reads the clock: instants arrive as
//! arguments. This is where the property tests live.

pub mod identity;
pub mod ledger;
pub mod money;
pub mod presale;
pub mod ripening;
pub mod subscription;
