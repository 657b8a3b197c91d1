//! deploy/crds.yaml must be exactly what the Rust types generate.

#[test]
fn deploy_crds_match_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds.yaml");
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    let generated = router::meshpeer::crd_yaml();
    assert!(
        on_disk == generated,
        "deploy/crds.yaml is stale: run `cargo run -p weft-router --bin crdgen > deploy/crds.yaml`"
    );
}
