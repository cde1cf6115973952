//! The OpenAPI document is the API: every (path, method) the controller
//! serves is an operation of the document and every operation is served;
//! the document is served as written, to anyone, and names a schema for
//! every success. (CI's schemathesis run checks the answers against it.)

mod common;

use std::collections::BTreeSet;

use comsat_controller::{Controller, InitOptions, RunOptions, init};
use comsat_protocol::api;
use reqwest::StatusCode;
use serde_yaml_ng::Value;

const DOCUMENT: &str = include_str!("../src/http/openapi.yaml");

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_mapping().expect("paths");
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        let path = path.as_str().expect("a path").to_owned();
        for (method, _) in item.as_mapping().expect("a path item") {
            let method = method.as_str().expect("a key");
            if ["get", "post", "patch", "put", "delete"].contains(&method) {
                ops.insert((path.clone(), method.to_owned()));
            }
        }
    }
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_described_and_every_description_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("ctl");
    init(&InitOptions {
        data_dir: data.clone(),
        ..InitOptions::default()
    })
    .expect("init");
    let controller = Controller::bind(RunOptions {
        data_dir: data,
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        database: None,
        metrics: None,
    })
    .await
    .expect("bind");
    let served: BTreeSet<(String, String)> = controller
        .api_routes()
        .into_iter()
        .map(|(p, m)| (p, m.to_owned()))
        .collect();
    assert!(served.len() > 40, "{served:?}");
    let doc: Value = serde_yaml_ng::from_str(DOCUMENT).expect("the document is YAML");
    let described = operations(&doc);
    let undescribed: Vec<_> = served.difference(&described).collect();
    let unserved: Vec<_> = described.difference(&served).collect();
    assert!(
        undescribed.is_empty() && unserved.is_empty(),
        "served but not in openapi.yaml: {undescribed:?}; in openapi.yaml but not served: {unserved:?}"
    );
    // Every operation answers its success with a schema, and its errors
    // with the one error body.
    for (path, method) in &described {
        let op = &doc["paths"][path.as_str()][method.as_str()];
        let responses = op["responses"].as_mapping().expect("responses");
        assert!(
            responses
                .keys()
                .any(|k| k.as_str().is_some_and(|c| c.starts_with('2'))),
            "{method} {path}: no success"
        );
        assert_eq!(
            op["responses"]["default"]["$ref"].as_str(),
            Some("#/components/responses/Error"),
            "{method} {path}: errors are ErrorBody"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_served_to_anyone() {
    let api = common::api::start("").await;
    let resp = api
        .client
        .get(api.url(api::PATH_OPENAPI))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/yaml")
    );
    assert_eq!(resp.text().await.expect("body"), DOCUMENT);
}
