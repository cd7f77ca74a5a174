//! Configuration: the command line and environment of `pooled`, checked into [`Settings`].
//!
//! Every variable of API.md's configuration table is also a flag of `pooled serve`. Parsing
//! never panics: a bad value becomes a [`ConfigError`] whose message names the variable, so
//! `main` can print one clear line and exit non-zero.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// The `pooled` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pooled",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `pooled` alone means `pooled serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service and the scheduler (the default).
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(DatabaseArgs),
    /// Measure renewal, settlement and joins against the database's own floors.
    Bench(crate::bench::BenchArgs),
}

/// Where the data lives.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `sqlite://…` or `postgres://…`; defaults to `sqlite://<data dir>/pooled.db`.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Directory for the embedded SQLite file and outbox `.eml` files.
    #[arg(long, env = "POOLED_DATA_DIR", default_value = "pooled-data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Listen address.
    #[arg(long, env = "POOLED_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// Bearer token of the admin role; generated and printed at start when unset.
    #[arg(long, env = "POOLED_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// `system` (wall clock) or `manual` (moves only through the ops API). Checked in
    /// [`ServeArgs::into_settings`].
    #[arg(long, env = "POOLED_CLOCK", default_value = "system")]
    pub clock: String,
    /// Start instant of the manual clock (RFC 3339); defaults to now.
    #[arg(long, env = "POOLED_CLOCK_START")]
    pub clock_start: Option<String>,
    /// Shop time zone (IANA) for wall-clock schedules.
    #[arg(long, env = "POOLED_TIME_ZONE", default_value = "UTC")]
    pub time_zone: String,
    /// `smtp://host:port`; unset → `.eml` files under `<data dir>/outbox`.
    #[arg(long, env = "POOLED_SMTP_URL")]
    pub smtp_url: Option<String>,
    /// Name of this instance in the run ledger; defaults to hostname + pid.
    #[arg(long, env = "POOLED_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Where job-failure alerts go.
    #[arg(long, env = "POOLED_OPS_EMAIL")]
    pub ops_email: Option<String>,
    /// Per-job schedule and policy overrides: `job.key=value;…` (see README).
    #[arg(long, env = "POOLED_JOB_OVERRIDES")]
    pub job_overrides: Option<String>,
    /// Dunning retries after a renewal's first failure, in days (then suspension).
    #[arg(long, env = "POOLED_DUNNING_DAYS", default_value = "1,3,5")]
    pub dunning_days: String,
    /// Crash tests only: `before-gateway-call` aborts the process once charges are committed
    /// and before the payment gateway is called; `after-gateway-call` right after the gateway
    /// answers and before its answers are recorded.
    #[arg(long, env = "POOLED_DEBUG_CRASH", hide = true)]
    pub debug_crash: Option<String>,
}

/// Where a crash test aborts the process (`POOLED_DEBUG_CRASH`): the two moments a payment
/// is exposed to a crash, which the restarted process must finish without charging twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Charges committed as sent, the gateway not yet called.
    BeforeGatewayCall,
    /// The gateway answered, its answers not yet recorded.
    AfterGatewayCall,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockMode {
    System,
    Manual,
}

impl ClockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ClockMode::System => "system",
            ClockMode::Manual => "manual",
        }
    }
}

/// A database location whose scheme has been recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl DatabaseUrl {
    /// Parses `sqlite://path`, `sqlite:path` or `postgres(ql)://…`.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            // Query parameters (`?mode=rwc`) are ours to set, not the user's.
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() || path == ":memory:" {
                return Err(ConfigError::new(
                    "DATABASE_URL",
                    format!(
                        "'{url}' names no file (an in-memory database would lose every pledge at exit)"
                    ),
                ));
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url.to_owned()));
        }
        let scheme = url.split(':').next().unwrap_or(url);
        Err(ConfigError::new(
            "DATABASE_URL",
            format!("unsupported scheme '{scheme}' (expected sqlite:// or postgres://)"),
        ))
    }

    /// The URL with any password replaced, for logs and error messages.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
            DatabaseUrl::Postgres(url) => redact_password(url),
        }
    }
}

fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// A configuration value that cannot be used, with the variable it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

/// `value` as the choice it names, or an error naming `variable` and every choice: settings
/// with a few named values are checked here rather than by clap, whose error takes four lines.
fn one_of<T: Copy>(
    variable: &'static str,
    what: &str,
    value: &str,
    choices: &[(&str, T)],
) -> Result<T, ConfigError> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|&(_, choice)| choice)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            ConfigError::new(
                variable,
                format!("unknown {what} '{value}' (expected {})", names.join(" or ")),
            )
        })
}

impl ConfigError {
    fn new(variable: &'static str, message: impl Into<String>) -> Self {
        Self {
            variable,
            message: message.into(),
        }
    }
}

/// The checked configuration the service runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseUrl,
    pub data_dir: PathBuf,
    pub bind: String,
    pub admin_token: Option<String>,
    pub clock: ClockMode,
    pub clock_start: Option<DateTime<Utc>>,
    pub time_zone: Tz,
    pub smtp_url: Option<String>,
    pub instance_id: String,
    pub ops_email: Option<String>,
    pub job_overrides: Option<String>,
    /// Where to abort the process around a gateway call (crash tests only).
    pub crash_at: Option<CrashPoint>,
    /// Dunning retries after a renewal's first failure, in days, increasing.
    pub dunning_days: Vec<i64>,
}

impl DatabaseArgs {
    pub fn database_url(&self) -> Result<DatabaseUrl, ConfigError> {
        match &self.database_url {
            Some(url) => DatabaseUrl::parse(url),
            None => Ok(DatabaseUrl::Sqlite(self.data_dir.join("pooled.db"))),
        }
    }
}

impl ServeArgs {
    /// Checks every value; the first bad one is reported.
    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        let database = self.database.database_url()?;
        let time_zone: Tz = self.time_zone.parse().map_err(|_| {
            ConfigError::new(
                "POOLED_TIME_ZONE",
                format!(
                    "unknown time zone '{}' (expected an IANA name such as Europe/Berlin)",
                    self.time_zone
                ),
            )
        })?;
        let clock_start = self
            .clock_start
            .as_deref()
            .map(|s| {
                DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        ConfigError::new(
                            "POOLED_CLOCK_START",
                            format!("'{s}' is not an RFC 3339 instant such as 2026-06-01T00:00:00Z ({e})"),
                        )
                    })
            })
            .transpose()?;
        let clock = one_of(
            "POOLED_CLOCK",
            "clock",
            &self.clock,
            &[("system", ClockMode::System), ("manual", ClockMode::Manual)],
        )?;
        if clock_start.is_some() && clock == ClockMode::System {
            return Err(ConfigError::new(
                "POOLED_CLOCK_START",
                "only applies with POOLED_CLOCK=manual",
            ));
        }
        // Trimmed as a bearer header is: a token read from a file with its newline still
        // signs in.
        let admin_token = self.admin_token.map(|t| t.trim().to_owned());
        if let Some(token) = &admin_token
            && token.len() < 16
        {
            return Err(ConfigError::new(
                "POOLED_ADMIN_TOKEN",
                "must be at least 16 characters",
            ));
        }
        if let Some(email) = &self.ops_email {
            crate::domain::identity::parse_email(email)
                .map_err(|m| ConfigError::new("POOLED_OPS_EMAIL", m))?;
        }
        let crash_at = self
            .debug_crash
            .as_deref()
            .map(|point| {
                one_of(
                    "POOLED_DEBUG_CRASH",
                    "crash point",
                    point,
                    &[
                        ("before-gateway-call", CrashPoint::BeforeGatewayCall),
                        ("after-gateway-call", CrashPoint::AfterGatewayCall),
                    ],
                )
            })
            .transpose()?;
        let dunning_days: Vec<i64> = self
            .dunning_days
            .split(',')
            .map(|d| d.trim().parse::<i64>())
            .collect::<Result<_, _>>()
            .ok()
            .filter(|days: &Vec<i64>| {
                !days.is_empty() && days[0] > 0 && days.windows(2).all(|w| w[0] < w[1])
            })
            .ok_or_else(|| {
                ConfigError::new(
                    "POOLED_DUNNING_DAYS",
                    format!(
                        "'{}' is not an increasing list of days such as 1,3,5",
                        self.dunning_days
                    ),
                )
            })?;
        let instance_id = self.instance_id.unwrap_or_else(default_instance_id);
        Ok(Settings {
            database,
            data_dir: self.database.data_dir,
            bind: self.bind,
            admin_token,
            clock,
            clock_start,
            time_zone,
            smtp_url: self.smtp_url,
            instance_id,
            ops_email: self.ops_email,
            job_overrides: self.job_overrides,
            crash_at,
            dunning_days,
        })
    }
}

fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["pooled", "serve"];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Some(Command::Serve(args)) => *args,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn database_urls_are_recognised_by_scheme() {
        assert_eq!(
            DatabaseUrl::parse("sqlite://pooled-data/pooled.db").unwrap(),
            DatabaseUrl::Sqlite("pooled-data/pooled.db".into())
        );
        assert!(matches!(
            DatabaseUrl::parse("postgresql://u@h/db").unwrap(),
            DatabaseUrl::Postgres(_)
        ));
        let err = DatabaseUrl::parse("mysql://root@localhost/x").unwrap_err();
        assert_eq!(err.variable, "DATABASE_URL");
        assert!(err.message.contains("'mysql'"), "{err}");
        assert!(DatabaseUrl::parse("sqlite::memory:").is_err());
    }

    #[test]
    fn passwords_never_reach_messages() {
        let url = DatabaseUrl::parse("postgres://app:s3cret@db:5432/pooled").unwrap();
        assert_eq!(url.redacted(), "postgres://app:***@db:5432/pooled");
    }

    #[test]
    fn bad_values_name_their_variable() {
        let err = args(&["--time-zone", "Mars/Base"])
            .into_settings()
            .unwrap_err();
        assert_eq!(err.variable, "POOLED_TIME_ZONE");
        let err = args(&["--clock", "manual", "--clock-start", "yesterday"])
            .into_settings()
            .unwrap_err();
        assert_eq!(err.variable, "POOLED_CLOCK_START");
        let err = args(&["--clock", "sundial"]).into_settings().unwrap_err();
        assert_eq!(err.variable, "POOLED_CLOCK");
        assert!(err.message.contains("'sundial'"), "{err}");
        let manual = args(&["--clock", "manual"]).into_settings().unwrap();
        assert_eq!(manual.clock, ClockMode::Manual);
    }

    #[test]
    fn an_admin_token_is_trimmed_as_a_bearer_header_is() {
        let token = "pld_admin_0123456789abcdef";
        let s = args(&["--admin-token", &format!("{token}\n")])
            .into_settings()
            .unwrap();
        assert_eq!(s.admin_token.as_deref(), Some(token));
        let err = args(&["--admin-token", "  short         \n"])
            .into_settings()
            .unwrap_err();
        assert_eq!(err.variable, "POOLED_ADMIN_TOKEN");
    }

    #[test]
    fn defaults_put_sqlite_in_the_data_dir() {
        let s = args(&["--data-dir", "/tmp/x"]).into_settings().unwrap();
        assert_eq!(s.database, DatabaseUrl::Sqlite("/tmp/x/pooled.db".into()));
        assert_eq!(s.time_zone, chrono_tz::UTC);
        assert_eq!(s.clock, ClockMode::System);
    }
}
