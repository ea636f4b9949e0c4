//! The job page's pictures, as inline SVG: a line plot per metric tag (plotters draws the
//! frame, axes and tick labels; the series are drawn here, so each carries its own DOM hooks)
//! and a heat map of the cross-site evaluation matrix (plain rectangles with the values).
//!
//! Hooks for tests and scripts: `<svg class="plot" data-tag=… data-series=N>` where `N` is the
//! number of series drawn, each a `<polyline class="series" data-run=… data-points=K>`;
//! `<svg class="heatmap" data-rows=R data-cols=C>` with one `<rect class="cell">` a value.

use std::fmt::Write as _;

use plotters::prelude::*;

use super::data::{CrossSite, TagPlot};
use super::pages::esc;

/// Width of a line plot (pixels).
const WIDTH: u32 = 560;
/// Height of a line plot.
const HEIGHT: u32 = 280;
/// The line colours, in series order; the global model is drawn in black.
const COLOURS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f",
];

/// The colour of series `i` of run `run`.
pub fn colour(i: usize, run: &str) -> &'static str {
    if run == "global_model" {
        "#000000"
    } else {
        COLOURS[i % COLOURS.len()]
    }
}

/// A plot of one tag, with a legend under it; a plot that cannot be drawn says so instead.
pub fn line_plot(p: &TagPlot) -> String {
    let svg = match draw(p) {
        Ok(svg) => svg,
        Err(e) => {
            return format!(
                "<p class=\"error\">cannot plot {}: {}</p>",
                esc(&p.tag),
                esc(&e.to_string())
            );
        }
    };
    let mut legend = String::from("<ul class=\"legend\">");
    for (i, s) in p.series.iter().enumerate() {
        let _ = write!(
            legend,
            "<li><span class=\"swatch\" style=\"background:{}\"></span>{}</li>",
            colour(i, &s.run),
            esc(&s.run)
        );
    }
    legend.push_str("</ul>");
    format!(
        "<figure class=\"chart\"><figcaption>{}</figcaption>{svg}{legend}</figure>",
        esc(&p.tag)
    )
}

/// The bounds of every point, padded so lines do not run on the frame.
fn bounds(p: &TagPlot) -> Option<((f64, f64), (f64, f64))> {
    let pts = || p.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), q| {
        (a.min(q.0), b.max(q.0))
    });
    let (y0, y1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), q| {
        (a.min(q.1), b.max(q.1))
    });
    if !(x0.is_finite() && x1.is_finite() && y0.is_finite() && y1.is_finite()) {
        return None;
    }
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x1 + 1.0)
    };
    let pad = if y1 > y0 {
        (y1 - y0) * 0.06
    } else {
        y0.abs() * 0.05 + 0.01
    };
    Some(((x0, x1), (y0 - pad, y1 + pad)))
}

/// Tick text with as many decimals as the axis span needs.
fn tick(v: f64, span: f64) -> String {
    let decimals = if span >= 100.0 {
        0
    } else if span >= 1.0 {
        2
    } else if span >= 0.01 {
        3
    } else {
        5
    };
    format!("{v:.decimals$}")
}

fn draw(p: &TagPlot) -> anyhow::Result<String> {
    let ((x0, x1), (y0, y1)) = bounds(p).ok_or_else(|| anyhow::anyhow!("no finite points"))?;
    let mut buf = String::new();
    let mut lines = Vec::new();
    {
        let root = SVGBackend::with_string(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(58)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let (xs, ys) = (x1 - x0, y1 - y0);
        // Whole steps (rounds, epochs) get whole-number ticks, one a step on short runs.
        let whole = p
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .all(|q| q.0.fract() == 0.0);
        let x_labels = if whole {
            (xs as usize + 1).clamp(2, 10)
        } else {
            8
        };
        let x_tick = |x: &f64| {
            if whole {
                format!("{x:.0}")
            } else {
                tick(*x, xs)
            }
        };
        // The global model's series are per version; the sites' per their own steps.
        let global = p.series.iter().all(|s| s.run == "global_model");
        chart
            .configure_mesh()
            .x_desc(if global { "version" } else { "step" })
            .x_labels(x_labels)
            .y_labels(6)
            .x_label_formatter(&x_tick)
            .y_label_formatter(&|y| tick(*y, ys))
            // plotters' SVG text is 1/1.24 of the size asked: these come out at about 12 px.
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (i, s) in p.series.iter().enumerate() {
            let mut coords = String::new();
            for q in &s.points {
                let (px, py) = chart.backend_coord(q);
                let _ = write!(coords, "{px},{py} ");
            }
            let width = if s.run == "global_model" { 2.5 } else { 1.8 };
            lines.push(format!(
                "<polyline class=\"series\" data-run=\"{}\" data-points=\"{}\" points=\"{}\" \
                 fill=\"none\" stroke=\"{}\" stroke-width=\"{width}\"/>",
                esc(&s.run),
                s.points.len(),
                coords.trim_end(),
                colour(i, &s.run)
            ));
        }
        root.present()?;
    }
    let opening = format!(
        "<svg class=\"plot\" data-tag=\"{}\" data-series=\"{}\" role=\"img\" aria-label=\"{}\" ",
        esc(&p.tag),
        lines.len(),
        esc(&p.tag)
    );
    let Some(at) = buf.find("<svg ") else {
        anyhow::bail!("plotters wrote no <svg>");
    };
    buf.replace_range(at..at + "<svg ".len(), &opening);
    let Some(end) = buf.rfind("</svg>") else {
        anyhow::bail!("plotters wrote no </svg>");
    };
    buf.insert_str(end, &lines.concat());
    Ok(buf[at..].to_string())
}

/// The cross-site matrix as a heat map: a row per evaluator, a column per model, each cell
/// shaded by its value (lightest: the lowest in the matrix) and labelled with it.
pub fn heat_map(cs: &CrossSite) -> String {
    const CELL_W: usize = 96;
    const CELL_H: usize = 34;
    const LEFT: usize = 120;
    const TOP: usize = 30;
    let all: Vec<f64> = cs.values.iter().flatten().flatten().copied().collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (w, h) = (
        LEFT + CELL_W * cs.models.len() + 4,
        TOP + CELL_H * cs.evaluators.len() + 4,
    );
    let mut s = format!(
        "<svg class=\"heatmap\" data-metric=\"{}\" data-rows=\"{}\" data-cols=\"{}\" \
         width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\" \
         font-family=\"sans-serif\" font-size=\"12\">",
        esc(&cs.metric),
        cs.evaluators.len(),
        cs.models.len()
    );
    for (c, m) in cs.models.iter().enumerate() {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>",
            LEFT + c * CELL_W + CELL_W / 2,
            TOP - 10,
            esc(m)
        );
    }
    for (r, e) in cs.evaluators.iter().enumerate() {
        let y = TOP + r * CELL_H;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-weight=\"bold\">{}</text>",
            LEFT - 8,
            y + CELL_H / 2 + 4,
            esc(e)
        );
        for (c, v) in cs.values.get(r).into_iter().flatten().enumerate() {
            let x = LEFT + c * CELL_W;
            let (fill, label, ink) = match v {
                Some(v) => {
                    let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
                    let (fill, ink) = shade(t);
                    (fill, format!("{v:.4}"), ink)
                }
                None => ("#eeeeee".to_string(), "–".to_string(), "#555555"),
            };
            let _ = write!(
                s,
                "<rect class=\"cell\" x=\"{x}\" y=\"{y}\" width=\"{CELL_W}\" height=\"{CELL_H}\" \
                 fill=\"{fill}\" stroke=\"#ffffff\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" \
                 fill=\"{ink}\">{label}</text>",
                x + CELL_W / 2,
                y + CELL_H / 2 + 4
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// A blue of strength `t` ∈ [0, 1] and the text colour that reads on it.
fn shade(t: f64) -> (String, &'static str) {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let mix = |light: f64, dark: f64| (light + (dark - light) * t).round() as u8;
    let (r, g, b) = (mix(222.0, 8.0), mix(235.0, 69.0), mix(247.0, 148.0));
    let ink = if t > 0.55 { "#ffffff" } else { "#111111" };
    (format!("#{r:02x}{g:02x}{b:02x}"), ink)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::data::Series;
    use super::*;

    fn plot(series: &[(&str, &[(f64, f64)])]) -> TagPlot {
        TagPlot {
            tag: "train_loss<&>".into(),
            series: series
                .iter()
                .map(|(r, p)| Series {
                    run: r.to_string(),
                    points: p.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_line_plot_has_one_polyline_per_series_and_escapes_names() {
        let p = plot(&[
            ("site-1", &[(0.0, 1.0), (1.0, 0.5), (2.0, 0.25)]),
            ("<b>site-2</b>", &[(0.0, 2.0), (1.0, 0.7)]),
            ("global_model", &[(1.0, 0.9)]),
        ]);
        let html = line_plot(&p);
        assert!(
            html.contains("class=\"plot\" data-tag=\"train_loss&lt;&amp;&gt;\" data-series=\"3\""),
            "{html}"
        );
        assert_eq!(html.matches("<polyline class=\"series\"").count(), 3);
        assert!(html.contains("data-run=\"site-1\" data-points=\"3\""));
        assert!(html.contains("data-points=\"2\""));
        assert!(!html.contains("<b>"));
        assert_eq!(html.matches("<svg").count(), 1);
        assert!(html.contains("stroke=\"#000000\""));
        assert!(html.trim_end().ends_with("</figure>"));
    }

    #[test]
    fn flat_and_single_point_series_still_plot() {
        for pts in [
            &[(3.0, 0.5)][..],
            &[(0.0, 1.0), (5.0, 1.0)],
            &[(0.0, -1e9), (1.0, 1e9)],
        ] {
            let html = line_plot(&plot(&[("site-1", pts)]));
            assert!(html.contains("data-series=\"1\""), "{html}");
        }
        let html = line_plot(&plot(&[]));
        assert!(html.contains("cannot plot"));
    }

    #[test]
    fn the_heat_map_has_a_cell_per_value_and_escapes_names() {
        let cs = CrossSite {
            metric: "accuracy".into(),
            evaluators: vec!["site-1".into(), "<i>".into()],
            models: vec!["global".into(), "site-1".into(), "site-2".into()],
            values: vec![
                vec![Some(0.9), Some(0.8), None],
                vec![Some(0.7), Some(0.7), Some(0.75)],
            ],
        };
        let svg = heat_map(&cs);
        assert!(svg.contains("data-rows=\"2\" data-cols=\"3\""));
        assert_eq!(svg.matches("<rect class=\"cell\"").count(), 6);
        assert!(svg.contains(">0.9000<") && svg.contains(">–<"));
        assert!(svg.contains("&lt;i&gt;") && !svg.contains("<i>"));
    }

    #[test]
    fn shades_run_light_to_dark() {
        assert_eq!(shade(0.0).0, "#deebf7");
        assert_eq!(shade(1.0).0, "#084594");
        assert_eq!(shade(f64::NAN), shade(0.5));
    }
}
