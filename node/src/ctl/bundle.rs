//! `comsat ctl bundle`: the bundles of the trust domains the controller
//! federates with.

use std::path::PathBuf;

use comsat_protocol::api;

use super::{Output, json, table};
use crate::client::Client;
use crate::state::read_at_most;

/// `comsat ctl bundle …`.
#[derive(clap::Subcommand, Debug)]
pub enum BundleCommand {
    /// Federate with a trust domain: relays whose certificates are its
    /// X.509-SVIDs may enrol, and agents check them against this bundle.
    /// Setting it again replaces it (its authorities rotate).
    Set {
        /// The trust domain (e.g. site-b.example).
        trust_domain: String,
        /// Its bundle: the SPIFFE bundle its bundle endpoint serves
        /// (JSON), or PEM certificates; `-` reads standard input.
        #[arg(long)]
        file: PathBuf,
    },
    /// The federated trust domains.
    List,
    /// Stop federating with a trust domain: agents stop accepting its
    /// relays.
    Delete {
        /// The trust domain.
        trust_domain: String,
    },
}

/// Runs `comsat ctl bundle …`.
pub async fn bundle(c: &Client, command: BundleCommand, out: Output) -> anyhow::Result<String> {
    let one = |domain: &str| -> anyhow::Result<String> {
        comsat_protocol::spiffe::check_trust_domain(domain)
            .map_err(|why| anyhow::anyhow!("trust domain `{domain}`: {why}"))?;
        Ok(format!("{}/{domain}", api::PATH_BUNDLES))
    };
    match command {
        BundleCommand::Set { trust_domain, file } => {
            let bundle = read_at_most(&file, api::MAX_BUNDLE_LEN as u64)?;
            let body = api::BundleSet { bundle };
            let set: api::TrustBundle = c.put(&one(&trust_domain)?, &body, "bundle set").await?;
            if out == Output::Json {
                return json(&set);
            }
            Ok(format!("federated with {}\n", set.trust_domain))
        }
        BundleCommand::List => {
            let v: Vec<api::TrustBundle> = c.get(api::PATH_BUNDLES, &[], "bundle list").await?;
            if out == Output::Json {
                return json(&v);
            }
            let rows = v
                .iter()
                .map(|b| {
                    let n = b.bundle_pem.matches("-----BEGIN CERTIFICATE-----").count();
                    vec![b.trust_domain.clone(), n.to_string()]
                })
                .collect::<Vec<_>>();
            Ok(table(&["TRUST DOMAIN", "AUTHORITIES"], &rows))
        }
        BundleCommand::Delete { trust_domain } => {
            c.delete(&one(&trust_domain)?, "bundle delete").await?;
            Ok(String::new())
        }
    }
}
