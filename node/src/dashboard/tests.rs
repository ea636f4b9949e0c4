//! The dashboard's security rules, checked over a real loopback socket with raw HTTP/1.1.
//! The admin kit does not exist, so a request that gets past the checks ends at the
//! "server unreachable" page (503): that is how these tests tell "let through" from "stopped".

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

struct Served {
    addr: SocketAddr,
    app: Arc<App>,
    _dir: tempfile::TempDir,
}

async fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Arc::new(App {
        guard: Guard::new(&Token::parse(TOKEN).unwrap(), addr).unwrap(),
        backend: Backend::new(dir.path().join("no-such-kit/startup")),
        transfer: dir.path().join("transfer"),
        flashes: Mutex::new(VecDeque::new()),
        permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
    });
    let r = router(app.clone());
    tokio::spawn(async move { axum::serve(listener, r).await });
    Served {
        addr,
        app,
        _dir: dir,
    }
}

/// The answer to one raw request: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `method path` with `headers` (a `Host` of the dashboard unless one is given) and
/// `body`.
async fn send(
    s: &Served,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {}\r\n", s.addr));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

fn cookie(s: &Served) -> String {
    s.app
        .guard
        .set_cookie()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

const FORM: &str = "application/x-www-form-urlencoded";

#[test]
fn options_refuse_remote_listening_without_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, format!("{TOKEN}\n")).unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "abc").unwrap();
    let opts =
        |listen: &str, allow_remote: bool, token_file: Option<&std::path::Path>| DashboardOptions {
            kit_dir: "kit".into(),
            listen: listen.parse().unwrap(),
            allow_remote,
            token_file: token_file.map(Into::into),
        };
    assert_eq!(DEFAULT_LISTEN.to_string(), "127.0.0.1:8443");
    assert_eq!(
        check_options(&opts("127.0.0.1:0", false, None))
            .unwrap()
            .reveal()
            .len(),
        64
    );
    assert!(check_options(&opts("[::1]:0", false, None)).is_ok());
    assert!(matches!(
        check_options(&opts("0.0.0.0:8443", false, None)),
        Err(OptionsError::NotLoopback(_))
    ));
    assert!(matches!(
        check_options(&opts("10.0.0.1:8443", false, Some(&good))),
        Err(OptionsError::NotLoopback(_))
    ));
    assert!(matches!(
        check_options(&opts("0.0.0.0:8443", true, None)),
        Err(OptionsError::NoTokenFile(_))
    ));
    assert!(matches!(
        check_options(&opts("0.0.0.0:8443", true, Some(&short))),
        Err(OptionsError::Token(auth::TokenError::Length(3)))
    ));
    assert_eq!(
        check_options(&opts("0.0.0.0:8443", true, Some(&good)))
            .unwrap()
            .reveal(),
        TOKEN
    );
    // A token file also replaces the random token on loopback.
    assert_eq!(
        check_options(&opts("127.0.0.1:0", false, Some(&good)))
            .unwrap()
            .reveal(),
        TOKEN
    );
}

#[test]
fn job_ids_are_checked() {
    for (id, ok) in [
        ("01a24abe6c31-3a2f", true),
        ("a", true),
        ("", false),
        ("../x", false),
        ("a b", false),
        ("a%2F", false),
        ("é", false),
        (&"a".repeat(64), true),
        (&"a".repeat(65), false),
    ] {
        assert_eq!(valid_job_id(id), ok, "{id}");
    }
}

#[tokio::test]
async fn requests_without_the_token_get_401() {
    let s = serve().await;
    for path in ["/", "/jobs/abc", "/nothing", "/?token=wrong", "/?token="] {
        let a = send(&s, "GET", path, &[], "").await;
        assert_eq!(a.status, 401, "{path}");
        assert!(a.body.contains("printed"), "{}", a.body);
        assert!(!a.body.contains(TOKEN));
    }
    let bad_cookie = format!("{}x", cookie(&s));
    let a = send(&s, "GET", "/", &[("Cookie", &bad_cookie)], "").await;
    assert_eq!(a.status, 401);
    let a = send(
        &s,
        "POST",
        "/jobs/abc/abort",
        &[("Content-Type", FORM)],
        "csrf=x",
    )
    .await;
    assert_eq!(a.status, 401);
}

#[tokio::test]
async fn the_token_becomes_a_strict_http_only_cookie_and_leaves_the_url() {
    let s = serve().await;
    let a = send(&s, "GET", &format!("/jobs/abc-1?token={TOKEN}"), &[], "").await;
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), Some("/jobs/abc-1"));
    let set = a.header("set-cookie").unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(!set.contains(TOKEN));
    // A protocol-relative path cannot turn the redirect into one to another host.
    let a = send(
        &s,
        "GET",
        &format!("//evil.example/?token={TOKEN}"),
        &[],
        "",
    )
    .await;
    assert_eq!(a.header("location"), Some("/evil.example/"));
    // The cookie lets the request through (to the unreachable server's page).
    let c = cookie(&s);
    let a = send(&s, "GET", "/", &[("Cookie", &format!("other=1; {c}"))], "").await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body.contains("id=\"unreachable\"") && a.body.contains("http-equiv=\"refresh\""));
    assert!(a.body.contains("no-such-kit"), "{}", a.body);
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let s = serve().await;
    for path in ["/", &format!("/?token={TOKEN}")] {
        let a = send(&s, "GET", path, &[], "").await;
        let csp = a.header("content-security-policy").unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(a.header("x-frame-options"), Some("DENY"));
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(a.header("cache-control"), Some("no-store"));
    }
}

#[tokio::test]
async fn a_foreign_host_header_is_refused_even_with_the_token() {
    let s = serve().await;
    let c = cookie(&s);
    let port = s.addr.port();
    for host in [
        format!("evil.example:{port}"),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        "127.0.0.1".to_string(),
    ] {
        let a = send(&s, "GET", "/", &[("Host", &host), ("Cookie", &c)], "").await;
        assert_eq!(a.status, 403, "{host}");
        let a = send(
            &s,
            "GET",
            &format!("/?token={TOKEN}"),
            &[("Host", &host)],
            "",
        )
        .await;
        assert_eq!(a.status, 403, "{host}");
    }
    let a = send(
        &s,
        "GET",
        "/",
        &[("Host", &format!("localhost:{port}")), ("Cookie", &c)],
        "",
    )
    .await;
    assert_eq!(a.status, 503);
}

#[tokio::test]
async fn state_changes_need_post_a_csrf_token_and_our_origin() {
    let s = serve().await;
    let c = cookie(&s);
    let csrf = format!("csrf={}", s.app.guard.csrf());
    let ours = format!("http://{}", s.addr);
    let post = |path: &'static str, extra: Vec<(&'static str, String)>, body: String| {
        let c = c.clone();
        let s = &s;
        async move {
            let mut h: Vec<(&str, &str)> = vec![("Cookie", &c), ("Content-Type", FORM)];
            for (k, v) in &extra {
                h.push((k, v));
            }
            send(s, "POST", path, &h, &body).await
        }
    };
    for path in ["/jobs/abc/abort", "/jobs/abc/download"] {
        // No CSRF field, a wrong one, the session token instead of it: 403.
        for body in [
            String::new(),
            "csrf=".into(),
            "csrf=00".into(),
            format!("csrf={TOKEN}"),
        ] {
            assert_eq!(
                post(path, vec![], body.clone()).await.status,
                403,
                "{path} {body}"
            );
        }
        // The right CSRF field from another origin: 403.
        let a = post(
            path,
            vec![("Origin", "http://evil.example".into())],
            csrf.clone(),
        )
        .await;
        assert_eq!(a.status, 403);
        let a = post(
            path,
            vec![("Referer", "http://evil.example/x".into())],
            csrf.clone(),
        )
        .await;
        assert_eq!(a.status, 403);
        // From the dashboard's own page: let through.
        let a = post(path, vec![("Origin", ours.clone())], csrf.clone()).await;
        assert!(
            a.status == 503 || a.status == 303,
            "{path}: {} {}",
            a.status,
            a.body
        );
        // GET does not change anything.
        let a = send(&s, "GET", path, &[("Cookie", &c)], "").await;
        assert_eq!(a.status, 405, "{path}");
    }
    // The token in the query also authenticates a POST (no cookie), CSRF still required.
    let q = format!("/jobs/abc/abort?token={TOKEN}");
    let a = send(&s, "POST", &q, &[("Content-Type", FORM)], "").await;
    assert_eq!(a.status, 403);
    // Bodies are capped.
    let big = format!("{csrf}&pad={}", "x".repeat(MAX_BODY));
    assert_eq!(post("/jobs/abc/abort", vec![], big).await.status, 413);
    // A download that fails is reported on the job page, not as an error status.
    s.app.take_flashes("abc");
    let a = post("/jobs/abc/download", vec![], csrf.clone()).await;
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), Some("/jobs/abc"));
    let flashes = s.app.take_flashes("abc");
    assert_eq!(flashes.len(), 1);
    assert!(flashes[0].contains("download failed"), "{flashes:?}");
}

#[tokio::test]
async fn bad_job_ids_and_paths_are_404_not_500() {
    let s = serve().await;
    let c = cookie(&s);
    for path in [
        "/jobs/a%20b",
        "/jobs/..%2F..%2Fetc",
        "/jobs/%FF",
        &format!("/jobs/{}", "a".repeat(65)),
        "/jobs/abc/files/..%2F..%2Fsecret",
        "/jobs/abc/files/nope.json",
        "/jobs/abc/files/a/../../x",
        "/favicon.ico",
    ] {
        let a = send(&s, "GET", path, &[("Cookie", &c)], "").await;
        assert_eq!(a.status, 404, "{path}: {}", a.body);
    }
}

#[tokio::test]
async fn downloaded_files_are_served_as_attachments_and_only_from_the_job_folder() {
    let s = serve().await;
    let c = cookie(&s);
    let job = s.app.transfer.join("abc");
    std::fs::create_dir_all(job.join("sub")).unwrap();
    std::fs::write(job.join("sub/page.html"), "<script>alert(1)</script>").unwrap();
    let secret = s.app.transfer.join("secret.txt");
    std::fs::write(&secret, "secret").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&secret, job.join("link.txt")).unwrap();
    let a = send(
        &s,
        "GET",
        "/jobs/abc/files/sub/page.html",
        &[("Cookie", &c)],
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "<script>alert(1)</script>");
    assert_eq!(a.header("content-type"), Some("application/octet-stream"));
    assert_eq!(
        a.header("content-disposition"),
        Some("attachment; filename=\"page.html\"")
    );
    #[cfg(unix)]
    {
        let a = send(&s, "GET", "/jobs/abc/files/link.txt", &[("Cookie", &c)], "").await;
        assert_eq!(a.status, 404);
    }
    let a = send(&s, "GET", "/jobs/abc/files/sub", &[("Cookie", &c)], "").await;
    assert_eq!(a.status, 404);
}
