//! The dashboard's HTML, rendered on the server: no script, no external asset, a few lines of
//! inline CSS. Every string that came from the server or a job goes through [`esc`]; job ids
//! become links only once [`super::valid_job_id`] accepted them.
//!
//! Hooks for tests and scripts: `table#sites` (`tr.site`), `table#jobs` (`tr.job`),
//! `table#rounds` (one `tr.round` per global model version, `td.aggregator` for swarm jobs),
//! `table#history`, `ul#files`, `p.flash`, and the plots' own (see [`super::plots`]).

use std::fmt::Write as _;

use super::data::{self, JobRow, JobView, ServerView, TagPlot};
use super::plots;
use super::valid_job_id;

/// HTML-escapes `s` for text and double-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one URL path segment (everything but unreserved characters).
pub fn url_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.2em 2em;color:#111}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.4em}\
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}\
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}\
.flash{background:#fff6d6;border:1px solid #e0c060;padding:6px 10px}\
.error{background:#fde8e8;border:1px solid #d08080;padding:6px 10px}\
.charts{display:flex;flex-wrap:wrap;gap:12px}figure.chart{margin:0;border:1px solid #ddd;padding:6px}\
figcaption{font-weight:bold}.legend{list-style:none;padding:0;margin:4px 0;display:flex;flex-wrap:wrap;gap:10px}\
.swatch{display:inline-block;width:14px;height:4px;margin-right:4px;vertical-align:middle}\
form{display:inline-block;margin-right:8px}nav a{margin-right:1em}";

/// A whole page.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The `<title>` and first heading.
    pub title: String,
    /// The body below the heading (already HTML).
    pub body: String,
    /// Seconds until the browser reloads the page, if it should.
    pub refresh: Option<u32>,
}

impl Page {
    /// The page as an HTML document.
    pub fn render(&self) -> String {
        let refresh = self
            .refresh
            .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
            .unwrap_or_default();
        format!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
             <title>{t} · Flare</title><style>{CSS}</style></head><body>\
             <nav><a href=\"/\">Flare dashboard</a></nav><h1>{t}</h1>{}</body></html>",
            self.body,
            t = esc(&self.title)
        )
    }
}

/// A page with one message (401, 403, 404 and the like).
pub fn message(title: &str, text: &str) -> Page {
    Page {
        title: title.into(),
        body: format!("<p class=\"error\">{}</p>", esc(text)),
        refresh: None,
    }
}

/// The page for a server that cannot be reached; it reloads itself until it can.
pub fn unreachable(why: &str) -> Page {
    Page {
        title: "Server unreachable".into(),
        body: format!(
            "<p class=\"error\" id=\"unreachable\">The dashboard cannot reach the Flare server: \
             {}</p><p>This page tries again every 5 seconds.</p>",
            esc(why)
        ),
        refresh: Some(5),
    }
}

fn refusal(what: &str, why: &str) -> String {
    format!(
        "<p class=\"error refused\">The server refused {}: {}</p>",
        esc(what),
        esc(why)
    )
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "–".into())
}

/// `3/5`, `3`, or `–`.
fn progress(round: Option<u64>, num_rounds: Option<u64>) -> String {
    match (round, num_rounds) {
        (Some(r), Some(n)) => format!("{r}/{n}"),
        (Some(r), None) => r.to_string(),
        (None, Some(n)) => format!("–/{n}"),
        (None, None) => "–".into(),
    }
}

/// A job id as a link to its page, or as plain text if it is not a valid id.
fn job_link(id: &str) -> String {
    if valid_job_id(id) {
        format!("<a href=\"/jobs/{id}\">{id}</a>")
    } else {
        esc(id)
    }
}

/// `/`: the server, its sites and the jobs. Either part may be a refusal.
pub fn overview(server: Result<ServerView, String>, jobs: Result<Vec<JobRow>, String>) -> Page {
    let mut b = String::new();
    b.push_str("<h2>Server</h2>");
    match &server {
        Ok(s) => {
            let _ = write!(
                b,
                "<table id=\"server\"><tr><th>name</th><td>{}</td></tr>\
                 <tr><th>peer id</th><td>{}</td></tr><tr><th>up</th><td>{} s</td></tr>\
                 <tr><th>jobs</th><td>{} ({} running)</td></tr></table>",
                esc(&s.name),
                esc(&s.peer_id),
                opt(s.uptime_s),
                opt(s.jobs),
                opt(s.running)
            );
            let _ = write!(b, "<h2>Sites ({})</h2>", s.sites.len());
            b.push_str(
                "<table id=\"sites\"><tr><th>site</th><th>org</th><th>connection</th>\
                 <th>address</th><th>last heartbeat</th><th>jobs</th></tr>",
            );
            for site in &s.sites {
                let beat = site
                    .heartbeat_ms_ago
                    .map(|ms| format!("{:.1} s ago", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "none yet".into());
                let _ = write!(
                    b,
                    "<tr class=\"site\" data-name=\"{n}\" data-connection=\"{c}\"><td>{n}</td>\
                     <td>{}</td><td class=\"connection\">{c}</td><td>{}</td><td>{beat}</td>\
                     <td>{}</td></tr>",
                    esc(&site.org),
                    esc(&site.address),
                    esc(&site.jobs),
                    n = esc(&site.name),
                    c = esc(&site.connection),
                );
            }
            b.push_str("</table>");
            if !s.refused.is_empty() {
                b.push_str("<h2>Refused commands (latest)</h2><ul id=\"refused\">");
                for r in s.refused.iter().rev().take(20) {
                    let _ = write!(b, "<li>{}</li>", esc(r));
                }
                b.push_str("</ul>");
            }
        }
        Err(why) => b.push_str(&refusal("the server status", why)),
    }
    b.push_str("<h2>Jobs</h2>");
    match &jobs {
        Ok(rows) => {
            b.push_str(
                "<table id=\"jobs\"><tr><th>job</th><th>name</th><th>state</th>\
                 <th>round</th><th>submitter</th></tr>",
            );
            for j in rows {
                let _ = write!(
                    b,
                    "<tr class=\"job\" data-id=\"{}\" data-state=\"{s}\"><td>{}</td><td>{}</td>\
                     <td class=\"state\">{s}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    esc(&j.id),
                    job_link(&j.id),
                    esc(&j.name),
                    progress(j.round, j.num_rounds),
                    esc(&j.submitter),
                    s = esc(&j.state),
                );
            }
            b.push_str("</table>");
            if rows.is_empty() {
                b.push_str("<p>No jobs yet.</p>");
            }
        }
        Err(why) => b.push_str(&refusal("the job list", why)),
    }
    // The overview follows running jobs and (re)connecting sites.
    Page {
        title: "Federation".into(),
        body: b,
        refresh: Some(5),
    }
}

/// What the job page shows besides the record.
#[derive(Debug, Clone)]
pub struct JobExtras {
    /// The plots, or why there are none (the server refused `Metrics`).
    pub plots: Result<Vec<TagPlot>, String>,
    /// Result files downloaded into the admin's transfer folder (names relative to it).
    pub files: Vec<String>,
    /// The CSRF token for the forms.
    pub csrf: String,
    /// Messages from the last abort or download.
    pub flashes: Vec<String>,
}

/// `/jobs/<id>` for a job the server refused to show (`why`), with its messages.
pub fn job_refused(id: &str, why: &str, flashes: &[String]) -> Page {
    let mut b = flash_html(flashes);
    b.push_str(&refusal(&format!("job {id}"), why));
    Page {
        title: format!("Job {id}"),
        body: b,
        refresh: None,
    }
}

fn flash_html(flashes: &[String]) -> String {
    flashes
        .iter()
        .map(|f| format!("<p class=\"flash\">{}</p>", esc(f)))
        .collect()
}

/// `/jobs/<id>`: the job's state, rounds, plots, cross-site matrix, files and history, and
/// the abort and download buttons. It reloads every 3 s until the job ended.
pub fn job(id: &str, j: &JobView, x: &JobExtras) -> Page {
    let over = data::ended(&j.state);
    let mut b = flash_html(&x.flashes);
    let _ = write!(
        b,
        "<table id=\"job\"><tr><th>id</th><td>{}</td></tr><tr><th>name</th><td>{}</td></tr>\
         <tr><th>state</th><td id=\"state\">{}</td></tr><tr><th>round</th><td>{}</td></tr>\
         <tr><th>submitter</th><td>{}</td></tr></table>",
        esc(&j.id),
        esc(&j.name),
        esc(&j.state),
        progress(j.round, j.num_rounds),
        esc(&j.submitter)
    );
    // `id` was checked by the route: it is safe in a URL and in HTML.
    let disabled = |off: bool| if off { " disabled" } else { "" };
    let _ = write!(
        b,
        "<div id=\"actions\"><form method=\"post\" action=\"/jobs/{id}/abort\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{c}\"><button{}>Abort</button></form>\
         <form method=\"post\" action=\"/jobs/{id}/download\"><input type=\"hidden\" name=\"csrf\" \
         value=\"{c}\"><button{}>Download results</button></form></div>",
        disabled(over),
        disabled(j.state != "finished"),
        c = esc(&x.csrf),
    );
    if !j.sites.is_empty() {
        b.push_str("<h2>Sites</h2><table id=\"job-sites\"><tr><th>site</th><th>state</th></tr>");
        for (s, st) in &j.sites {
            let _ = write!(b, "<tr><td>{}</td><td>{}</td></tr>", esc(s), esc(st));
        }
        b.push_str("</table>");
    }
    b.push_str(&rounds_table(j));
    if let Some(cs) = &j.cross_site {
        let _ = write!(
            b,
            "<h2>Cross-site evaluation ({}; rows: where it ran, columns: whose model)</h2>{}",
            esc(&cs.metric),
            plots::heat_map(cs)
        );
    }
    b.push_str("<h2>Plots</h2>");
    match &x.plots {
        Ok(ps) if ps.is_empty() => b.push_str("<p>No metrics yet.</p>"),
        Ok(ps) => {
            b.push_str("<div class=\"charts\">");
            for p in ps {
                b.push_str(&plots::line_plot(p));
            }
            b.push_str("</div>");
        }
        Err(why) => b.push_str(&refusal("the metrics", why)),
    }
    if !x.files.is_empty() {
        b.push_str("<h2>Downloaded results</h2><ul id=\"files\">");
        for f in &x.files {
            let href: Vec<String> = f.split('/').map(url_segment).collect();
            let _ = write!(
                b,
                "<li><a href=\"/jobs/{id}/files/{}\">{}</a></li>",
                href.join("/"),
                esc(f)
            );
        }
        b.push_str("</ul>");
    }
    b.push_str(&history_table(j));
    Page {
        title: format!("Job {} ({})", j.id, j.name),
        body: b,
        refresh: (!over).then_some(3),
    }
}

fn rounds_table(j: &JobView) -> String {
    let mut b =
        String::from("<h2>Global model per version</h2><table id=\"rounds\"><tr><th>version</th>");
    for m in &j.metric_names {
        let _ = write!(b, "<th>{}</th>", esc(m));
    }
    if j.swarm {
        b.push_str(
            "<th title=\"the site that aggregated round k, making version k\">aggregated by</th>",
        );
    }
    b.push_str("</tr>");
    for r in &j.rounds {
        let _ = write!(
            b,
            "<tr class=\"round\" data-version=\"{}\"><td class=\"num\">{}</td>",
            r.version, r.version
        );
        for m in &j.metric_names {
            let v = r
                .metrics
                .get(m)
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "–".into());
            let _ = write!(b, "<td class=\"num\">{v}</td>");
        }
        if j.swarm {
            let who = match (&r.aggregator, r.version) {
                (Some(a), _) => esc(a),
                (None, 0) => "(initial)".into(),
                (None, _) => "–".into(),
            };
            let _ = write!(b, "<td class=\"aggregator\">{who}</td>");
        }
        b.push_str("</tr>");
    }
    b.push_str("</table>");
    b
}

fn history_table(j: &JobView) -> String {
    let mut b = String::from(
        "<h2>History</h2><table id=\"history\"><tr><th>time (UTC)</th><th>state</th><th>note</th></tr>",
    );
    for h in &j.history {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            h.at_ms.map(utc).unwrap_or_default(),
            esc(&h.state),
            esc(&h.note)
        );
    }
    b.push_str("</table>");
    b
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm` (UTC), as the audit log writes them.
pub fn utc(ms: u64) -> String {
    crate::audit::utc(ms)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::super::data::{JobRow, ServerView};
    use super::*;

    const EVIL: &str = "<script>alert('x')</script>\"&";

    #[test]
    fn escaping_and_url_segments() {
        assert_eq!(
            esc(EVIL),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;"
        );
        assert_eq!(url_segment("a b/é?.x"), "a%20b%2F%C3%A9%3F.x");
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_709_210_096_789), "2024-02-29 12:34:56.789");
    }

    #[test]
    fn untrusted_strings_never_reach_the_page_raw() {
        let server = ServerView::parse(&json!({
            "server": EVIL, "peer_id": EVIL, "refused_commands": [EVIL],
            "sites": [{"name": EVIL, "org": EVIL, "connection": EVIL, "address": EVIL}],
        }));
        let jobs = JobRow::parse_list(&json!([
            {"id": EVIL, "name": EVIL, "state": EVIL, "submitter": EVIL},
            {"id": "good-1", "name": "ok", "state": "running", "round": 1, "num_rounds": 3},
        ]));
        let html = overview(Ok(server), Ok(jobs)).render();
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("href=\"/jobs/&lt;"));
        assert!(html.contains("<a href=\"/jobs/good-1\">good-1</a>"));
        assert!(html.contains("1/3"));
        let j = JobView::parse(&json!({
            "id": EVIL, "name": EVIL, "state": "finished", "submitter": EVIL,
            "sites": {EVIL: EVIL}, "metrics": {"0": {EVIL: 1.0}},
            "history": [{"at_ms": 5, "state": EVIL, "note": EVIL}],
            "cross_site": {EVIL: {EVIL: {EVIL: 0.5}}},
        }));
        let x = JobExtras {
            plots: Ok(data::plots(
                &json!({"runs": {EVIL: {EVIL: [[0, 1], [1, 2]]}}}),
                &j.rounds,
            )),
            files: vec![EVIL.into()],
            csrf: "c".into(),
            flashes: vec![EVIL.into()],
        };
        let html = job("good-1", &j, &x).render();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("/jobs/good-1/files/%3Cscript%3E"));
        let html = job_refused("good-1", EVIL, &[EVIL.into()]).render();
        assert!(!html.contains("<script>"));
        assert!(!unreachable(EVIL).render().contains("<script>"));
    }

    #[test]
    fn the_job_page_refreshes_only_while_the_job_runs() {
        let x = JobExtras {
            plots: Ok(Vec::new()),
            files: Vec::new(),
            csrf: String::new(),
            flashes: Vec::new(),
        };
        for (state, refresh) in [
            ("running", true),
            ("submitted", true),
            ("finished", false),
            ("aborted", false),
            ("failed", false),
        ] {
            let j = JobView::parse(&json!({"id": "a", "state": state}));
            let html = job("a", &j, &x).render();
            assert_eq!(html.contains("http-equiv=\"refresh\""), refresh, "{state}");
        }
    }

    #[test]
    fn rounds_table_has_a_row_per_version_and_the_aggregators() {
        let j = JobView::parse(&json!({
            "id": "a", "state": "finished",
            "metrics": {"0": {"accuracy": 0.1}, "1": {"accuracy": 0.9}, "2": {"accuracy": 0.95}},
            "history": [
                {"note": "epoch 0.0 aggregated by site-2: accepted []"},
                {"note": "epoch 1.0 aggregated by site-3: accepted []"},
            ],
        }));
        let html = rounds_table(&j);
        assert_eq!(html.matches("<tr class=\"round\"").count(), 3);
        assert!(html.contains("<td class=\"aggregator\">(initial)</td>"));
        assert!(html.contains("<td class=\"aggregator\">site-2</td>"));
        assert!(html.contains("<td class=\"aggregator\">site-3</td>"));
    }
}
