//! One SVG per feature: a panel per dataset, the global histogram as grey bars and each
//! site's as a coloured step line, all as the fraction of their values per bucket, so sites
//! of different sizes compare by shape. Drawn with plotters' SVG backend (text is left to
//! the viewer's fonts).

use std::collections::BTreeMap;

use flare_protocols::stats::{Bucket, GLOBAL};
use plotters::prelude::*;

/// Width of the picture (pixels).
const WIDTH: u32 = 760;
/// Height of one dataset's panel.
const PANEL: u32 = 320;
/// Site colours, in site order.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// Dataset → site (or `Global`) → buckets.
pub type FeatureHistograms = BTreeMap<String, BTreeMap<String, Vec<Bucket>>>;

fn fractions(h: &[Bucket]) -> Vec<f64> {
    let total: u64 = h.iter().map(|b| b.count).sum();
    h.iter()
        .map(|b| {
            if total == 0 {
                0.0
            } else {
                b.count as f64 / total as f64
            }
        })
        .collect()
}

/// The SVG of `feature`'s histograms.
pub fn histogram_svg(feature: &str, hists: &FeatureHistograms) -> Result<String, String> {
    let mut buf = String::new();
    {
        let height = PANEL * hists.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut buf, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let panels = root.split_evenly((hists.len().max(1), 1));
        for (area, (dataset, by_site)) in panels.iter().zip(hists) {
            draw_panel(area, feature, dataset, by_site)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    feature: &str,
    dataset: &str,
    by_site: &BTreeMap<String, Vec<Bucket>>,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let all = by_site.values().flatten();
    let x0 = all.clone().map(|b| b.low).fold(f64::INFINITY, f64::min);
    let x1 = all.map(|b| b.high).fold(f64::NEG_INFINITY, f64::max);
    if !(x0.is_finite() && x1.is_finite() && x1 > x0) {
        return Err(format!("{feature}/{dataset}: no usable bucket edges"));
    }
    let y1 = by_site
        .values()
        .flat_map(|h| fractions(h))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.08;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{feature} ({dataset})"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(62)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(feature)
        .y_desc("fraction of values")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(&e))?;
    let grey = RGBColor(160, 160, 160);
    if let Some(g) = by_site.get(GLOBAL) {
        let bars = g
            .iter()
            .zip(fractions(g))
            .map(|(b, f)| Rectangle::new([(b.low, 0.0), (b.high, f)], grey.mix(0.55).filled()));
        chart
            .draw_series(bars)
            .map_err(|e| err(&e))?
            .label(GLOBAL)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], grey.filled()));
    }
    for (k, (site, h)) in by_site.iter().filter(|(s, _)| *s != GLOBAL).enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let mut steps = Vec::with_capacity(2 * h.len());
        for (b, f) in h.iter().zip(fractions(h)) {
            steps.push((b.low, f));
            steps.push((b.high, f));
        }
        chart
            .draw_series(LineSeries::new(steps, colour.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(site.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(grey)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(counts: &[u64]) -> Vec<Bucket> {
        counts
            .iter()
            .enumerate()
            .map(|(i, &count)| Bucket {
                low: i as f64,
                high: i as f64 + 1.0,
                count,
            })
            .collect()
    }

    #[test]
    fn draws_a_panel_per_dataset_with_a_line_per_site() {
        let hists = FeatureHistograms::from([
            (
                "train".to_string(),
                BTreeMap::from([
                    (GLOBAL.to_string(), h(&[3, 5, 2])),
                    ("site-1".to_string(), h(&[1, 4, 0])),
                    ("site-2".to_string(), h(&[2, 1, 2])),
                ]),
            ),
            (
                "test".to_string(),
                BTreeMap::from([(GLOBAL.to_string(), h(&[1, 1, 1]))]),
            ),
        ]);
        let svg = histogram_svg("Age", &hists).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        // A step line per site in its colour; no third site's colour.
        for (colour, n) in [("#1F77B4", true), ("#FF7F0E", true), ("#2CA02C", false)] {
            assert_eq!(svg.contains(&format!("stroke=\"{colour}\"")), n, "{colour}");
        }
        for text in ["Age (train)", "Age (test)", "site-1", "site-2", GLOBAL] {
            assert!(svg.contains(text), "{text} missing");
        }
        let empty = FeatureHistograms::from([("train".to_string(), BTreeMap::new())]);
        assert!(histogram_svg("x", &empty).is_err());
    }
}
