//! Counts requests whose replies or Finished signals are still to be sent, so shutdown can
//! wait for every caller to hear `Cancelled` before the daemon leaves the bus.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    count: AtomicUsize,
    idle: Notify,
}

/// Held while one request is in flight.
#[derive(Debug)]
pub struct Guard(Arc<Inner>);

impl InFlight {
    pub fn enter(&self) -> Guard {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        Guard(Arc::clone(&self.0))
    }

    /// Waits until no request is in flight, or `limit` passes. Returns whether it drained.
    pub async fn drained(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.0.idle.notified();
                if self.0.count.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
