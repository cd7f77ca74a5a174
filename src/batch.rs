//! Group commit: many callers' small writes gathered into one transaction.
//!
//! A commit costs a disk flush (SQLite, `synchronous=FULL`) or a WAL flush and a round trip
//! (PostgreSQL), whatever it carries. Under load, a [`Batcher`] lets callers queue their
//! requests while one worker runs the batch before them; the next batch takes everything that
//! arrived meanwhile, so the batch grows with the load and an idle system still answers one
//! request at a time with no added wait. Every caller gets its answer only after the batch's
//! transaction committed, so an accepted write is durable before it is acknowledged.
//!
//! The other way round, a job that writes many chunks one after another keeps a few of them
//! [`InFlight`]: on PostgreSQL one chain of statements leaves a core idle between round trips.
//! And it reads its chunks with [`ReadAhead`], each read running while the job works on the
//! chunk before, so the writer is not left waiting for one large read up front.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// The batch worker stopped (its runtime is shutting down); the request was not run.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the {0} batch worker has stopped")]
pub struct Stopped(pub &'static str);

type Job<Req, Resp> = (Req, oneshot::Sender<Resp>);

/// A queue in front of one worker that runs requests in batches of at most `max` items.
pub struct Batcher<Req, Resp> {
    name: &'static str,
    queue: mpsc::UnboundedSender<Job<Req, Resp>>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Batcher {
            name: self.name,
            queue: self.queue.clone(),
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Spawns the worker on the current runtime. `run` answers a batch with one response per
    /// request, in order (it maps its own failures into the responses).
    pub fn spawn<F, Fut>(name: &'static str, max: usize, run: F) -> Batcher<Req, Resp>
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Resp>> + Send,
    {
        let (queue, mut rx) = mpsc::unbounded_channel::<Job<Req, Resp>>();
        let run = Arc::new(run);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut jobs = vec![first];
                while jobs.len() < max {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
                let (requests, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
                metrics::histogram!("pooled_batch_size", "batch" => name)
                    .record(requests.len() as f64);
                // With the size, the time a batch takes: a queue's rate is their ratio, and a
                // caller waits for the batch running when it came, then for its own (time
                // measured, not business time: no clock involved).
                let started = std::time::Instant::now();
                let responses = run(requests).await;
                metrics::histogram!("pooled_batch_seconds", "batch" => name)
                    .record(started.elapsed().as_secs_f64());
                debug_assert_eq!(responses.len(), replies.len());
                for (reply, response) in replies.into_iter().zip(responses) {
                    // A caller that went away no longer needs its answer.
                    let _ = reply.send(response);
                }
            }
        });
        Batcher { name, queue }
    }

    /// Queues `request` and waits for its batch to be committed.
    pub async fn call(&self, request: Req) -> Result<Resp, Stopped> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((request, reply))
            .map_err(|_| Stopped(self.name))?;
        answer.await.map_err(|_| Stopped(self.name))
    }
}

/// Up to `limit` chunk writes running at once, each on a task of its own so it progresses
/// while the caller prepares the next chunk. Only for writes that cannot overlap (each takes
/// its rows with a guarded update) and each in its own transaction. Dropping it aborts the
/// writes still running, whose transactions then roll back.
pub struct InFlight<T> {
    running: JoinSet<T>,
    limit: usize,
}

impl<T: Send + 'static> InFlight<T> {
    pub fn new(limit: usize) -> InFlight<T> {
        InFlight {
            running: JoinSet::new(),
            limit: limit.max(1),
        }
    }

    /// Starts `write`; when `limit` are already running, first waits for one of them and
    /// returns its result.
    pub async fn start(&mut self, write: impl Future<Output = T> + Send + 'static) -> Option<T> {
        let done = if self.running.len() >= self.limit {
            self.next().await
        } else {
            None
        };
        self.running.spawn(write);
        done
    }

    /// The next write to finish, or `None` when none is running. A write that panicked
    /// panics here, as it would have run inline.
    pub async fn next(&mut self) -> Option<T> {
        match self.running.join_next().await? {
            Ok(result) => Some(result),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a chunk write was cancelled: {e}"),
        }
    }
}

/// A job's rows, read a chunk of ids at a time by `read`: the next chunk's read starts as the
/// caller takes this one, so it runs while the caller works on (and writes) this chunk. Only
/// one chunk is read ahead, so at most two are held. Dropping it abandons the read ahead.
pub struct ReadAhead<T, F> {
    ids: std::vec::IntoIter<String>,
    chunk: usize,
    read: F,
    next: Option<JoinHandle<T>>,
}

impl<T, F, Fut> ReadAhead<T, F>
where
    T: Send + 'static,
    F: Fn(Vec<String>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    /// Starts reading the first chunk of `ids` (chunks of `chunk`, in order).
    pub fn new(ids: Vec<String>, chunk: usize, read: F) -> ReadAhead<T, F> {
        let mut reader = ReadAhead {
            ids: ids.into_iter(),
            chunk: chunk.max(1),
            read,
            next: None,
        };
        reader.next = reader.start();
        reader
    }

    fn start(&mut self) -> Option<JoinHandle<T>> {
        let ids: Vec<String> = self.ids.by_ref().take(self.chunk).collect();
        (!ids.is_empty()).then(|| tokio::spawn((self.read)(ids)))
    }

    /// The next chunk's rows, or `None` after the last chunk. A read that panicked panics
    /// here, as it would have run inline.
    pub async fn next(&mut self) -> Option<T> {
        let reading = self.next.take()?;
        self.next = self.start();
        Some(match reading.await {
            Ok(rows) => rows,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a chunk read was cancelled: {e}"),
        })
    }
}

impl<T, F> Drop for ReadAhead<T, F> {
    fn drop(&mut self) {
        if let Some(reading) = self.next.take() {
            reading.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Batcher, InFlight, ReadAhead};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn every_caller_gets_its_own_answer_and_batches_form_under_load() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = batches.clone();
        let doubler = Batcher::spawn("test", 16, move |xs: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::task::yield_now().await;
                xs.into_iter().map(|x| x * 2).collect::<Vec<_>>()
            }
        });
        let calls: Vec<_> = (0..100u32)
            .map(|i| {
                let b = doubler.clone();
                tokio::spawn(async move { (i, b.call(i).await.unwrap()) })
            })
            .collect();
        for c in calls {
            let (i, doubled) = c.await.unwrap();
            assert_eq!(doubled, i * 2);
        }
        let n = batches.load(Ordering::SeqCst);
        assert!(
            (7..100).contains(&n),
            "100 requests in {n} batches of at most 16"
        );
    }

    #[tokio::test]
    async fn in_flight_runs_at_most_its_limit_at_once_and_returns_every_result() {
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut writes = InFlight::new(2);
        let mut results = Vec::new();
        for i in 0..10usize {
            let (running, most) = (running.clone(), most.clone());
            let write = async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                running.fetch_sub(1, Ordering::SeqCst);
                i
            };
            results.extend(writes.start(write).await);
        }
        while let Some(i) = writes.next().await {
            results.push(i);
        }
        results.sort();
        assert_eq!(results, (0..10).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 2, "two at once, never more");
    }

    #[tokio::test]
    async fn read_ahead_gives_every_chunk_in_order_reading_one_ahead() {
        let started = Arc::new(AtomicUsize::new(0));
        let counted = started.clone();
        let ids: Vec<String> = (0..7).map(|i| i.to_string()).collect();
        let mut chunks = ReadAhead::new(ids, 3, move |ids: Vec<String>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { ids.join(",") }
        });
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "the first chunk is read at once"
        );
        let mut got = Vec::new();
        while let Some(chunk) = chunks.next().await {
            // While the caller holds a chunk, the next one (if any) is already being read.
            assert_eq!(started.load(Ordering::SeqCst), (got.len() + 2).min(3));
            got.push(chunk);
        }
        assert_eq!(got, ["0,1,2", "3,4,5", "6"]);
    }
}
