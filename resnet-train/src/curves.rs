//! Error curves as in the papers' Fig. 1 and 4: training error thin, test error bold, one colour per run.

use crate::metrics_log::Row;
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;

/// DejaVu Sans (Bitstream Vera licence, assets/DejaVuSans-LICENSE.txt), so text needs no system fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // A static, valid TrueType font: registration cannot fail for it.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One run on the figure.
pub struct Curve<'a> {
    pub label: &'a str,
    pub rows: &'a [Row],
}

/// Writes a PNG of error (%) against iterations for `curves`, atomically (temp file, rename).
pub fn draw(curves: &[Curve], title: &str, path: &Path) -> Result<()> {
    register_font();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (960, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_it = curves
            .iter()
            .flat_map(|c| c.rows.iter().map(|r| r.iteration))
            .max()
            .unwrap_or(1)
            .max(1);
        let max_err = curves
            .iter()
            .flat_map(|c| {
                c.rows
                    .iter()
                    .flat_map(|r| [r.train_error, r.test_top1_error])
            })
            .flatten()
            .fold(10.0f64, f64::max)
            .min(100.0);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0u64..max_it, 0f64..(max_err * 1.05))?;
        chart
            .configure_mesh()
            .x_desc("iterations")
            .y_desc("error (%)")
            .label_style(("sans-serif", 15))
            .draw()?;
        for (i, curve) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let train: Vec<(u64, f64)> = curve
                .rows
                .iter()
                .filter_map(|r| Some((r.iteration, r.train_error?)))
                .collect();
            let test: Vec<(u64, f64)> = curve
                .rows
                .iter()
                .filter_map(|r| Some((r.iteration, r.test_top1_error?)))
                .collect();
            chart.draw_series(LineSeries::new(train, color.stroke_width(1)))?;
            // Markers too: a run evaluated once still shows its test error.
            chart.draw_series(test.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            chart
                .draw_series(LineSeries::new(test, color.stroke_width(3)))?
                .label(curve.label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
        root.present().context("rendering the figure")?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
