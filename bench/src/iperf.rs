//! iperf3 over loopback TCP: the machine's ceiling for one TCP stream,
//! measured by the tool operators use for it (beside the bench's own
//! direct-TCP client, which runs the same client code as every path).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::chain::free_port;

/// Whether iperf3 is installed.
pub(crate) fn available() -> bool {
    crate::chain::available("iperf3", "--version")
}

/// One iperf3 run of `bytes` over one loopback TCP stream, in MiB/s as
/// the receiver counted it. The server serves this one test and exits;
/// both are killed if the run takes over a minute.
pub(crate) async fn throughput(bytes: u64) -> Result<f64> {
    let port = free_port()?.to_string();
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting iperf3 -s")?;
    let client = async {
        // The server needs a moment to listen; the client retries (iperf3
        // may exit 0 with an error in its report, so the report decides).
        let mut last = anyhow::anyhow!("iperf3 client never ran");
        for _ in 0..50 {
            let out = Command::new("iperf3")
                .args([
                    "-c",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-n",
                    &bytes.to_string(),
                    "-J",
                ])
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .context("running iperf3 -c")?;
            match received_mib_per_sec(&out.stdout) {
                Ok(rate) if out.status.success() => return Ok(rate),
                Ok(_) => last = anyhow::anyhow!("iperf3 -c exited with {}", out.status),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last.context(format!(
            "iperf3 client never reached its server on port {port}"
        )))
    };
    let rate = tokio::time::timeout(Duration::from_secs(60), client)
        .await
        .context("iperf3 did not finish within 60 s")?;
    let _ = server.kill().await;
    rate
}

/// `end.sum_received.bits_per_second` of iperf3's JSON report, in MiB/s.
fn received_mib_per_sec(json: &[u8]) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_slice(json).context("iperf3 -J output")?;
    if let Some(error) = v["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report without end.sum_received.bits_per_second")?;
    Ok(bps / 8.0 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_receivers_rate() {
        let json = br#"{"end":{"sum_sent":{"bits_per_second":1},"sum_received":{"bits_per_second":8388608}}}"#;
        assert_eq!(super::received_mib_per_sec(json).expect("parses"), 1.0);
        assert!(super::received_mib_per_sec(b"{}").is_err());
        let refused = br#"{"end":{},"error":"unable to connect to server"}"#;
        let err = super::received_mib_per_sec(refused).expect_err("an error report");
        assert!(err.to_string().contains("unable to connect"), "{err}");
        assert!(super::received_mib_per_sec(b"not json").is_err());
    }
}
