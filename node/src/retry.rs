//! Jittered exponential backoff for controller retries.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::client::{Client, LONG_POLL};

/// Longest wait between retries while the controller is unreachable.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Jittered exponential backoff.
pub(crate) struct Retry(Duration);

impl Retry {
    pub(crate) fn new() -> Self {
        Self(Duration::from_millis(500))
    }
    pub(crate) async fn wait(&mut self) {
        let d = self.0;
        self.0 = (d * 2).min(RETRY_MAX);
        tokio::time::sleep(d / 2 + (d / 2).mul_f64(rand::random::<f64>())).await;
    }
    pub(crate) fn reset(&mut self) {
        self.0 = Duration::from_millis(500);
    }
}

/// Long-polls `path` for what came after `since` until the controller
/// answers, waiting with `retry` between failures (each logged with
/// `meanwhile`, what the node does without the answer).
pub(crate) async fn long_poll<T: DeserializeOwned>(
    client: &Client,
    retry: &mut Retry,
    (path, what): (&str, &str),
    since: u64,
    meanwhile: &str,
) -> T {
    loop {
        let wait = LONG_POLL.as_millis().to_string();
        let query = [("since", since.to_string()), ("wait_ms", wait)];
        match client.poll(path, &query, LONG_POLL, what).await {
            Ok(answer) => {
                retry.reset();
                return answer;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch {what} from the controller; {meanwhile}");
                retry.wait().await;
            }
        }
    }
}
