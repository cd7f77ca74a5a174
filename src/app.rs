//! Wiring: builds the running service from [`Settings`] — store, clock, admin token, HTTP
//! listener — and runs it until a shutdown signal, letting in-flight requests finish.

use crate::clock::{Clock, ManualClock, SystemClock};
use crate::config::{ClockMode, Settings};
use crate::email::mailer::Mailer;
use crate::http;
use crate::ids::{hash_token, new_token};
use crate::payments::Payments;
use crate::payments::sandbox::SandboxGateway;
use crate::presales;
use crate::scheduler::{JobEnv, Scheduler, jobs};
use crate::store::Store;
use anyhow::Context;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// What every request handler and job can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    /// SHA-256 of the admin bearer token.
    pub admin_token_hash: Arc<str>,
    pub settings: Arc<Settings>,
    pub scheduler: Arc<Scheduler>,
    pub payments: Payments,
    /// The group-commit queue every join goes through.
    pub joins: presales::Joins,
    /// Group-committed `Idempotency-Key` claims and responses.
    pub idempotency: http::idempotency::Keys,
    /// Bearer tokens resolved lately.
    pub known_tokens: Arc<http::extract::KnownTokens>,
}

/// A service that is bound and migrated, ready to run.
pub struct App {
    listener: TcpListener,
    state: AppState,
    /// The address actually bound (the port is chosen by the OS when configured as 0).
    pub addr: SocketAddr,
    /// The admin token, when it was generated for this run rather than configured.
    pub generated_admin_token: Option<String>,
}

impl App {
    /// Opens and migrates the database, then binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let store = Store::connect(&settings.database).await?;
        store.migrate().await?;
        // A fresh database gets the shipped catalog; existing items (and ops' edits) stay.
        store
            .seed_catalog(&crate::subscriptions::shipped_catalog(0))
            .await?;
        let clock: Arc<dyn Clock> = match settings.clock {
            ClockMode::System => Arc::new(SystemClock),
            ClockMode::Manual => Arc::new(ManualClock::new(
                settings.clock_start.unwrap_or_else(|| SystemClock.now()),
            )),
        };
        let (admin_token_hash, generated_admin_token) = match &settings.admin_token {
            Some(token) => (hash_token(token), None),
            None => {
                let token = new_token("pld_admin");
                (hash_token(&token), Some(token))
            }
        };
        let mut job_specs = jobs::defaults(settings.time_zone);
        if let Some(overrides) = &settings.job_overrides {
            jobs::apply_overrides(&mut job_specs, overrides).map_err(anyhow::Error::msg)?;
        }
        let mailer = Mailer::new(
            settings.smtp_url.as_deref(),
            &settings.data_dir.join("outbox"),
        )
        .map_err(anyhow::Error::msg)?;
        let gateway = Arc::new(SandboxGateway::new(store.clone(), Arc::clone(&clock)));
        let payments = Payments::new(store.clone(), gateway, settings.crash_at)
            .with_sweep_follow_ups(Arc::new(presales::LateDepositConfirmations(store.clone())));
        // Intents a previous process sent but never recorded are resolved before serving.
        match payments.sweep(clock.now(), true).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(intents = n, "resent payment intents left pending"),
            Err(e) => {
                tracing::warn!(error = %e, "start-up payment sweep failed; the payment-retry job will retry")
            }
        }
        let settings = Arc::new(settings);
        let env = JobEnv {
            store: store.clone(),
            clock: Arc::clone(&clock),
            mailer,
            payments: payments.clone(),
            settings: Arc::clone(&settings),
        };
        let scheduler = Scheduler::start(env, job_specs, settings.instance_id.clone()).await?;
        let listener = TcpListener::bind(&settings.bind)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind))?;
        let addr = listener.local_addr()?;
        http::observe::prometheus();
        let idempotency = http::idempotency::Keys::spawn(&store);
        let joins = presales::Joins::spawn(store.clone(), payments.clone());
        Ok(App {
            listener,
            state: AppState {
                store,
                clock,
                admin_token_hash: admin_token_hash.into(),
                settings,
                scheduler,
                payments,
                idempotency,
                joins,
                known_tokens: Default::default(),
            },
            addr,
            generated_admin_token,
        })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then waits for in-flight requests and closes the
    /// database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let store = self.state.store.clone();
        // The manual clock moves only through the ops API; the system clock needs a ticker.
        let mut ticker = match self.state.clock.as_manual() {
            Some(_) => None,
            None => Some(
                self.state
                    .scheduler
                    .spawn_ticker()
                    .await
                    .context("starting the scheduler")?,
            ),
        };
        let served = axum::serve(self.listener, http::router(self.state))
            .with_graceful_shutdown(shutdown)
            .await
            .context("the HTTP server failed");
        if let Some(ticker) = ticker.as_mut() {
            let _ = ticker.shutdown().await;
        }
        store.close().await;
        served
    }
}
