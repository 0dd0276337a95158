//! The per-second timeline of a run and its SVG chart (`run --chart FILE`):
//! messages per second (accepted and not) and the transaction latency's
//! p99 and maximum per second, with fault moments (`--faults FILE`: lines
//! of `<unix seconds> <label>`) drawn as labelled vertical lines. Drawn with
//! plotters' SVG backend; text is left to the SVG viewer (no font crate).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

/// One second of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    /// Seconds from the start of the run.
    pub t: u64,
    pub accepted: u64,
    /// Refused or failed.
    pub not_accepted: u64,
    /// Transaction latency (µs) of the messages that ended in this second.
    pub p99_us: u64,
    pub max_us: u64,
}

/// Per-second counts and latency histograms, filled by the workers.
pub struct Timeline {
    start: Instant,
    /// The start as Unix time, to place the fault moments.
    pub start_unix: f64,
    secs: Mutex<Vec<(u64, u64, Histogram<u64>)>>,
}

impl Timeline {
    pub fn new(start: Instant) -> Timeline {
        let start_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
            - start.elapsed().as_secs_f64();
        Timeline {
            start,
            start_unix,
            secs: Mutex::new(Vec::new()),
        }
    }

    /// One message ended at `at` after `latency`.
    pub fn record(&self, at: Instant, accepted: bool, latency: Duration) {
        let i = at.saturating_duration_since(self.start).as_secs() as usize;
        let Ok(mut v) = self.secs.lock() else { return };
        while v.len() <= i {
            match Histogram::new_with_bounds(1, 3_600_000_000, 2) {
                Ok(h) => v.push((0, 0, h)),
                Err(_) => return,
            }
        }
        let s = &mut v[i];
        if accepted {
            s.0 += 1;
        } else {
            s.1 += 1;
        }
        let _ =
            s.2.record((latency.as_micros() as u64).clamp(1, 3_600_000_000));
    }

    pub fn seconds(&self) -> Vec<Second> {
        let Ok(v) = self.secs.lock() else {
            return Vec::new();
        };
        v.iter()
            .enumerate()
            .map(|(i, (a, n, h))| Second {
                t: i as u64,
                accepted: *a,
                not_accepted: *n,
                p99_us: if h.is_empty() {
                    0
                } else {
                    h.value_at_quantile(0.99)
                },
                max_us: h.max(),
            })
            .collect()
    }
}

/// A fault moment: seconds from the start of the run, and what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub t: f64,
    pub label: String,
}

/// Reads a faults file (`<unix seconds> <label>` per line, `#` comments),
/// placing each moment relative to `start_unix`.
pub fn read_faults(path: &Path, start_unix: f64) -> Result<Vec<Fault>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_faults(&text, start_unix).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse_faults(text: &str, start_unix: f64) -> Result<Vec<Fault>, String> {
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (ts, label) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let t: f64 = ts
            .parse()
            .map_err(|_| format!("line {}: not a Unix time: {ts:?}", i + 1))?;
        v.push(Fault {
            t: t - start_unix,
            label: label.trim().to_string(),
        });
    }
    Ok(v)
}

fn err(e: impl std::fmt::Display) -> String {
    format!("chart: {e}")
}

/// Draws the chart into `path` (SVG): throughput on top, p99 and max
/// latency (log scale) below, fault moments across both.
pub fn draw(path: &Path, title: &str, secs: &[Second], faults: &[Fault]) -> Result<(), String> {
    let root = SVGBackend::new(path, (1400, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(400);
    let x_end = secs.len().max(1) as f64;
    let rate_max = secs
        .iter()
        .map(|s| s.accepted.max(s.not_accepted))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.15;
    let mut c = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_end, 0f64..rate_max)
        .map_err(err)?;
    c.configure_mesh()
        .y_desc("messages / s")
        .x_desc("seconds")
        .draw()
        .map_err(err)?;
    fault_lines(&mut c, faults, (0.0, rate_max), true)?;
    let at = |s: &Second| s.t as f64 + 0.5;
    let blue = BLUE.stroke_width(2);
    let red = RED.stroke_width(2);
    series(
        &mut c,
        secs.iter().map(|s| (at(s), s.accepted as f64)),
        blue,
        "accepted (250) / s",
    )?;
    series(
        &mut c,
        secs.iter().map(|s| (at(s), s.not_accepted as f64)),
        red,
        "not accepted (4xx/5xx/no reply) / s",
    )?;
    legend(&mut c, SeriesLabelPosition::LowerRight)?;

    let ms = |us: u64| (us as f64 / 1000.0).max(0.1);
    let lat_max = secs.iter().map(|s| ms(s.max_us)).fold(1.0, f64::max) * 2.0;
    let mut c = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_end, (0.1f64..lat_max).log_scale())
        .map_err(err)?;
    c.configure_mesh()
        .y_desc("transaction latency, ms (log)")
        .x_desc("seconds since the start of the run")
        .draw()
        .map_err(err)?;
    fault_lines(&mut c, faults, (0.1, lat_max), false)?;
    let busy = || secs.iter().filter(|s| s.accepted + s.not_accepted > 0);
    let black = BLACK.stroke_width(2);
    let magenta = MAGENTA.mix(0.6).stroke_width(1);
    series(
        &mut c,
        busy().map(|s| (at(s), ms(s.p99_us))),
        black,
        "p99 per second",
    )?;
    series(
        &mut c,
        busy().map(|s| (at(s), ms(s.max_us))),
        magenta,
        "max per second",
    )?;
    legend(&mut c, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(err)
}

type Chart<'a, X, Y> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>;

/// One labelled line.
fn series<X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    c: &mut Chart<'_, X, Y>,
    points: impl Iterator<Item = (f64, f64)>,
    style: ShapeStyle,
    label: &str,
) -> Result<(), String> {
    c.draw_series(LineSeries::new(points, style))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    Ok(())
}

/// A vertical line at each fault moment from `y.0` to `y.1`, labelled when
/// `labels`.
fn fault_lines<X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    c: &mut Chart<'_, X, Y>,
    faults: &[Fault],
    y: (f64, f64),
    labels: bool,
) -> Result<(), String> {
    let style = ShapeStyle::from(&RGBColor(200, 120, 0).mix(0.6)).stroke_width(1);
    for f in faults {
        c.draw_series(LineSeries::new([(f.t, y.0), (f.t, y.1)], style))
            .map_err(err)?;
        if labels {
            let font = ("sans-serif", 11)
                .into_font()
                .transform(FontTransform::Rotate90)
                .color(&RGBColor(160, 90, 0));
            c.draw_series(std::iter::once(Text::new(
                f.label.clone(),
                (f.t, y.1 * 0.98),
                font,
            )))
            .map_err(err)?;
        }
    }
    Ok(())
}

fn legend<X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    c: &mut Chart<'_, X, Y>,
    at: SeriesLabelPosition,
) -> Result<(), String> {
    c.configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_and_chart() {
        let start = Instant::now();
        let tl = Timeline::new(start);
        tl.record(
            start + Duration::from_millis(100),
            true,
            Duration::from_millis(2),
        );
        tl.record(
            start + Duration::from_millis(2100),
            false,
            Duration::from_millis(900),
        );
        let s = tl.seconds();
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].accepted, s[2].not_accepted), (1, 1));
        assert!((895_000..=905_000).contains(&s[2].p99_us), "{s:?}");
        let faults = parse_faults(
            &format!("# t label\n{} stop sink-a\n", tl.start_unix + 1.5),
            tl.start_unix,
        )
        .unwrap();
        assert_eq!(faults.len(), 1);
        assert!((faults[0].t - 1.5).abs() < 1e-6 && faults[0].label == "stop sink-a");
        assert!(parse_faults("soon x", 0.0).is_err());
        let dir = std::env::temp_dir().join(format!("smtp-load-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.svg");
        draw(&p, "test", &s, &faults).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("stop sink-a"),
            "{svg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
