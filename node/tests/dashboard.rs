//! The web dashboard in a real browser: a POC federation of real processes runs a short swarm
//! job, `flare-node dashboard` runs beside it with the admin kit, and headless Chromium
//! (Debian's `chromium`) loads its pages through the printed URL. The DOM is checked through
//! the pages' stable hooks, screenshots go to `target/dashboard-screenshots/` (the job page
//! also to `docs/dashboard.png` with `FLARE_UPDATE_SCREENSHOTS=1`), and the security rules are checked with raw HTTP requests.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Federation, bin, ended, example_copy, root, swarm_copy};

const CHROMIUM: &str = "/usr/bin/chromium";
const ROUNDS: usize = 3;

/// The dashboard process, killed when the test ends however it ends.
struct Dashboard {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    base: String,
    token: String,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dashboard {
    /// Starts `flare-node dashboard` on a free port and reads the URL it prints.
    fn start(kit: &Path) -> Dashboard {
        let mut child = Command::new(bin())
            .arg("dashboard")
            .arg("--kit")
            .arg(kit)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let url = line
            .trim()
            .strip_prefix("dashboard: ")
            .unwrap_or_else(|| panic!("no URL line from the dashboard: {line:?}"))
            .to_string();
        let (base, token) = url.split_once("/?token=").unwrap();
        assert!(base.starts_with("http://127.0.0.1:"), "{url}");
        assert_eq!(token.len(), 64, "{url}");
        Dashboard {
            child,
            base: base.to_string(),
            token: token.to_string(),
        }
    }

    /// `base + path`, with the token.
    fn url(&self, path: &str) -> String {
        format!("{}{path}?token={}", self.base, self.token)
    }

    fn host(&self) -> &str {
        self.base.trim_start_matches("http://")
    }
}

/// Runs headless Chromium with `args`, killed after 60 s; its stdout.
fn chromium(args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// The DOM of `url` after Chromium loaded it (following the token's redirect with its cookie).
fn dump_dom(url: &str) -> String {
    chromium(&["--dump-dom", url])
}

fn screenshot(url: &str, file: &Path) {
    chromium(&[
        &format!("--screenshot={}", file.display()),
        "--window-size=1280,2000",
        url,
    ]);
    let png = std::fs::read(file).unwrap_or_default();
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "no screenshot at {}",
        file.display()
    );
}

/// One raw HTTP/1.1 request: status and body.
fn http(host: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn post(d: &Dashboard, path: &str, body: &str) -> (u16, String) {
    http(
        d.host(),
        &format!(
            "POST {path}?token={} HTTP/1.1\r\nHost: {}\r\nOrigin: {}\r\nContent-Type: \
             application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            d.token,
            d.host(),
            d.base,
            body.len()
        ),
    )
}

/// The values of attribute `attr` on the elements whose opening tag starts with `open`.
fn attrs<'a>(dom: &'a str, open: &str, attr: &str) -> Vec<&'a str> {
    dom.match_indices(open)
        .filter_map(|(i, _)| {
            let tag = &dom[i..i + dom[i..].find('>')?];
            let at = tag.find(&format!(" {attr}=\""))? + attr.len() + 3;
            Some(&tag[at..at + tag[at..].find('"')?])
        })
        .collect()
}

/// The text of every `<td class="aggregator">`.
fn aggregator_cells(dom: &str) -> Vec<&str> {
    dom.match_indices("<td class=\"aggregator\">")
        .filter_map(|(i, m)| {
            let rest = &dom[i + m.len()..];
            Some(&rest[..rest.find("</td>")?])
        })
        .collect()
}

fn screenshot_dir() -> PathBuf {
    let dir = root().join("target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn dashboard_in_a_real_browser() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the dashboard's browser test needs Debian's Chromium \
         (apt-get install chromium, or run scripts/install-chromium.sh as root)"
    );
    let started = Instant::now();
    let fed = Federation::running(3, 27_000);
    let admin_kit = fed.prod.join("admin@nvidia.com/startup");
    let d = Dashboard::start(&admin_kit);

    // No token, a wrong token: 401, with a page saying what to open.
    let get = |path: &str| {
        http(
            d.host(),
            &format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                d.host()
            ),
        )
    };
    let (status, body) = get("/");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("printed"), "{body}");
    assert_eq!(get("/?token=0000").0, 401);

    let jobs = tempfile::tempdir().unwrap();
    let job_dir = swarm_copy(jobs.path(), ROUNDS as u32, 1);
    let job = fed.submit(job_dir.to_str().unwrap());
    let wait = |j: &str| {
        let st = fed.wait_status(j, "the job did not end", Duration::from_secs(120), ended);
        assert_eq!(st["state"], "finished", "{st}");
    };
    wait(&job);
    // Then a swarm with a cross-site evaluation after it, for the heat map (a site runs one
    // job at a time).
    let cse_dir = example_copy(jobs.path(), "swarm-cse-mnist", 5, 2, 1);
    let cse = fed.submit(cse_dir.to_str().unwrap());
    wait(&cse);

    // The overview: the three sites, how they are connected, and the job's row. Chromium
    // opens the URL with the token, gets the cookie and follows the redirect.
    let dom = dump_dom(&d.url("/"));
    let names = attrs(&dom, "<tr class=\"site\"", "data-name");
    assert_eq!(names, ["site-1", "site-2", "site-3"], "{dom}");
    for c in attrs(&dom, "<tr class=\"site\"", "data-connection") {
        assert!(c == "direct" || c == "relayed", "{c}");
    }
    // Newest first.
    let ids = attrs(&dom, "<tr class=\"job\"", "data-id");
    assert_eq!(ids, [cse.as_str(), job.as_str()], "{dom}");
    assert_eq!(
        attrs(&dom, "<tr class=\"job\"", "data-state"),
        ["finished", "finished"]
    );
    assert!(dom.contains(&format!("<a href=\"/jobs/{job}\">")));

    // The job page: a row per version, the aggregators, the plots, no more reloading.
    let job_path = format!("/jobs/{job}");
    let dom = dump_dom(&d.url(&job_path));
    assert!(dom.contains("<td id=\"state\">finished</td>"), "{dom}");
    assert!(
        !dom.contains("http-equiv=\"refresh\""),
        "a finished job's page reloads"
    );
    let versions = attrs(&dom, "<tr class=\"round\"", "data-version");
    let want: Vec<String> = (0..=ROUNDS).map(|v| v.to_string()).collect();
    assert_eq!(versions, want, "one tr.round per version");
    let aggregators = aggregator_cells(&dom);
    assert_eq!(aggregators.len(), ROUNDS + 1);
    for a in &aggregators[1..] {
        assert!(
            ["site-1", "site-2", "site-3"].contains(a),
            "aggregator {a:?} is not a site"
        );
    }
    let tags = attrs(&dom, "<svg class=\"plot\"", "data-tag");
    let series = attrs(&dom, "<svg class=\"plot\"", "data-series");
    assert!(
        tags.contains(&"accuracy"),
        "no global accuracy plot: {tags:?}"
    );
    assert!(
        tags.contains(&"train_loss"),
        "no training loss plot: {tags:?}"
    );
    assert_eq!(tags.len(), series.len());
    for (t, n) in tags.iter().zip(&series) {
        assert!(n.parse::<usize>().unwrap() >= 1, "plot {t} has no series");
    }
    let points = attrs(&dom, "<polyline class=\"series\"", "data-points");
    let total: usize = series.iter().map(|n| n.parse::<usize>().unwrap()).sum();
    assert_eq!(points.len(), total, "data-series counts the polylines");
    for p in &points {
        assert!(p.parse::<usize>().unwrap() > 1, "a series of {p} point(s)");
    }
    let runs = attrs(&dom, "<polyline class=\"series\"", "data-run");
    assert!(
        runs.contains(&"global_model") && runs.contains(&"site-3"),
        "{runs:?}"
    );

    assert!(
        !dom.contains("class=\"heatmap\""),
        "a heat map without an evaluation"
    );

    // The cross-site evaluation: evaluators × (each site's model and the global one).
    let cse_dom = dump_dom(&d.url(&format!("/jobs/{cse}")));
    assert_eq!(
        attrs(&cse_dom, "<svg class=\"heatmap\"", "data-rows"),
        ["3"],
        "{cse_dom}"
    );
    assert_eq!(
        attrs(&cse_dom, "<svg class=\"heatmap\"", "data-cols"),
        ["4"]
    );
    assert_eq!(cse_dom.matches("<rect class=\"cell\"").count(), 12);
    assert_eq!(cse_dom.matches("<tr class=\"round\"").count(), 3);

    // Abort without the CSRF field: 403. Download with it: the files are listed, and served.
    let (status, body) = post(&d, &format!("{job_path}/abort"), "");
    assert_eq!(status, 403, "{body}");
    let csrf = attrs(&dom, "<input type=\"hidden\" name=\"csrf\"", "value")[0].to_string();
    let (status, body) = post(&d, &format!("{job_path}/download"), &format!("csrf={csrf}"));
    assert_eq!(status, 303, "{body}");
    let dom = dump_dom(&d.url(&job_path));
    assert!(dom.contains("<p class=\"flash\">downloaded "), "{dom}");
    let files = dom.matches(&format!("href=\"{job_path}/files/")).count();
    assert!(files >= 2, "{dom}");
    assert!(dom.contains(&format!("href=\"{job_path}/files/metrics.json\"")));
    // A plain client trades the token for the cookie, as the browser does.
    let (status, head) = get(&format!("/?token={}", d.token));
    assert_eq!(status, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap();
    let (status, body) = http(
        d.host(),
        &format!(
            "GET {job_path}/files/metrics.json HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\n\
             Connection: close\r\n\r\n",
            d.host()
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("content-disposition: attachment"), "{body}");

    // Screenshots: the overview, and the job page for the README.
    let shots = screenshot_dir();
    screenshot(&d.url("/"), &shots.join("overview.png"));
    screenshot(
        &d.url(&format!("/jobs/{cse}")),
        &shots.join("cross-site.png"),
    );
    let job_png = shots.join("job.png");
    screenshot(&d.url(&job_path), &job_png);
    // The README's picture is refreshed on request only (each run's bytes differ).
    if std::env::var("FLARE_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        let docs = root().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::copy(&job_png, docs.join("dashboard.png")).unwrap();
    }

    // The server goes away: the dashboard says so (and reloads), it does not fail.
    drop(fed);
    let (status, body) = get(&format!("/?token={}", d.token));
    assert_eq!(status, 303, "{body}");
    let dom = dump_dom(&d.url("/"));
    assert!(dom.contains("id=\"unreachable\""), "{dom}");
    assert!(dom.contains("http-equiv=\"refresh\""));
    eprintln!("dashboard test: {:.1} s", started.elapsed().as_secs_f64());
}
