//! What a run reports: figures beside their baselines, the environment,
//! and the same as a markdown table and an SVG chart.

use std::fmt::Write as _;
use std::process::Command;

use serde::Serialize;

use crate::measure::median;

/// One measured figure beside its baseline.
#[derive(Debug, Serialize)]
pub(crate) struct Figure {
    pub(crate) scenario: String,
    pub(crate) metric: String,
    pub(crate) unit: String,
    pub(crate) comsat: f64,
    pub(crate) baseline_name: String,
    pub(crate) baseline: f64,
    /// comsat ÷ baseline; none where the baseline is zero (a peer that,
    /// say, faulted no page while it ran).
    pub(crate) ratio: Option<f64>,
    pub(crate) samples: usize,
}

pub(crate) fn figure(
    scenario: &str,
    metric: &str,
    unit: &str,
    comsat: f64,
    baseline_name: &str,
    baseline: f64,
    samples: usize,
) -> Figure {
    Figure {
        scenario: scenario.into(),
        metric: metric.into(),
        unit: unit.into(),
        comsat,
        baseline_name: baseline_name.into(),
        baseline,
        ratio: (baseline != 0.0).then(|| comsat / baseline),
        samples,
    }
}

/// Samples of comsat and of each baseline that ran, taken interleaved.
#[derive(Default)]
pub(crate) struct Samples {
    pub(crate) comsat: Vec<f64>,
    pub(crate) baselines: Vec<(&'static str, Vec<f64>)>,
}

impl Samples {
    pub(crate) fn add(&mut self, name: &'static str, v: f64) {
        match self.baselines.iter_mut().find(|(n, _)| *n == name) {
            Some((_, vs)) => vs.push(v),
            None => self.baselines.push((name, vec![v])),
        }
    }

    /// One figure per baseline: medians and their ratio.
    pub(crate) fn figures(&self, scenario: &str, metric: &str, unit: &str, out: &mut Vec<Figure>) {
        let n = self.comsat.len();
        let c = median(self.comsat.clone());
        for (name, vs) in &self.baselines {
            out.push(figure(
                scenario,
                metric,
                unit,
                c,
                name,
                median(vs.clone()),
                n,
            ));
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) quick: bool,
    pub(crate) command: String,
    pub(crate) environment: Environment,
    pub(crate) figures: Vec<Figure>,
    pub(crate) notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Environment {
    kernel: String,
    cpus: usize,
    cpu_model: String,
    aes_ni: bool,
    cpu_flags: String,
    memory_kib: u64,
    comsat_version: String,
    git_commit: String,
    rustc: String,
    /// Each peer's version line, or `missing`.
    peers: Vec<(String, String)>,
    quic_max_udp_payload: u16,
}

/// The first line of `program args` (stdout, else stderr) that contains
/// `needle`, or `missing`.
fn version_line(program: &str, args: &[&str], needle: &str) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap_or("")
                .trim()
                .to_owned()
        }
        Err(_) => "missing".into(),
    }
}

pub(crate) fn environment() -> Environment {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default()
    };
    let cpu_flags = field("flags");
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Environment {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        aes_ni: cpu_flags.split_whitespace().any(|f| f == "aes"),
        cpu_model: field("model name"),
        cpu_flags,
        memory_kib,
        comsat_version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: version_line("git", &["rev-parse", "HEAD"], ""),
        rustc: version_line("rustc", &["--version"], "rustc"),
        peers: vec![
            (
                "stunnel".into(),
                version_line("stunnel", &["-version"], "stunnel"),
            ),
            (
                "rathole".into(),
                version_line("rathole", &["--version"], "Build Version"),
            ),
            (
                "iperf3".into(),
                version_line("iperf3", &["--version"], "iperf"),
            ),
        ],
        // quinn's default MTU discovery upper bound: loopback's 64 KiB MTU
        // is never used.
        quic_max_udp_payload: 1452,
    }
}

pub(crate) fn markdown(report: &Report) -> String {
    let mut out = format!(
        "`{}` — {} CPUs ({}), kernel {}\n\n\
         | scenario | metric | comsat | baseline | ratio |\n|---|---|---:|---:|---:|\n",
        report.command,
        report.environment.cpus,
        report.environment.cpu_model,
        report.environment.kernel
    );
    for f in &report.figures {
        let _ = writeln!(
            out,
            "| {} | {} | {} {} | {} {} ({}) | {} |",
            f.scenario,
            f.metric,
            num(f.comsat),
            f.unit,
            num(f.baseline),
            f.unit,
            f.baseline_name,
            f.ratio.map_or("—".to_owned(), |r| format!("{r:.3}"))
        );
    }
    for n in &report.notes {
        let _ = write!(out, "\n{n}\n");
    }
    out
}

/// Whole numbers from 100, one decimal from 10, three below.
fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// One bar of a chart.
pub(crate) struct Bar {
    pub(crate) label: String,
    pub(crate) value: f64,
    pub(crate) ours: bool,
}

/// Horizontal bar charts, one panel per `(title, unit, bars)`, as SVG.
pub(crate) fn svg(panels: &[(String, String, Vec<Bar>)]) -> String {
    const WIDTH: f64 = 760.0;
    const LABEL: f64 = 300.0;
    const ROW: f64 = 22.0;
    let height: f64 = panels
        .iter()
        .map(|(_, _, bars)| 40.0 + ROW * bars.len() as f64)
        .sum::<f64>()
        + 10.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let mut y = 10.0;
    for (title, unit, bars) in panels {
        let _ = writeln!(
            out,
            "<text x=\"4\" y=\"{}\" font-weight=\"bold\">{}</text>",
            y + 14.0,
            escape(&format!("{title} ({unit})"))
        );
        y += 28.0;
        let max = bars.iter().map(|b| b.value).fold(0.0_f64, f64::max);
        for b in bars {
            let w = if max > 0.0 && b.value.is_finite() {
                (WIDTH - LABEL - 80.0) * b.value / max
            } else {
                0.0
            };
            let fill = if b.ours { "#d9480f" } else { "#868e96" };
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
                 <rect x=\"{LABEL}\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"{fill}\"/>\
                 <text x=\"{}\" y=\"{}\">{}</text>",
                LABEL - 6.0,
                y + 14.0,
                escape(&b.label),
                y + 3.0,
                ROW - 6.0,
                LABEL + w + 4.0,
                y + 14.0,
                num(b.value)
            );
            y += ROW;
        }
        y += 12.0;
    }
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_scales_bars_to_the_largest_and_escapes_labels() {
        let chart = svg(&[(
            "one flow".into(),
            "MiB/s".into(),
            vec![
                Bar {
                    label: "comsat <A & B>".into(),
                    value: 50.0,
                    ours: true,
                },
                Bar {
                    label: "direct".into(),
                    value: 100.0,
                    ours: false,
                },
            ],
        )]);
        assert!(chart.contains("comsat &lt;A &amp; B&gt;"), "{chart}");
        assert!(chart.contains("width=\"190.0\""), "half bar: {chart}");
        assert!(chart.contains("width=\"380.0\""), "full bar: {chart}");
    }

    #[test]
    fn a_zero_baseline_has_no_ratio() {
        assert_eq!(figure("s", "m", "", 6.0, "b", 3.0, 1).ratio, Some(2.0));
        assert_eq!(figure("s", "m", "", 6.0, "b", 0.0, 1).ratio, None);
    }
}
