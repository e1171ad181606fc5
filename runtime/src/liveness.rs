//! This runtime's liveness key, for the workers no parent-death signal reaches.
//!
//! A local child dies with its parent (`PR_SET_PDEATHSIG`); a pod cannot. So the first remote
//! `Process` a runtime starts makes it keep a key (`processes:drivers:<runtime id>`) with a
//! short TTL, refreshed every quarter of it, and each remote `Process` worker checks the key
//! (see `shoal_executor::worker`): when it has been missing for half the TTL, the driver is
//! dead, frozen or cut off, and the worker exits with `EXIT_DRIVER_GONE` (76), as a pool
//! worker does with its pool's key. The key lapses `DRIVER_TTL` after the runtime's process
//! dies however it dies, so its remote children end within about one and a half TTLs.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use shoal_core::store::Store;

/// The liveness key's TTL: 5 s (its refresh every 1.25 s costs one `SET` per runtime).
pub(crate) const DRIVER_TTL: Duration = Duration::from_secs(5);

/// Refreshes the liveness key while the runtime runs.
pub(crate) struct DriverLiveness {
    store: Arc<Store>,
    key: String,
    ttl: Duration,
}

impl DriverLiveness {
    pub(crate) fn new(store: Arc<Store>, key: String, ttl: Duration) -> Self {
        DriverLiveness { store, key, ttl }
    }

    fn refresh(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let key = self.key.clone();
        let ttl_ms = self.ttl.as_millis() as u64;
        ctx.spawn(
            async move {
                match store.multiplexed().await {
                    Ok(mut conn) => {
                        let set = redis::cmd("SET")
                            .arg(&key)
                            .arg(1)
                            .arg("PX")
                            .arg(ttl_ms)
                            .query_async::<()>(&mut conn)
                            .await;
                        if let Err(e) = set {
                            tracing::warn!("refreshing the liveness key {key}: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("refreshing the liveness key {key}: {e}"),
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for DriverLiveness {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.refresh(ctx);
        ctx.run_interval(self.ttl / 4, |act, ctx| act.refresh(ctx));
    }
}
