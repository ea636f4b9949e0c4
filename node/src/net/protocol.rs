//! The messages of Flare's own libp2p protocols and their limits.
//!
//! - `/flare/control/1.0.0`: request-response, CBOR, for admission, admin commands, deploys,
//!   heartbeats and task notices. Capped at [`MAX_CONTROL_REQUEST`]/[`MAX_CONTROL_RESPONSE`].
//! - `/flare/bulk/1.0.0`: one-directional streams carrying sealed models in chunks
//!   (see [`super::bulk`]).
//! - `/flare/download/1.0.0`: an admin fetches a finished job's result files, sealed in chunks
//!   (see [`super::download`]).

use std::collections::BTreeMap;

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Control protocol name.
pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/flare/control/1.0.0");
/// Bulk protocol name.
pub const BULK_PROTOCOL: StreamProtocol = StreamProtocol::new("/flare/bulk/1.0.0");
/// Download protocol name.
pub const DOWNLOAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/flare/download/1.0.0");
/// Largest control request: a job bundle fits, a model does not.
pub const MAX_CONTROL_REQUEST: usize = 16 << 20;
/// Largest control response.
pub const MAX_CONTROL_RESPONSE: usize = 16 << 20;

/// A job folder in transit: its files and the submitting admin's signature over them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobBundle {
    /// Relative path → contents, for every file of the job folder.
    pub files: BTreeMap<String, ByteBuf>,
    /// The `signature.json` the admin made over those files.
    pub signature: ByteBuf,
}

/// What an admin asks the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Store and schedule a job.
    Submit(JobBundle),
    /// All jobs.
    List,
    /// The server and its sites, or one job in detail.
    Status {
        /// A job id, or none for the server.
        job: Option<String>,
    },
    /// Stop a job.
    Abort {
        /// Job id.
        job: String,
    },
    /// Fetch a finished job's results (final model and metrics).
    Download {
        /// Job id.
        job: String,
    },
    /// Remove a job that is not running.
    Delete {
        /// Job id.
        job: String,
    },
    /// Submit a copy of an existing job under a new id.
    Clone {
        /// Job id.
        job: String,
    },
    /// Connected sites and how they are connected.
    Sites,
    /// A job's metric series (every site's and the global model's), for plots.
    Metrics {
        /// Job id.
        job: String,
    },
}

/// Everything a node may ask another over the control protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Admission: the sender's certificate (the first message on every connection).
    Hello {
        /// The project the sender belongs to.
        project: String,
        /// The sender's certificate, DER.
        cert_der: ByteBuf,
        /// A random number the sending process drew at start. A copy of a kit has the same
        /// key, hence the same PeerId: the instance tells a second process apart from a
        /// second connection of the same process.
        #[serde(default)]
        instance: u64,
    },
    /// An admin command (admin → server).
    Admin(AdminRequest),
    /// Liveness and progress (client → server).
    Heartbeat {
        /// Jobs the site runs now, with the round it is in.
        jobs: BTreeMap<String, u32>,
        /// Where the site listens (from its kit), so the server can tell other sites.
        #[serde(default)]
        listen: Vec<String>,
        /// A hub's region sites per tiered job it runs: site → state, for `status` at tier
        /// 1 (`region.site`). Empty for other sites.
        #[serde(default)]
        regions: BTreeMap<String, BTreeMap<String, String>>,
    },
    /// Configure a client-controlled workflow on a site (server → client).
    Configure {
        /// Job id.
        job: String,
        /// The other sites of the run and how to reach them.
        peers: Vec<PeerEntry>,
        /// The run's seed (every site draws aggregators from it).
        seed: u64,
        /// The site restarted while the run went on: it rejoins at the current round.
        rejoin: bool,
        /// Configure the job's cross-site evaluation (which follows its training workflow)
        /// instead of the training workflow.
        #[serde(default)]
        evaluation: Option<EvaluationStage>,
        /// A tiered job whose regions run a swarm: the region's swarm for this global round
        /// (hub → its sites), configured from the job's tiered arguments; the hub then starts
        /// it with a sealed start message carrying the global model.
        #[serde(default)]
        region_round: Option<u32>,
    },
    /// Whether a job's resources fit on the site now (server → client, before a deploy):
    /// `Ok`; `Refused` with what it waits for; `Error` when the site could never give them.
    CheckResources {
        /// Job id.
        job: String,
        /// What the job asks of this site.
        ask: crate::roles::resources::ResourceAsk,
    },
    /// Start a configured client-controlled workflow on its starting client (server → client).
    StartWorkflow {
        /// Job id.
        job: String,
    },
    /// A progress report of a client-controlled workflow (client → server).
    WorkflowReport {
        /// Job id.
        job: String,
        /// The report.
        report: flare_protocols::workflows::ccwf::Report,
    },
    /// Deploy a job's app to a site (server → client).
    Deploy {
        /// Job id.
        job: String,
        /// The job as submitted.
        bundle: JobBundle,
        /// The submitting admin's certificate (DER): the site checks it chains to the project
        /// CA and that its key signed the bundle.
        submitter_cert: ByteBuf,
        /// This site's position among the job's sites (for data partitioning).
        site_index: u32,
        /// How many sites the job was deployed to.
        num_sites: u32,
        /// A job a hub runs in its region: its signed derivation record, with the steps of
        /// the hubs above (`roles::tier`); absent for every other job. Boxed: the chain is
        /// the largest part of a request.
        #[serde(default)]
        derivation: Option<Box<crate::roles::tier::SignedDerivation>>,
    },
    /// A batch of a job's metrics (client → server), acknowledged with `Ok` once written
    /// (`crate::tracking`).
    Metrics {
        /// Job id.
        job: String,
        /// The sending queue's random id (a restarted site's queue is a new stream).
        stream: u64,
        /// The sequence number of the first record in the queue.
        seq: u64,
        /// At most [`crate::tracking::MAX_BATCH`] records.
        records: Vec<crate::tracking::MetricRecord>,
    },
    /// Stop a job on a site (server → client).
    AbortJob {
        /// Job id.
        job: String,
        /// The certificate (DER) of the admin whose `abort` this is, which the site checks
        /// against its own `manage_job` rule; `None` when the server stops the job itself
        /// (it ended, failed, or fell short at deploy).
        #[serde(default)]
        by: Option<ByteBuf>,
    },
}

/// A site of a run: its name, PeerId and listen addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerEntry {
    /// Participant name.
    pub name: String,
    /// PeerId, as text.
    pub peer_id: String,
    /// Listen addresses, as text.
    pub addrs: Vec<String>,
}

/// The cross-site evaluation stage of a job, as the server configures it on a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvaluationStage {
    /// The site holding the global model (the best one, or the final one without a best),
    /// unless the job names `global_model_client`.
    pub global_holder: Option<String>,
}

/// Answers to [`ControlRequest`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// Admission accepted; the responder's own certificate.
    Welcome {
        /// The responder's certificate, DER.
        cert_der: ByteBuf,
        /// The responder's process instance (see [`ControlRequest::Hello`]).
        #[serde(default)]
        instance: u64,
    },
    /// Done.
    Ok,
    /// The site declined (for example by its local policy), with the reason.
    Refused {
        /// Why.
        reason: String,
    },
    /// The request failed, with the reason. The answer to a refused `Hello` carries why the
    /// sender was refused, so the dialer can say so instead of timing out.
    Error {
        /// Why.
        reason: String,
    },
    /// An admin command's answer, as JSON text for the CLI to render.
    Admin {
        /// The payload.
        json: String,
        /// Files returned inline by `download` from servers before the download stream:
        /// relative path → contents. Today's servers list the files in `json` and stream them
        /// over `/flare/download/1.0.0` instead.
        files: BTreeMap<String, ByteBuf>,
    },
}
