//! Per-backend pool of ready (greeted, EHLO'd) connections: bounded size,
//! idle expiry, transaction cap per connection, liveness check at checkout.
//! It does not speak transactions; `relay::Txn` does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::client::{BackendConn, BackendError};

/// Settings of one pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub addr: String,
    pub backend: usize,
    pub helo_name: String,
    pub max_connections: usize,
    pub max_idle: Duration,
    pub max_transactions: u32,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

/// Connections to one backend.
#[derive(Debug)]
pub struct Pool {
    pub settings: PoolSettings,
    idle: Mutex<Vec<BackendConn>>,
    permits: Arc<Semaphore>,
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Pool {
        Pool {
            permits: Arc::new(Semaphore::new(settings.max_connections)),
            idle: Mutex::new(Vec::new()),
            settings,
        }
    }

    /// A ready connection: the most recently used idle one that is still
    /// alive, or a new one. Returns whether it was reused (a reused one may
    /// still turn out dead on first use; the caller then asks `open`).
    pub async fn checkout(&self) -> Result<(BackendConn, bool), BackendError> {
        loop {
            let candidate = self.idle.lock().expect("pool lock").pop();
            let Some(conn) = candidate else { break };
            if conn.idle_since.elapsed() <= self.settings.max_idle && conn.idle_ok() {
                return Ok((conn, true));
            }
            tracing::debug!(backend = %self.settings.addr, "dropping stale idle connection");
        }
        self.open().await.map(|c| (c, false))
    }

    /// A new connection, waiting at most the connect timeout for a free slot.
    pub async fn open(&self) -> Result<BackendConn, BackendError> {
        let s = &self.settings;
        let permit =
            match tokio::time::timeout(s.connect_timeout, self.permits.clone().acquire_owned())
                .await
            {
                Ok(Ok(p)) => p,
                _ => return Err(BackendError::Exhausted),
            };
        let mut conn = BackendConn::open(
            &s.addr,
            s.backend,
            &s.helo_name,
            s.connect_timeout,
            s.command_timeout,
        )
        .await?;
        conn._permit = Some(permit);
        Ok(conn)
    }

    /// Gives a connection back after a transaction. Connections past their
    /// transaction cap are closed with QUIT.
    pub fn checkin(&self, mut conn: BackendConn) {
        if conn.txns >= self.settings.max_transactions || self.settings.max_idle.is_zero() {
            tokio::spawn(conn.quit());
            return;
        }
        conn.idle_since = Instant::now();
        self.idle.lock().expect("pool lock").push(conn);
    }

    /// Closes idle connections that expired (QUIT, in the background).
    pub fn reap(&self) {
        let max_idle = self.settings.max_idle;
        let expired: Vec<BackendConn> = {
            let mut idle = self.idle.lock().expect("pool lock");
            let (old, keep): (Vec<_>, Vec<_>) = idle
                .drain(..)
                .partition(|c| c.idle_since.elapsed() > max_idle);
            *idle = keep;
            old
        };
        for c in expired {
            tokio::spawn(c.quit());
        }
    }

    /// QUITs every idle connection (shutdown).
    pub async fn close_idle(&self) {
        let all: Vec<BackendConn> = self.idle.lock().expect("pool lock").drain(..).collect();
        let quits: Vec<_> = all.into_iter().map(|c| tokio::spawn(c.quit())).collect();
        for q in quits {
            let _ = q.await;
        }
    }

    /// Idle connections now held.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }
}
