//! The web dashboard (`flare-node dashboard --kit <admin>/startup`): a small HTTP server on
//! 127.0.0.1 that shows the federation and its jobs, with plots of their metrics, and can abort
//! a job or download its results, with exactly the rights of the admin kit it runs with (it
//! sends the same commands as the console, through one [`AdminSession`]).
//!
//! Pages are rendered on the server ([`pages`], [`plots`]); there is no script. A job page
//! reloads itself every 3 s while the job runs.
//!
//! Who may use it ([`auth`]): every request must carry the session token, printed once at
//! start as `dashboard: http://127.0.0.1:PORT/?token=TOKEN`; such a request gets an HttpOnly,
//! SameSite=Strict cookie and is redirected to the URL without the token. The `Host` header
//! must name the dashboard (DNS rebinding). Abort and download are POST forms carrying a CSRF
//! token, and their `Origin`/`Referer`, when sent, must be the dashboard. The dashboard listens
//! on loopback only, unless `--allow-remote` is given with a `--token-file`.
//!
//! Routes: `GET /` (server, sites, jobs), `GET /jobs/<id>`, `POST /jobs/<id>/abort`,
//! `POST /jobs/<id>/download` (into `<admin>/transfer/<id>`), `GET /jobs/<id>/files/<name>`.
//!
//! [`AdminSession`]: crate::roles::admin::AdminSession

pub mod auth;
pub mod backend;
pub mod data;
pub mod pages;
pub mod plots;

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{FormRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Form, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::io::AsyncReadExt as _;
use tokio::sync::Semaphore;

use crate::net::download::{list_files, safe_name};
use crate::net::protocol::AdminRequest;
use auth::{Guard, Token};
use backend::Backend;
use pages::Page;

/// Where the dashboard listens unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8443);
/// Largest request body (the forms carry one CSRF token).
pub const MAX_BODY: usize = 4 << 10;
/// Requests handled at once; more get 503.
pub const MAX_CONCURRENT: usize = 32;
/// Messages kept for job pages (the oldest go first).
const MAX_FLASHES: usize = 64;
/// Result files listed on a job page.
const MAX_FILES: usize = 500;

/// How to run the dashboard.
#[derive(Debug, Clone)]
pub struct DashboardOptions {
    /// The admin's startup kit: the dashboard has exactly this admin's rights.
    pub kit_dir: PathBuf,
    /// Where to listen; port 0 picks a free port (the printed URL has the real one).
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen`: anyone who can reach the port and has the token acts
    /// as the admin, so this needs `token_file` too.
    pub allow_remote: bool,
    /// The session token (at least 32 URL-safe characters), instead of a random one: needed
    /// with `allow_remote`, so the token is one the operator chose and handed out.
    pub token_file: Option<PathBuf>,
}

/// Why the dashboard will not start with these options.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// A non-loopback address without `--allow-remote`.
    #[error(
        "--listen {0} is not a loopback address: the dashboard acts as the admin; give \
         --allow-remote (with --token-file) to listen there"
    )]
    NotLoopback(SocketAddr),
    /// `--allow-remote` on a non-loopback address without a token file.
    #[error("--allow-remote on {0} needs --token-file with a token of at least 32 characters")]
    NoTokenFile(SocketAddr),
    /// The token file is unusable.
    #[error(transparent)]
    Token(#[from] auth::TokenError),
}

/// Checks the options and makes the session token: the one in `token_file`, else a random one.
pub fn check_options(opts: &DashboardOptions) -> Result<Token, OptionsError> {
    let remote = !opts.listen.ip().is_loopback();
    if remote && !opts.allow_remote {
        return Err(OptionsError::NotLoopback(opts.listen));
    }
    if remote && opts.token_file.is_none() {
        return Err(OptionsError::NoTokenFile(opts.listen));
    }
    Ok(match &opts.token_file {
        Some(f) => Token::from_file(f)?,
        None => Token::generate()?,
    })
}

/// Whether `id` may be a job id: `[A-Za-z0-9-]{1,64}`. Only such ids reach the server, a
/// path or a link.
pub fn valid_job_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The dashboard's state, shared by every request.
#[derive(Debug)]
struct App {
    guard: Guard,
    backend: Backend,
    /// `<admin>/transfer`: downloads go to `<transfer>/<job>/`.
    transfer: PathBuf,
    /// Messages from aborts and downloads, shown once on the job's page.
    flashes: Mutex<VecDeque<(String, String)>>,
    permits: Arc<Semaphore>,
}

impl App {
    fn flash(&self, job: &str, msg: String) {
        let mut f = self
            .flashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if f.len() >= MAX_FLASHES {
            f.pop_front();
        }
        f.push_back((job.to_string(), msg));
    }

    fn take_flashes(&self, job: &str) -> Vec<String> {
        let mut f = self
            .flashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mine, rest): (Vec<_>, Vec<_>) = f.drain(..).partition(|(j, _)| j == job);
        f.extend(rest);
        mine.into_iter().map(|(_, m)| m).collect()
    }
}

/// Runs the dashboard until SIGINT or SIGTERM.
pub async fn run(opts: DashboardOptions) -> anyhow::Result<()> {
    let token = check_options(&opts)?;
    // A wrong kit is reported now, not on the first page.
    let kit = flare_provision::kit::load_kit(&opts.kit_dir, std::time::SystemTime::now())
        .with_context(|| format!("admin kit {}", opts.kit_dir.display()))?;
    let transfer = kit
        .participant_dir()
        .map(|d| d.join("transfer"))
        .unwrap_or_else(|| PathBuf::from("transfer"));
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let local = listener.local_addr()?;
    let app = Arc::new(App {
        guard: Guard::new(&token, local)?,
        backend: Backend::new(opts.kit_dir.clone()),
        transfer,
        flashes: Mutex::new(VecDeque::new()),
        permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
    });
    let shown = match local.ip() {
        IpAddr::V4(a) if a.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local.port())
        }
        IpAddr::V6(a) if a.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), local.port())
        }
        _ => local,
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "dashboard: http://{shown}/?token={}", token.reveal())?;
        out.flush()?;
    }
    tracing::info!(%local, kit = %opts.kit_dir.display(), "dashboard listening");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
}

async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/abort", post(abort))
        .route("/jobs/{id}/download", post(download))
        .route("/jobs/{id}/files/{*name}", get(file))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// A page with its status and the headers every response gets.
fn page(status: StatusCode, p: &Page) -> Response {
    let mut r = (status, p.render()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn message(status: StatusCode, title: &str, text: &str) -> Response {
    page(status, &pages::message(title, text))
}

fn see_other(location: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Every request: a free slot, the right `Host`, the session token (query or cookie), and
/// for anything but GET/HEAD an `Origin`/`Referer` of this dashboard. Then the security
/// headers on whatever the handler answers.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let mut resp = check_then_run(&app, req, next).await;
    let h = resp.headers_mut();
    for (k, v) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    resp
}

async fn check_then_run(app: &App, req: Request, next: Next) -> Response {
    let Ok(_permit) = app.permits.clone().try_acquire_owned() else {
        return message(
            StatusCode::SERVICE_UNAVAILABLE,
            "Busy",
            "Too many requests at once; try again.",
        );
    };
    let headers = req.headers();
    let host = header_str(headers, header::HOST)
        .unwrap_or_default()
        .to_string();
    if !app.guard.host_ok(&host) {
        return message(
            StatusCode::FORBIDDEN,
            "Wrong host",
            "This dashboard only answers requests addressed to its own address.",
        );
    }
    let (token, rest) = auth::take_token(req.uri().query().unwrap_or_default());
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD);
    match token {
        Some(t) if app.guard.token_ok(t) => {
            if read_only {
                // Trade the token for a cookie, and take it out of the address bar (and
                // out of the history and of Referer headers).
                let path = format!("/{}", req.uri().path().trim_start_matches('/'));
                let location = if rest.is_empty() {
                    path
                } else {
                    format!("{path}?{rest}")
                };
                let mut r = see_other(&location);
                if let Ok(v) = HeaderValue::from_str(&app.guard.set_cookie()) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
                return r;
            }
        }
        Some(_) => return unauthorized(),
        None => {
            let cookie_ok = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|c| app.guard.cookie_ok(c));
            if !cookie_ok {
                return unauthorized();
            }
        }
    }
    if !read_only
        && !app.guard.origin_ok(
            &host,
            header_str(headers, header::ORIGIN),
            header_str(headers, header::REFERER),
        )
    {
        return message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "This request came from another web page.",
        );
    }
    next.run(req).await
}

fn unauthorized() -> Response {
    message(
        StatusCode::UNAUTHORIZED,
        "Token needed",
        "Open the URL that `flare-node dashboard` printed when it started (it carries the \
         session token).",
    )
}

fn unreachable(why: &str) -> Response {
    page(StatusCode::SERVICE_UNAVAILABLE, &pages::unreachable(why))
}

async fn not_found() -> Response {
    message(StatusCode::NOT_FOUND, "Not found", "There is no such page.")
}

/// The job id of a route, if it is a valid one.
fn job_id(p: Result<Path<String>, PathRejection>) -> Option<String> {
    match p {
        Ok(Path(id)) if valid_job_id(&id) => Some(id),
        _ => None,
    }
}

fn no_such_job() -> Response {
    message(
        StatusCode::NOT_FOUND,
        "No such job",
        "Job ids are 1 to 64 letters, digits and '-'.",
    )
}

async fn overview(State(app): State<Arc<App>>) -> Response {
    let (server, jobs) = tokio::join!(
        app.backend.ask(AdminRequest::Status { job: None }),
        app.backend.ask(AdminRequest::List)
    );
    match (server, jobs) {
        (Ok(server), Ok(jobs)) => page(
            StatusCode::OK,
            &pages::overview(
                server.map(|v| data::ServerView::parse(&v)),
                jobs.map(|v| data::JobRow::parse_list(&v)),
            ),
        ),
        (Err(why), _) | (_, Err(why)) => unreachable(&why),
    }
}

async fn job_page(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let Some(id) = job_id(id) else {
        return no_such_job();
    };
    let record = match app
        .backend
        .ask(AdminRequest::Status {
            job: Some(id.clone()),
        })
        .await
    {
        Ok(Ok(v)) => v,
        Ok(Err(why)) => {
            return page(
                StatusCode::OK,
                &pages::job_refused(&id, &why, &app.take_flashes(&id)),
            );
        }
        Err(why) => return unreachable(&why),
    };
    let view = data::JobView::parse(&record);
    let plots = match app
        .backend
        .ask(AdminRequest::Metrics { job: id.clone() })
        .await
    {
        Ok(Ok(v)) => Ok(data::plots(&v, &view.rounds)),
        Ok(Err(why)) => Err(why),
        Err(why) => return unreachable(&why),
    };
    let files = list_files(&app.transfer.join(&id))
        .map(|fs| {
            fs.into_iter()
                .take(MAX_FILES)
                .map(|(e, _)| e.name)
                .filter(|n| safe_name(n))
                .collect()
        })
        .unwrap_or_default();
    let extras = pages::JobExtras {
        plots,
        files,
        csrf: app.guard.csrf(),
        flashes: app.take_flashes(&id),
    };
    page(StatusCode::OK, &pages::job(&id, &view, &extras))
}

/// The fields of the abort and download forms.
#[derive(Debug, Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: Option<String>,
}

/// The CSRF check of a POST form: `Some` is the refusal to send.
fn check_csrf(app: &App, form: Result<Form<ActionForm>, FormRejection>) -> Option<Response> {
    match form {
        Ok(Form(ActionForm { csrf: Some(c) })) if app.guard.csrf_ok(&c) => None,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Some(message(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Too large",
            "The form is too large.",
        )),
        _ => Some(message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "The form lacks a valid CSRF token: use the buttons of the job page.",
        )),
    }
}

async fn abort(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let Some(id) = job_id(id) else {
        return no_such_job();
    };
    if let Some(r) = check_csrf(&app, form) {
        return r;
    }
    let msg = match app
        .backend
        .ask(AdminRequest::Abort { job: id.clone() })
        .await
    {
        Ok(Ok(v)) => format!(
            "abort sent; the server says the job is {}",
            data::text(&v["state"])
        ),
        Ok(Err(why)) => format!("the server refused to abort the job: {why}"),
        Err(why) => return unreachable(&why),
    };
    tracing::info!(job = %id, %msg, "dashboard abort");
    app.flash(&id, msg);
    see_other(&format!("/jobs/{id}"))
}

async fn download(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let Some(id) = job_id(id) else {
        return no_such_job();
    };
    if let Some(r) = check_csrf(&app, form) {
        return r;
    }
    let dir = app.transfer.join(&id);
    let msg = match app.backend.download(&id, &dir).await {
        Ok(Ok(files)) => format!("downloaded {} files into {}", files.len(), dir.display()),
        Ok(Err(why)) => format!("the server refused the download: {why}"),
        Err(why) => format!("the download failed: {why}"),
    };
    tracing::info!(job = %id, %msg, "dashboard download");
    app.flash(&id, msg);
    see_other(&format!("/jobs/{id}"))
}

/// A downloaded result file, as an attachment (never rendered: a job's files are untrusted).
async fn file(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let none = || {
        message(
            StatusCode::NOT_FOUND,
            "No such file",
            "Download the job's results first.",
        )
    };
    let Ok(Path((id, name))) = p else {
        return none();
    };
    if !valid_job_id(&id) || !safe_name(&name) {
        return none();
    }
    let dir = app.transfer.join(&id);
    let path = dir.join(&name);
    // The file must really be inside the job's folder (no link out of it).
    let inside = match (std::fs::canonicalize(&dir), std::fs::canonicalize(&path)) {
        (Ok(d), Ok(p)) => p.starts_with(&d),
        _ => false,
    };
    if !inside {
        return none();
    }
    let Ok(f) = tokio::fs::File::open(&path).await else {
        return none();
    };
    let len = match f.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        _ => return none(),
    };
    let base: String = name
        .rsplit('/')
        .next()
        .unwrap_or("file")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    // 64 KiB at a time; a read error ends the body (the client sees a short file).
    let stream = futures::stream::unfold(Some(f), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; 64 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{base}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

#[cfg(test)]
mod tests;
