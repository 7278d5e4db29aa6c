//! A small SVG line chart: a rate over time with events (migrations, the degradation) marked as
//! vertical lines. Hand-written SVG (a few dozen elements) rather than a plotting crate: the
//! chart is one series and some markers, and the output must be a self-contained file.

use std::fmt::Write;

/// A vertical marker at `t` seconds.
#[derive(Debug, Clone)]
pub struct Marker {
    pub t: f64,
    pub label: String,
    /// An SVG colour.
    pub color: &'static str,
}

/// The chart: `points` are (seconds, value) in time order.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub points: Vec<(f64, f64)>,
    pub markers: Vec<Marker>,
}

const W: f64 = 900.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step for a range of `span` with about `n` ticks.
fn step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

impl Chart {
    pub fn to_svg(&self) -> String {
        let x_max = self
            .points
            .iter()
            .map(|p| p.0)
            .chain(self.markers.iter().map(|m| m.t))
            .fold(1e-9, f64::max);
        let y_max = self.points.iter().map(|p| p.1).fold(1e-9, f64::max) * 1.1;
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let sx = |x: f64| LEFT + x / x_max * pw;
        let sy = |y: f64| TOP + ph - y / y_max * ph;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            W / 2.0,
            esc(&self.title)
        );
        // Grid and ticks.
        let ys = step(y_max, 6.0);
        let mut y = 0.0;
        while y <= y_max {
            let py = sy(y);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - RIGHT,
                LEFT - 6.0,
                py + 4.0,
                trim(y)
            );
            y += ys;
        }
        let xs = step(x_max, 10.0);
        let mut x = 0.0;
        while x <= x_max + 1e-9 {
            let px = sx(x);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 16.0,
                trim(x)
            );
            x += xs;
        }
        let _ = writeln!(
            s,
            r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 12.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        // Markers.
        for (i, m) in self.markers.iter().enumerate() {
            let px = sx(m.t);
            let _ = writeln!(
                s,
                r#"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="{}" stroke-dasharray="5,3" stroke-width="1.5"/><text x="{:.1}" y="{:.1}" fill="{}">{}</text>"#,
                TOP + ph,
                m.color,
                px + 4.0,
                TOP + 14.0 + 14.0 * (i % 3) as f64,
                m.color,
                esc(&m.label)
            );
        }
        // The series.
        if !self.points.is_empty() {
            let mut d = String::new();
            for (i, (x, y)) in self.points.iter().enumerate() {
                let _ = write!(
                    d,
                    "{}{:.1},{:.1} ",
                    if i == 0 { "M" } else { "L" },
                    sx(*x),
                    sy(*y)
                );
            }
            let _ = writeln!(
                s,
                r##"<path d="{}" fill="none" stroke="#1f5fbf" stroke-width="2"/>"##,
                d.trim_end()
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn trim(v: f64) -> String {
    let t = format!("{v:.3}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_the_series_and_every_marker() {
        let c = Chart {
            title: "rate <over> time".into(),
            x_label: "s".into(),
            y_label: "Mbit/s".into(),
            points: (0..50).map(|i| (i as f64 * 0.1, (i % 7) as f64)).collect(),
            markers: vec![
                Marker {
                    t: 1.0,
                    label: "degraded".into(),
                    color: "red",
                },
                Marker {
                    t: 2.5,
                    label: "migrated s1 -> s2".into(),
                    color: "green",
                },
            ],
        };
        let svg = c.to_svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("rate &lt;over&gt; time"));
        assert!(svg.contains("migrated s1 -&gt; s2") && svg.contains("degraded"));
        assert_eq!(svg.matches("<path").count(), 1);
        assert_eq!(svg.matches("stroke-dasharray").count(), 2);
        assert_eq!(step(97.0, 6.0), 20.0);
        assert_eq!(step(4.9, 10.0), 0.5);
    }
}
