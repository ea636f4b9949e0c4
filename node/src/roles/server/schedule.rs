//! The server's scheduler: submitted jobs go out in submit order, at most `max_jobs`
//! (`local/resources.json`, [`ServerResources`](super::ServerResources)) deployed or running
//! at once, each once its sites are connected and every one of them says its resources fit
//! (`CheckResources`, answered from the site's [`Ledger`](super::super::resources::Ledger)).
//! A job that must wait says what for in its status, once per change of reason; a later job
//! that fits does not wait behind it. A job some site could never run (it asks more than the
//! site has) is refused at submit when that site is connected, and fails at scheduling
//! otherwise. The site reserves at deploy, so two jobs never share what one was promised.

use std::sync::Arc;

use futures::future::join_all;

use super::super::now_ms;
use super::super::resources::ResourceAsk;
use super::Server;
use crate::job::JobMeta;
use crate::net::PeerInfo;
use crate::net::protocol::{ControlRequest, ControlResponse};
use crate::store::JobState;

/// Whether a job's resources fit on its sites.
pub(super) enum Placement {
    /// Every site has room now.
    Fits,
    /// Some site has not: what the job waits for.
    Wait(String),
    /// Some site never could.
    Never(String),
}

impl Server {
    /// Deploys submitted jobs whose sites are connected and have room, up to `max_jobs`.
    pub(super) async fn schedule(self: Arc<Self>) {
        let pending = self.store.ids_in_state(JobState::Submitted);
        if pending.is_empty() {
            return;
        }
        let max = self.limits.max_jobs;
        let mut active = self.store.ids_in_state(JobState::Dispatched).len()
            + self.store.ids_in_state(JobState::Running).len();
        for id in pending {
            if active >= max {
                let why = format!("waiting for a slot: {active} jobs run (max_jobs {max})");
                if let Err(e) = self.wait(&id, why) {
                    tracing::warn!(job = %id, error = %e, "cannot note what the job waits for");
                }
                continue;
            }
            match Arc::clone(&self).try_deploy(&id).await {
                Ok(true) => active += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(job = %id, error = %format!("{e:#}"), "deploy failed");
                    let _ =
                        self.store
                            .set_state(&id, JobState::Failed, &format!("{e:#}"), now_ms());
                }
            }
        }
    }

    /// Notes in job `id`'s status what it waits for, when that changed.
    pub(super) fn wait(&self, id: &str, why: String) -> Result<(), crate::store::StoreError> {
        if self.store.get(id)?.waiting.as_deref() == Some(why.as_str()) {
            return Ok(());
        }
        self.store.update(id, |r| {
            r.history.push(crate::store::StatusEntry {
                at_ms: now_ms(),
                state: r.state,
                note: why.clone(),
            });
            r.waiting = Some(why.clone());
        })?;
        Ok(())
    }

    /// Asks each of `targets` whether what `meta` asks of it fits now.
    pub(super) async fn place(&self, id: &str, meta: &JobMeta, targets: &[PeerInfo]) -> Placement {
        let asks = targets.iter().map(|p| {
            let req = ControlRequest::CheckResources {
                job: id.to_string(),
                ask: ResourceAsk::of(meta, &p.cert.name),
            };
            let net = self.net.clone();
            let peer = p.peer;
            async move { net.request(peer, req).await }
        });
        let answers = join_all(asks).await;
        let (mut wait, mut never) = (Vec::new(), Vec::new());
        for (p, a) in targets.iter().zip(answers) {
            let name = &p.cert.name;
            match a {
                Ok(ControlResponse::Ok) => {}
                Ok(ControlResponse::Refused { reason }) => wait.push(format!("{name}: {reason}")),
                Ok(ControlResponse::Error { reason }) => never.push(format!("{name}: {reason}")),
                Ok(other) => wait.push(format!("{name}: unexpected answer {other:?}")),
                Err(e) => wait.push(format!("{name}: no answer ({e})")),
            }
        }
        if !never.is_empty() {
            Placement::Never(format!(
                "its resource_spec can never be met: {}",
                never.join("; ")
            ))
        } else if !wait.is_empty() {
            Placement::Wait(format!("waiting for resources: {}", wait.join("; ")))
        } else {
            Placement::Fits
        }
    }

    /// Why the submitted job `id` can never run on the sites connected now, if it cannot.
    pub(super) async fn never_fits(&self, id: &str) -> Option<String> {
        let job = match super::load_job(&self.store, id) {
            Ok(j) => j,
            Err(e) => return Some(format!("{e:#}")),
        };
        if job.meta.resource_spec.is_empty() {
            return None;
        }
        let targets: Vec<PeerInfo> = self
            .connected_sites()
            .into_iter()
            .filter(|p| job.deploys_to(&p.cert.name))
            .collect();
        match self.place(id, &job.meta, &targets).await {
            Placement::Never(why) => Some(why),
            Placement::Fits | Placement::Wait(_) => None,
        }
    }
    /// What a submitted job waits for: its `min_clients` among the sites its `deploy_map`
    /// names, and each `mandatory_clients` site, naming those not connected and those that
    /// have not connected since this server started (a name the project may not have).
    pub(super) fn waiting_for(
        &self,
        meta: &crate::job::JobMeta,
        connected: &[&str],
        all: bool,
    ) -> String {
        let seen: Vec<String> = self
            .heartbeats
            .lock()
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default();
        let describe = |name: &str| {
            if seen.iter().any(|s| s == name) {
                format!("{name} (disconnected)")
            } else {
                format!("{name} (not connected since the server started)")
            }
        };
        let mut parts = Vec::new();
        if connected.len() < meta.min_clients {
            let mut missing: Vec<&str> = meta
                .deploy_map
                .values()
                .flatten()
                .map(String::as_str)
                .filter(|n| !matches!(*n, "@ALL" | "server") && !connected.contains(n))
                .collect();
            missing.sort_unstable();
            missing.dedup();
            let mut p = format!(
                "{} of min_clients {} sites connected",
                connected.len(),
                meta.min_clients
            );
            if !all && !missing.is_empty() {
                let named: Vec<String> = missing.iter().map(|n| describe(n)).collect();
                p.push_str(&format!("; deploy_map names {}", named.join(", ")));
            }
            parts.push(p);
        }
        let absent: Vec<String> = meta
            .mandatory_clients
            .iter()
            .filter(|m| !connected.contains(&m.as_str()))
            .map(|m| describe(m))
            .collect();
        if !absent.is_empty() {
            parts.push(format!("mandatory_clients {}", absent.join(", ")));
        }
        format!("waiting for sites: {}", parts.join("; "))
    }
}
