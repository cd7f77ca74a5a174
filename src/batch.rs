//! Group commit: many callers' small writes gathered into one transaction.
//!
//! A commit costs a disk flush (SQLite, `synchronous=FULL`) or a WAL flush and a round trip
//! (PostgreSQL), whatever it carries. Under load, a [`Batcher`] lets callers queue their
//! requests while one worker runs the batch before them; the next batch takes everything that
//! arrived meanwhile, so the batch grows with the load and an idle system still answers one
//! request at a time with no added wait. Every caller gets its answer only after the batch's
//! transaction committed, so an accepted write is durable before it is acknowledged.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

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
                let responses = run(requests).await;
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

#[cfg(test)]
mod tests {
    use super::Batcher;
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
}
