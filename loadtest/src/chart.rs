//! A self-contained SVG chart of a run: message rates and connections on top, delivery latency
//! percentiles (log scale) below, one point per second.
//!
//! Written by hand rather than with plotters: plotters needs a font file to lay out any text,
//! while an SVG file lets the viewer render text; the whole chart is a few polylines.

use std::fmt::Write as _;

use crate::report::Report;

const W: f64 = 900.0;
const PANEL_H: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

pub fn svg(report: &Report) -> String {
    let tl = &report.timeline;
    let t_max = tl.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
    let mut out = String::new();
    let h = TOP + 2.0 * PANEL_H + GAP + 50.0;
    let _ = writeln!(out, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!("{} against {} — {}", report.scenario, report.targets.join(", "), if report.verdict.ok { "OK" } else { "FAILED" });
    let _ = writeln!(out, r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"#, escape(&title));

    let rates = vec![
        Series { name: "published/s", color: "#1f77b4", points: tl.iter().map(|s| (s.t, s.published_per_s)).collect() },
        Series { name: "delivered/s", color: "#2ca02c", points: tl.iter().map(|s| (s.t, s.delivered_per_s)).collect() },
        Series { name: "connections", color: "#7f7f7f", points: tl.iter().map(|s| (s.t, s.connected as f64)).collect() },
    ];
    panel(&mut out, TOP, "messages per second / connections", &rates, t_max, false);

    let lat = vec![
        Series { name: "p50 ms", color: "#2ca02c", points: tl.iter().filter(|s| s.p50_ms > 0.0).map(|s| (s.t, s.p50_ms)).collect() },
        Series { name: "p99 ms", color: "#ff7f0e", points: tl.iter().filter(|s| s.p99_ms > 0.0).map(|s| (s.t, s.p99_ms)).collect() },
        Series { name: "max ms", color: "#d62728", points: tl.iter().filter(|s| s.max_ms > 0.0).map(|s| (s.t, s.max_ms)).collect() },
    ];
    panel(&mut out, TOP + PANEL_H + GAP, "delivery latency per second (ms, log scale)", &lat, t_max, true);
    let _ = writeln!(out, r#"<text x="{}" y="{}" text-anchor="middle">seconds</text>"#, LEFT + (W - LEFT - RIGHT) / 2.0, h - 12.0);
    out.push_str("</svg>\n");
    out
}

fn panel(out: &mut String, y0: f64, title: &str, series: &[Series<'_>], t_max: f64, log: bool) {
    let pw = W - LEFT - RIGHT;
    let v_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max);
    let (lo, hi) = if log {
        let min = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(f64::INFINITY, f64::min);
        let lo = if min.is_finite() { 10f64.powf(min.max(1e-3).log10().floor()) } else { 0.01 };
        (lo, 10f64.powf(v_max.max(lo * 10.0).log10().ceil()))
    } else {
        (0.0, nice(v_max.max(1.0)))
    };
    let y_of = |v: f64| {
        let f = if log { (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()) } else { v / hi };
        y0 + PANEL_H - f * PANEL_H
    };
    let x_of = |t: f64| LEFT + t / t_max * pw;
    let _ = writeln!(out, r##"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"##, y0 - 8.0, escape(title));
    let _ = writeln!(out, r##"<rect x="{LEFT}" y="{y0}" width="{pw}" height="{PANEL_H}" fill="none" stroke="#999"/>"##);
    let ticks: Vec<f64> = if log {
        let mut v = lo;
        let mut t = Vec::new();
        while v <= hi * 1.0001 {
            t.push(v);
            v *= 10.0;
        }
        t
    } else {
        (0..=4).map(|i| hi * f64::from(i) / 4.0).collect()
    };
    for v in ticks {
        let y = y_of(v);
        let _ = writeln!(out, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/>"##, LEFT + pw);
        let _ = writeln!(out, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, y + 4.0, label(v));
    }
    for i in 0..=5 {
        let t = t_max * f64::from(i) / 5.0;
        let _ = writeln!(out, r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#, x_of(t), y0 + PANEL_H + 16.0, t);
    }
    for (i, s) in series.iter().enumerate() {
        if !s.points.is_empty() {
            let pts: Vec<String> = s.points.iter().map(|(t, v)| format!("{:.1},{:.1}", x_of(*t), y_of(*v))).collect();
            let _ = writeln!(out, r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#, s.color, pts.join(" "));
        }
        let ly = y0 + 14.0 + 18.0 * i as f64;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(out, r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/>"#, lx + 18.0, s.color);
        let _ = writeln!(out, r#"<text x="{}" y="{}">{}</text>"#, lx + 24.0, ly + 4.0, escape(s.name));
    }
}

/// A round upper bound for an axis.
fn nice(v: f64) -> f64 {
    let mag = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|c| *c >= v).unwrap_or(10.0 * mag)
}

fn label(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 1.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_bounds_are_round() {
        assert_eq!(nice(7.0), 10.0);
        assert_eq!(nice(120.0), 200.0);
        assert_eq!(nice(4_500.0), 5_000.0);
    }
}
