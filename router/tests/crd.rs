//! deploy/crds.yaml must be exactly what the Rust types generate, and deploy/weft.yaml exactly
//! its parts (namespace, CRD, RBAC, admission policy, DaemonSet) in order. `WEFT_REGEN=1` rewrites both instead.

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{DEPLOY}/{name}")).unwrap_or_default()
}

fn check(name: &str, want: &str) {
    if std::env::var_os("WEFT_REGEN").is_some() {
        std::fs::write(format!("{DEPLOY}/{name}"), want).unwrap();
        return;
    }
    assert!(
        read(name) == want,
        "deploy/{name} is stale: run `WEFT_REGEN=1 cargo test -p weft-router --test crd`"
    );
}

#[test]
fn deploy_crds_match_the_rust_types() {
    check("crds.yaml", &router::meshpeer::crd_yaml());
}

#[test]
fn deploy_manifest_is_its_parts() {
    let mut out = String::from(
        "# weft: a WireGuard-encrypted mesh CNI. `kubectl apply -f weft.yaml` installs it.\n\
         # Generated from deploy/{namespace,crds,rbac,policy,daemonset}.yaml by\n\
         # `WEFT_REGEN=1 cargo test -p weft-router --test crd`; edit those, not this file.\n",
    );
    // The CRD from the types, not from crds.yaml: with WEFT_REGEN the test above may be
    // rewriting that file while this one runs.
    for part in [
        "namespace.yaml",
        "crds.yaml",
        "rbac.yaml",
        "policy.yaml",
        "daemonset.yaml",
    ] {
        out.push_str("---\n");
        out.push_str(&if part == "crds.yaml" {
            router::meshpeer::crd_yaml()
        } else {
            read(part)
        });
    }
    check("weft.yaml", &out);
}
