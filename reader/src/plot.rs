//! Heap in use over time as an SVG chart, the peak marked with its time and size.

use crate::capture::Capture;
use crate::replay::Replay;
use crate::{grouped, human_bytes};

/// What the chart shows, for the caller's message.
pub struct Plot {
    pub svg: String,
    pub peak_bytes: u64,
    pub peak_seconds: f64,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Capture {
    /// Replays the capture sampling the heap in use, and draws it.
    pub fn plot(&self) -> Plot {
        const POINTS: usize = 1000;
        let end = self
            .end
            .map(|e| e.time)
            .unwrap_or(0)
            .max(self.last_chunk_time);
        // Below 50 ms the 2 ms clock tick says little: spread events by their order instead.
        let by_event = self.seconds(end) < 0.05;
        let max_seq = self
            .end
            .map(|e| e.seq)
            .into_iter()
            .chain(self.chunks.iter().map(|c| c.header.base_seq + 1))
            .max()
            .unwrap_or(1);
        let span = if by_event { max_seq } else { end.max(1) };
        let (r, _, _) = self.replay_into(Replay::sampling(POINTS, span, by_event), u64::MAX);
        let peak = r.peak_bytes;
        let (w, h, left, right, top, bottom) = (1000.0f64, 420.0f64, 90.0, 20.0, 50.0, 50.0);
        let pw = w - left - right;
        let ph = h - top - bottom;
        let scale = if peak == 0 { 1.0 } else { ph / peak as f64 };
        let mut points = String::new();
        let mut carry = 0u64;
        for i in 0..POINTS {
            let v = match r.series_last[i] {
                Some(last) => {
                    let v = r.series[i].max(carry);
                    carry = last;
                    v
                }
                None => carry,
            };
            let x = left + pw * (i as f64 + 0.5) / POINTS as f64;
            let y = top + ph - v as f64 * scale;
            points.push_str(&format!("{x:.1},{y:.1} "));
        }
        let peak_x = if by_event {
            left + pw * r.peak_seq as f64 / span as f64
        } else {
            left + pw * r.peak_time as f64 / span as f64
        };
        let peak_seconds = self.seconds(r.peak_time);
        let command = self.last_image().argv.join(" ");
        let x_end = if by_event {
            format!("{} events", r.events)
        } else {
            format!("{:.3} s", self.seconds(end))
        };
        let label = format!(
            "peak {} ({} bytes) at {:.3} s",
            human_bytes(peak),
            grouped(peak),
            peak_seconds
        );
        let anchor = if peak_x > left + pw * 0.6 {
            "end"
        } else {
            "start"
        };
        let mut svg = String::new();
        svg.push_str(&format!(
            "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"Verdana, sans-serif\" font-size=\"12\">\n"
        ));
        svg.push_str(&format!(
            "<rect width=\"{w}\" height=\"{h}\" fill=\"#fdfdf8\"/>\n"
        ));
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"24\" font-size=\"16\" text-anchor=\"middle\">memtrack: heap in use over time ({})</text>\n",
            w / 2.0,
            esc(&command)
        ));
        // axes and grid
        for k in 0..=4 {
            let v = peak as f64 * k as f64 / 4.0;
            let y = top + ph - v * scale;
            svg.push_str(&format!(
                "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n",
                left + pw
            ));
            svg.push_str(&format!(
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                left - 6.0,
                y + 4.0,
                human_bytes(v as u64)
            ));
        }
        svg.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#333\"/>\n<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#333\"/>\n",
            top + ph,
            left + pw
        ));
        svg.push_str(&format!(
            "<text x=\"{left}\" y=\"{}\">0</text>\n",
            top + ph + 18.0
        ));
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{x_end}</text>\n",
            left + pw,
            top + ph + 18.0
        ));
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"#c0392b\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            points.trim_end()
        ));
        // the peak
        svg.push_str(&format!(
            "<line x1=\"{peak_x:.1}\" y1=\"{top}\" x2=\"{peak_x:.1}\" y2=\"{}\" stroke=\"#2c3e50\" stroke-dasharray=\"4 3\"/>\n",
            top + ph
        ));
        svg.push_str(&format!(
            "<circle cx=\"{peak_x:.1}\" cy=\"{top}\" r=\"4\" fill=\"#2c3e50\"/>\n"
        ));
        let lx = if anchor == "end" {
            peak_x - 8.0
        } else {
            peak_x + 8.0
        };
        svg.push_str(&format!(
            "<text x=\"{lx:.1}\" y=\"{}\" text-anchor=\"{anchor}\" font-weight=\"bold\">{}</text>\n",
            top + 4.0,
            esc(&label)
        ));
        svg.push_str("</svg>\n");
        Plot {
            svg,
            peak_bytes: peak,
            peak_seconds,
        }
    }
}
