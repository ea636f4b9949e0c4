//! The dashboard's one connection to the Flare server: an [`AdminSession`] made on first use
//! and made again after a failed attempt, so the dashboard starts (and keeps serving pages)
//! while the server is down. Every command is bounded by [`ASK_TIMEOUT`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Mutex;

use crate::net::protocol::AdminRequest;
use crate::roles::admin::AdminSession;

/// Longest wait for one command's answer (a download may take longer: [`DOWNLOAD_TIMEOUT`]).
pub const ASK_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a download of a job's results.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// What the server said: `Ok(Ok(answer))`, `Ok(Err(refusal))` (the admin lacks the right, the
/// job does not exist, …), or `Err(why)` when it could not be asked at all.
pub type Answer<T> = Result<Result<T, String>, String>;

/// The session, made lazily.
#[derive(Debug)]
pub struct Backend {
    /// The admin's startup kit.
    kit_dir: PathBuf,
    /// The live session; `None` until a connection succeeds. Locked only to take or make it.
    session: Mutex<Option<Arc<AdminSession>>>,
}

impl Backend {
    /// A backend for the admin kit at `kit_dir`; nothing is dialled yet.
    pub fn new(kit_dir: PathBuf) -> Backend {
        Backend {
            kit_dir,
            session: Mutex::new(None),
        }
    }

    /// The session, connecting first if there is none.
    async fn session(&self) -> Result<Arc<AdminSession>, String> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let s = match tokio::time::timeout(ASK_TIMEOUT, AdminSession::connect(&self.kit_dir)).await
        {
            Ok(Ok(s)) => Arc::new(s),
            Ok(Err(e)) => return Err(format!("{e:#}")),
            Err(_) => return Err(format!("no connection within {} s", ASK_TIMEOUT.as_secs())),
        };
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Sends one command.
    pub async fn ask(&self, req: AdminRequest) -> Answer<Value> {
        let s = self.session().await?;
        match tokio::time::timeout(ASK_TIMEOUT, s.ask(req)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("no answer within {} s", ASK_TIMEOUT.as_secs())),
        }
    }

    /// Downloads `job`'s results into `dir`: the names of the files.
    pub async fn download(&self, job: &str, dir: &Path) -> Answer<Vec<String>> {
        let s = self.session().await?;
        match tokio::time::timeout(DOWNLOAD_TIMEOUT, s.download(job, dir)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!(
                "the download took over {} s",
                DOWNLOAD_TIMEOUT.as_secs()
            )),
        }
    }
}
