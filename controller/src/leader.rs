//! Leader election on a coordination.k8s.io Lease, so two replicas never reconcile at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tracing::{info, warn};

/// Holds (or waits for) the lease `name` in `namespace` as `identity`.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaderElection {
    /// Tries once to take or renew the lease; `true` while we hold it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let holder = spec.holder_identity.clone().unwrap_or_default();
                let expired = spec.renew_time.as_ref().is_none_or(|t| {
                    let valid = i64::from(spec.lease_duration_seconds.unwrap_or(secs));
                    t.0.as_second() + valid < now.as_second()
                });
                if holder != self.identity && !holder.is_empty() && !expired {
                    return Ok(false);
                }
                let mut new = spec.clone();
                if holder != self.identity {
                    new.acquire_time = Some(MicroTime(now));
                    new.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                new.holder_identity = Some(self.identity.clone());
                new.renew_time = Some(MicroTime(now));
                new.lease_duration_seconds = Some(secs);
                lease.spec = Some(new);
                // Replace checks resourceVersion: of two racing replicas only one wins.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election: API error"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the lease until it cannot; returns when leadership is lost.
    pub async fn keep(&self) {
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire().await {
                Ok(true) => {}
                Ok(false) => {
                    warn!("lost the leader lease");
                    return;
                }
                Err(e) => warn!(error = %e, "renewing the leader lease failed"),
            }
        }
    }
}
