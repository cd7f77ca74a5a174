//! The bulk-load floor of a measured piece of work: the very rows it wrote (inserted, or
//! updated to new values), loaded again into empty copies of their tables by the backend's
//! bulk path — PostgreSQL `COPY`, SQLite one prepared `INSERT … SELECT` per table, run inside
//! SQLite — in one transaction.
//!
//! Why `INSERT … SELECT` on SQLite: until the eleventh session the floor bound each row to a
//! prepared insert from Rust. Through sqlx every statement is a round trip to the
//! connection's worker thread, about 88 µs a row on this machine against a few µs of SQLite's
//! own work, so that floor measured the driver's thread hand-offs, and the service's
//! set-based writes beat it (BENCHMARKS.md, "Eleventh session"). SQLite runs the same
//! prepared insert program for each row here, with no hand-off between rows.
//!
//! Why these rows: the issue asks for "the database's bulk-load rate for the same rows".
//! The same columns, keys and indexes are what the work could at best cost on this
//! database. Triggers and foreign keys are left out, as a bulk load leaves them out, so the
//! floor stays the stricter side. Until the sixth session the floor was the same *number*
//! of narrow rows in an unindexed scratch table, which measured the disk and the protocol
//! rather than these rows (BENCHMARKS.md compares the two).
//!
//! The rows are found by difference: every table is copied before the work and compared
//! after it (`EXCEPT`), on one connection of its own that the service never uses.

use crate::store::{Db, Store};
use anyhow::Context;
use futures_util::TryStreamExt;
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqliteConnection};
use std::time::{Duration, Instant};

/// PostgreSQL rows copied out (untimed) and then in (timed) at a time.
const CHUNK: i64 = 20_000;

/// The tables as they were before the work, held on a dedicated connection.
pub struct Capture {
    conn: Conn,
    tables: Vec<Table>,
}

enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

struct Table {
    name: String,
    columns: Vec<String>,
}

/// The floor of one run: the rows the work wrote, by table, and how long loading them took.
pub struct Floor {
    pub rows_by_table: serde_json::Map<String, serde_json::Value>,
    pub seconds: f64,
}

impl Floor {
    pub fn rows(&self) -> i64 {
        self.rows_by_table.values().filter_map(|v| v.as_i64()).sum()
    }
}

/// Runs one statement built from table names read from the schema itself.
async fn exec<'c, E>(conn: E, sql: String) -> anyhow::Result<()>
where
    E: sqlx::Executor<'c>,
    for<'q> <E::Database as sqlx::Database>::Arguments: sqlx::IntoArguments<E::Database>,
{
    conn.execute(AssertSqlSafe(sql)).await?;
    Ok(())
}

/// The tables the `list` query names, each with the columns the `columns` query gives for its
/// name, read on `conn`. A macro, not a function: the backends' connection types differ and the
/// text is the same.
macro_rules! describe {
    ($conn:expr, $list:expr, $columns:expr) => {{
        let conn = $conn;
        let mut tables = Vec::new();
        for name in sqlx::query_scalar::<_, String>($list)
            .fetch_all(&mut *conn)
            .await?
        {
            let columns = sqlx::query_scalar::<_, String>($columns)
                .bind(&name)
                .fetch_all(&mut *conn)
                .await?;
            tables.push(Table { name, columns });
        }
        tables
    }};
}

impl Capture {
    /// Copies every table of the service's schema, before the work.
    pub async fn before(store: &Store) -> anyhow::Result<Capture> {
        // On SQLite a connection of its own, beside the store's writer, taken out of its pool.
        let mut capture = match store.unqueued_writers().await? {
            Db::Sqlite(pool) => {
                let mut conn = pool.acquire().await?.detach();
                // Bulk loads skip foreign keys; the floor's copies have no parents to point at.
                exec(&mut conn, "PRAGMA foreign_keys = OFF".into()).await?;
                let tables = describe!(
                    &mut conn,
                    "SELECT name FROM sqlite_master WHERE type = 'table'
                     AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
                     AND name NOT LIKE '\\_sqlx%' ESCAPE '\\'
                     AND name NOT LIKE 'bench\\_%' ESCAPE '\\' ORDER BY name",
                    "SELECT name FROM pragma_table_info($1) ORDER BY cid"
                );
                Capture {
                    conn: Conn::Sqlite(conn),
                    tables,
                }
            }
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?.detach();
                let tables = describe!(
                    &mut conn,
                    "SELECT tablename::TEXT FROM pg_tables WHERE schemaname = 'public'
                     AND tablename NOT LIKE '\\_sqlx%' AND tablename NOT LIKE 'bench\\_%'
                     ORDER BY tablename",
                    "SELECT column_name::TEXT FROM information_schema.columns
                     WHERE table_schema = 'public' AND table_name = $1
                     ORDER BY ordinal_position"
                );
                Capture {
                    conn: Conn::Postgres(conn),
                    tables,
                }
            }
        };
        for t in &capture.tables {
            let name = &t.name;
            let sql = format!("CREATE TEMP TABLE bench_before_{name} AS SELECT * FROM {name}");
            match &mut capture.conn {
                Conn::Sqlite(c) => exec(c, sql).await?,
                Conn::Postgres(c) => exec(c, sql).await?,
            }
        }
        Ok(capture)
    }

    /// After the work: finds what it wrote, loads it into empty copies of its tables in one
    /// transaction, and times the load (reading the rows back is not timed).
    pub async fn load_written(self) -> anyhow::Result<Floor> {
        match self.conn {
            Conn::Sqlite(conn) => sqlite_load(conn, &self.tables).await,
            Conn::Postgres(conn) => postgres_load(conn, &self.tables).await,
        }
    }
}

/// `bench_written_<t>`: the rows of `t` that were not in it before, numbered from 1 in the
/// order of the table's first column (its key: ids count up, so this is the order the work
/// wrote them in; a random order would dirty more index pages and lower the floor), and
/// stored in that order (so on SQLite a scan in `rowid` order reads them so, without a sort).
fn written_sql(t: &Table) -> [String; 2] {
    let (name, first) = (&t.name, &t.columns[0]);
    [
        format!(
            "CREATE TEMP TABLE bench_written_{name} AS
             SELECT row_number() OVER (ORDER BY w.{first}) AS bench_n, w.* FROM
             (SELECT * FROM {name} EXCEPT SELECT * FROM bench_before_{name}) AS w
             ORDER BY bench_n"
        ),
        format!("DROP TABLE bench_before_{name}"),
    ]
}

/// What a backend does for [`timed_load`]: run a statement, and load a table's written rows
/// into its empty copy, timing only the loading.
trait BulkLoad {
    async fn exec(&mut self, sql: String) -> anyhow::Result<()>;
    /// Loads `bench_written_<t>` into `bench_floor.<t>`: how many rows, and how long the
    /// loading itself took.
    async fn load(&mut self, t: &Table) -> anyhow::Result<(i64, Duration)>;
}

/// Loads every table's written rows into its copy in one transaction, and times only
/// `BEGIN`, the loads and `COMMIT`.
async fn timed_load<B: BulkLoad>(b: &mut B, tables: &[Table]) -> anyhow::Result<Floor> {
    let mut rows_by_table = serde_json::Map::new();
    let started = Instant::now();
    b.exec("BEGIN".into()).await?;
    let mut loading = started.elapsed();
    for t in tables {
        let (rows, took) = b.load(t).await?;
        loading += took;
        if rows > 0 {
            rows_by_table.insert(t.name.clone(), rows.into());
        }
    }
    let started = Instant::now();
    b.exec("COMMIT".into()).await?;
    loading += started.elapsed();
    Ok(Floor {
        rows_by_table,
        seconds: loading.as_secs_f64(),
    })
}

async fn sqlite_load(mut conn: SqliteConnection, tables: &[Table]) -> anyhow::Result<Floor> {
    // A fresh file beside the database, set up as the service sets up its own.
    let main: String =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(&mut conn)
            .await?;
    let floor_file = format!("{main}.floor");
    exec(
        &mut conn,
        format!(
            "ATTACH DATABASE '{}' AS bench_floor",
            floor_file.replace('\'', "''")
        ),
    )
    .await?;
    for pragma in [
        "PRAGMA bench_floor.journal_mode = WAL",
        "PRAGMA bench_floor.synchronous = FULL",
        "PRAGMA bench_floor.cache_size = -65536",
    ] {
        exec(&mut conn, pragma.into()).await?;
    }
    for t in tables {
        for sql in written_sql(t) {
            exec(&mut conn, sql).await?;
        }
        let schema = sqlx::query_scalar::<_, String>(
            "SELECT sql FROM sqlite_master WHERE tbl_name = $1 AND type IN ('table', 'index')
             AND sql IS NOT NULL ORDER BY type = 'index'",
        )
        .bind(&t.name)
        .fetch_all(&mut conn)
        .await?;
        for sql in schema {
            exec(&mut conn, in_floor_schema(&sql)).await?;
        }
    }
    let floor = timed_load(&mut conn, tables).await?;
    conn.close().await?;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{floor_file}{suffix}"));
    }
    Ok(floor)
}

/// SQLite: one prepared `INSERT … SELECT` per table, from the written rows held on the same
/// connection, in the order they were written.
impl BulkLoad for SqliteConnection {
    async fn exec(&mut self, sql: String) -> anyhow::Result<()> {
        exec(self, sql).await
    }

    async fn load(&mut self, t: &Table) -> anyhow::Result<(i64, Duration)> {
        let columns = t.columns.join(", ");
        let insert = format!(
            "INSERT INTO bench_floor.{0} ({columns})
             SELECT {columns} FROM bench_written_{0} ORDER BY rowid",
            t.name
        );
        let started = Instant::now();
        let done = sqlx::query(AssertSqlSafe(insert))
            .execute(&mut *self)
            .await?;
        Ok((done.rows_affected() as i64, started.elapsed()))
    }
}

/// A table's or index's `CREATE` statement, moved into the attached `bench_floor` schema.
fn in_floor_schema(sql: &str) -> String {
    for create in ["CREATE TABLE ", "CREATE UNIQUE INDEX ", "CREATE INDEX "] {
        if let Some(rest) = sql.strip_prefix(create) {
            return format!("{create}bench_floor.{rest}");
        }
    }
    sql.to_owned()
}

async fn postgres_load(mut conn: PgConnection, tables: &[Table]) -> anyhow::Result<Floor> {
    exec(&mut conn, "CREATE SCHEMA bench_floor".into()).await?;
    for t in tables {
        for sql in written_sql(t) {
            exec(&mut conn, sql).await?;
        }
        // Columns, defaults, checks, keys and indexes; not triggers or foreign keys.
        exec(
            &mut conn,
            format!(
                "CREATE TABLE bench_floor.{0} (LIKE public.{0} INCLUDING ALL)",
                t.name
            ),
        )
        .await?;
    }
    let floor = timed_load(&mut conn, tables).await?;
    exec(&mut conn, "DROP SCHEMA bench_floor CASCADE".into()).await?;
    conn.close().await?;
    Ok(floor)
}

/// PostgreSQL: rows in `COPY`'s text format, copied out (untimed) and in (timed) unchanged,
/// [`CHUNK`] rows at a time.
impl BulkLoad for PgConnection {
    async fn exec(&mut self, sql: String) -> anyhow::Result<()> {
        exec(self, sql).await
    }

    async fn load(&mut self, t: &Table) -> anyhow::Result<(i64, Duration)> {
        let columns = t.columns.join(", ");
        // Untimed. Without it every chunk below scans and sorts the whole table: at 1,000,000
        // pledges the copying out took longer than the settlement it measures.
        exec(
            &mut *self,
            format!("CREATE INDEX ON bench_written_{} (bench_n)", t.name),
        )
        .await?;
        let (mut after, mut loading) = (0, Duration::ZERO);
        loop {
            let read = format!(
                "COPY (SELECT {columns} FROM bench_written_{} WHERE bench_n > {after}
                 ORDER BY bench_n LIMIT {CHUNK}) TO STDOUT",
                t.name
            );
            let data: Vec<u8> = self
                .copy_out_raw(&read)
                .await?
                .try_fold(Vec::new(), |mut all, bytes| async move {
                    all.extend_from_slice(&bytes);
                    Ok(all)
                })
                .await?;
            let n = data.iter().filter(|&&b| b == b'\n').count() as i64;
            if n == 0 {
                return Ok((after, loading));
            }
            after += n;
            let started = Instant::now();
            let mut copy = self
                .copy_in_raw(&format!(
                    "COPY bench_floor.{} ({columns}) FROM STDIN",
                    t.name
                ))
                .await?;
            copy.send(data).await?;
            copy.finish()
                .await
                .with_context(|| format!("COPY into {}", t.name))?;
            loading += started.elapsed();
        }
    }
}
