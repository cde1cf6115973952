//! comsat-bench: not built yet (see the benchmark issue).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("comsat-bench is not built yet; its scenarios land with the benchmark issue")
}
