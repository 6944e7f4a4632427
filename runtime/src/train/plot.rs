//! The loss-curve PNG: training loss per step (and its running mean) and eval loss, drawn with
//! plotters' bitmap backend and a bundled font (no system fonts needed).

use super::metrics::Record;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans (see `assets/fonts/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// Registers the bundled font as plotters' `sans-serif` once per process.
pub fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            tracing::warn!("could not register the bundled font; plots will have no text");
        }
    });
}

/// Draws `records` into a PNG at `path` (`title` on top). Errors are returned as text: a
/// plot is a convenience and never fails a run.
pub fn loss_curve(records: &[Record], title: &str, path: &Path) -> Result<(), String> {
    register_font();
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            Record::Train { step, loss, .. } if loss.is_finite() => Some((*step as f64, *loss)),
            _ => None,
        })
        .collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            Record::Eval { step, loss, .. } if loss.is_finite() => Some((*step as f64, *loss)),
            _ => None,
        })
        .collect();
    if train.is_empty() && eval.is_empty() {
        return Err("no finite losses to plot".into());
    }
    // Running mean over a window of ~5% of the steps, so the trend is readable.
    let window = (train.len() / 20).max(1);
    let smooth: Vec<(f64, f64)> = (0..train.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            let s: f64 = train[lo..=i].iter().map(|p| p.1).sum();
            (train[i].0, s / (i + 1 - lo) as f64)
        })
        .collect();
    let all = train.iter().chain(&eval);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (mut y_min, mut y_max) =
        all.fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((y_max - y_min) * 0.05).max(0.01);
    y_min -= pad;
    y_max += pad;

    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, y_min..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("loss (nats per target token)")
        .draw()
        .map_err(e)?;
    if !train.is_empty() {
        let light = RGBColor(160, 190, 230);
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &light))
            .map_err(e)?
            .label("train loss (per step)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], light));
        chart
            .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
            .map_err(e)?
            .label(format!("train loss (mean of {window})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    }
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))
            .map_err(e)?
            .label("eval loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_and_refuses_nothing_to_plot() {
        let dir = std::env::temp_dir().join(format!("lexp-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.png");
        let mut records: Vec<Record> = (1..=30)
            .map(|step| Record::Train {
                step,
                epoch: 0,
                loss: 5.0 - step as f64 * 0.05,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens: 100,
                targets: 50,
                seconds: 0.1,
                skipped: false,
                skipped_total: 0,
                loss_spike: false,
            })
            .collect();
        records.push(Record::Eval {
            step: 30,
            loss: 3.9,
            targets: 10,
            dense_loss: None,
        });
        loss_curve(&records, "test", &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 10_000, "a 960x600 plot with lines and text");
        let nan = [Record::Eval {
            step: 0,
            loss: f64::NAN,
            targets: 0,
            dense_loss: None,
        }];
        assert!(loss_curve(&nan, "test", &dir.join("nan.png")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
