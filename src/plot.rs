//! `dtrain plot`: training curves from `metrics.jsonl` as a PNG: loss (train, val) and
//! accuracy (train, val, test) against the step; a masked-LM pretraining's loss and
//! masked-token accuracy.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, IoContext, Result};

/// The series read from a metrics file.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Curves {
    pub train_loss: Vec<(f64, f64)>,
    pub train_acc: Vec<(f64, f64)>,
    pub val_loss: Vec<(f64, f64)>,
    pub val_acc: Vec<(f64, f64)>,
    pub test_acc: Vec<(f64, f64)>,
    /// The file is a masked-LM pretraining's: `train_acc` holds its masked-token accuracy.
    pub masked_lm: bool,
    /// The last line was cut short (no newline, not JSON: a run writing it, or killed while
    /// it did) and was left out.
    pub torn_last_line: bool,
}

/// Reads `metrics.jsonl`; a line that is not a JSON object with a step is an error naming it,
/// except a last line cut short (see [`Curves::torn_last_line`]).
pub fn read_metrics(path: &Path) -> Result<Curves> {
    // Checked before reading: a FIFO would wait for a writer, a device never end.
    if !std::fs::metadata(path).at(path)?.is_file() {
        return Err(Error::bad_file(path, "is not a regular file, so not a metrics.jsonl"));
    }
    let bytes = std::fs::read(path).at(path)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        Error::BadLine { path: path.to_owned(), line, msg: "not UTF-8 text: not a metrics.jsonl".into() }
    })?;
    let mut c = Curves::default();
    let last = text.lines().count().saturating_sub(1);
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |msg: &str| Error::BadLine { path: path.to_owned(), line: i as u64 + 1, msg: msg.into() };
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i == last && !text.ends_with('\n') => {
                c.torn_last_line = true;
                break;
            }
            Err(e) => return Err(bad(&format!("invalid JSON: {e}"))),
        };
        let step = match v.get("step") {
            Some(s) => s
                .as_f64()
                .filter(|&n| n.fract() == 0.0 && (0.0..=(1u64 << 53) as f64).contains(&n))
                .ok_or_else(|| bad(&format!("`step` is {s}, not a whole number of steps (0 to 2^53)")))?,
            // A pretraining's metrics count epochs.
            None if v.get("epoch").is_some() => {
                return Err(bad("no `step`: this is a skip-gram or CBOW pretraining's metrics.jsonl (it counts epochs), which plot does not draw"))
            }
            None => return Err(bad("no `step`: not a training run's metrics.jsonl")),
        };
        // Accuracies are drawn on [0, 1]: one outside it is not a training run's.
        for k in ["accuracy", "train_accuracy", "masked_accuracy"] {
            if let Some(a) = v.get(k).and_then(|x| x.as_f64()).filter(|a| !(0.0..=1.0).contains(a)) {
                return Err(bad(&format!("`{k}` is {}, outside [0, 1]", crate::error::number(a))));
            }
        }
        // A value drawn must be a number where it is present (NaN is written as null).
        for k in ["loss", "accuracy", "train_accuracy", "masked_accuracy"] {
            if let Some(x) = v.get(k).filter(|x| !x.is_number()) {
                return Err(bad(&format!("`{k}` is {x}, not a number (null is how a NaN is written)")));
            }
        }
        let get = |k: &str| v.get(k).and_then(|x| x.as_f64());
        // The curves are the student's: a Mean Teacher's, EMA/SWA weights' or MPL teacher's
        // evaluations (`model`) at the same steps are not drawn into them.
        if v.get("model").is_some() {
            continue;
        }
        match v.get("split").and_then(|s| s.as_str()) {
            None => {
                if let Some(&(last, _)) = c.train_loss.last().filter(|&&(last, _)| step < last) {
                    return Err(bad(&format!(
                        "step {step} after step {last}: the records are out of order (two runs' metrics in one file?)"
                    )));
                }
                if let Some(l) = get("loss") {
                    c.train_loss.push((step, l));
                }
                if let Some(a) = get("train_accuracy") {
                    c.train_acc.push((step, a));
                }
                // A masked-LM pretraining logs steps too, with the masked tokens' accuracy.
                if let Some(a) = get("masked_accuracy") {
                    c.train_acc.push((step, a));
                    c.masked_lm = true;
                }
            }
            Some("val") => {
                if let Some(l) = get("loss") {
                    c.val_loss.push((step, l));
                }
                if let Some(a) = get("accuracy") {
                    c.val_acc.push((step, a));
                }
            }
            Some("test") => {
                if let Some(a) = get("accuracy") {
                    c.test_acc.push((step, a));
                }
            }
            Some(_) => {}
        }
    }
    if c.train_loss.is_empty() {
        return Err(Error::bad_file(path, "no training records (lines with `step` and `loss`)"));
    }
    Ok(c)
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font ships inside the binary (Ubuntu Light, from epaint_default_fonts), so
        // plotting needs no system fonts.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad_file(path, format!("drawing failed: {e}"))
}

/// The first bytes of every PNG file.
pub const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Draws the curves into a PNG of `width`×`height` pixels at `out` (a name ending in
/// `.png`, in an existing directory), written whole through a temporary file: an earlier
/// PNG there is replaced only by a finished one.
pub fn plot(curves: &Curves, title: &str, out: &Path, width: u32, height: u32) -> Result<()> {
    check_png_path(out)?;
    let tmp = crate::fsutil::sibling(out, ".tmp.png");
    crate::fsutil::removing_on_error(&[&tmp], || {
        draw(curves, title, &tmp, width, height)?;
        std::fs::rename(&tmp, out).at(out)
    })
}

/// Refuses an output path that [`plot`] cannot write: a name not ending in `.png`, or in a
/// directory that does not exist.
pub fn check_png_path(out: &Path) -> Result<()> {
    if !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        return Err(Error::bad_file(out, "the output must be a .png file"));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(Error::bad_file(out, format!("the directory {} does not exist", parent.display())));
    }
    Ok(())
}

/// A y tick's label: plain from 0.001 to 100000, in exponent form beyond (a diverged loss
/// of 1e300 or one of 1e-8 otherwise loses its exponent to the label area, or reads "0.0").
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (1e-3..1e5).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

/// [`plot`]'s drawing, into `out`.
fn draw(curves: &Curves, title: &str, out: &Path, width: u32, height: u32) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(out, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(out, e))?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(|e| draw_err(out, e))?;
    let (left, right) = root.split_horizontally(width / 2);
    let max_step = curves.train_loss.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_loss = curves.train_loss.iter().chain(&curves.val_loss).map(|p| p.1).fold(0.0, f64::max) * 1.05;
    type Series<'a> = (&'a str, &'a [(f64, f64)], RGBColor);
    let (acc_name, train_name) =
        if curves.masked_lm { ("masked-token accuracy", "masked tokens") } else { ("accuracy", "train") };
    let panels: [(&DrawingArea<BitMapBackend, _>, &str, f64, Vec<Series>); 2] = [
        (
            &left,
            "loss",
            max_loss.max(1e-6),
            vec![("train", &curves.train_loss, BLUE), ("val", &curves.val_loss, RED)],
        ),
        (
            &right,
            acc_name,
            1.0,
            vec![
                (train_name, &curves.train_acc, BLUE),
                ("val", &curves.val_acc, RED),
                ("test", &curves.test_acc, GREEN),
            ],
        ),
    ];
    for (area, name, ymax, series) in panels {
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..max_step, 0.0..ymax)
            .map_err(|e| draw_err(out, e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(name)
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(|e| draw_err(out, e))?;
        for (label, points, color) in series {
            if points.is_empty() {
                continue;
            }
            let style = ShapeStyle { color: color.to_rgba(), filled: false, stroke_width: 2 };
            let drawn = if points.len() == 1 {
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, style.filled())))
            } else {
                chart.draw_series(LineSeries::new(points.iter().copied(), style))
            };
            drawn
                .map_err(|e| draw_err(out, e))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(out, e))?;
    }
    root.present().map_err(|e| draw_err(out, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tick_labels_keep_their_exponent() {
        let t = super::tick;
        assert_eq!(
            (t(0.0), t(0.25), t(2.0), t(1234.5)),
            ("0".into(), "0.25".into(), "2".into(), "1234.5".into())
        );
        assert_eq!((t(1e300), t(2e-7), t(-3e6)), ("1.0e300".into(), "2.0e-7".into(), "-3.0e6".into()));
    }
}
