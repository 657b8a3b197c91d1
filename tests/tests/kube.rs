//! Kube tier: a real kube-apiserver + etcd (built from Go modules, started by the harness on
//! loopback) answers kube-rs: Nodes, a CRD with a watch, RBAC denying a router identity, and
//! `kubectl version`. Needs root only for nothing; needs the Go toolchain on a cold cache.

use std::path::PathBuf;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::runtime::{conditions, wait::await_condition, watcher, WatchStreamExt};
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use weft_tests::kube_env::KubeEnv;

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(group = "test.weft.dev", version = "v1", kind = "Widget", namespaced)]
struct WidgetSpec {
    size: u32,
}

/// Stops the control plane even when an assertion fails.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if let Err(e) = KubeEnv::down(&self.0) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_api_server_answers_nodes_crds_watches_and_rbac() {
    let dir = std::env::temp_dir().join(format!("weft-test-kube-{}", std::process::id()));
    let _down = Down(dir.clone());
    let env = KubeEnv::up(&dir, &["node1".to_string()])
        .await
        .expect("kube up");
    println!(
        "kube-apiserver + etcd warm start: {:.2}s",
        env.startup.as_secs_f64()
    );
    let admin = env.client("admin").await.unwrap();

    // Nodes: none at first (no kubelet); the lab creates them with their addresses.
    let nodes: Api<Node> = Api::all(admin.clone());
    assert!(nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
    let node = Node {
        metadata: ObjectMeta {
            name: Some("node1".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let status = NodeStatus {
        addresses: Some(vec![NodeAddress {
            type_: "InternalIP".into(),
            address: "10.99.0.11".into(),
        }]),
        ..Default::default()
    };
    let patch = serde_json::json!({"status": status});
    nodes
        .patch_status(
            "node1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await
        .unwrap();
    let got = nodes.get("node1").await.unwrap();
    let addrs = got.status.unwrap().addresses.unwrap();
    assert_eq!(addrs[0].address, "10.99.0.11");

    // A CRD: install, wait until established, watch, see a create arrive.
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    crds.create(&PostParams::default(), &Widget::crd())
        .await
        .unwrap();
    let established = await_condition(
        crds,
        "widgets.test.weft.dev",
        conditions::is_crd_established(),
    );
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .unwrap()
        .unwrap();
    let widgets: Api<Widget> = Api::namespaced(admin.clone(), "default");
    let mut seen = watcher(widgets.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    widgets
        .create(
            &PostParams::default(),
            &Widget::new("w1", WidgetSpec { size: 3 }),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), seen.try_next())
        .await
        .expect("watch event within 20 s")
        .unwrap()
        .expect("stream open");
    assert_eq!(first.name_any(), "w1");
    assert_eq!(first.spec.size, 3);
    // Schema validation is the server's: a wrong type is refused.
    let bad = serde_json::json!({"apiVersion": "test.weft.dev/v1", "kind": "Widget",
        "metadata": {"name": "bad"}, "spec": {"size": "big"}});
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        admin.clone(),
        "default",
        &kube::api::ApiResource::erase::<Widget>(&()),
    );
    let refused = raw
        .create(
            &PostParams::default(),
            &serde_json::from_value(bad).unwrap(),
        )
        .await;
    assert!(
        matches!(refused, Err(kube::Error::Api(ref e)) if e.code == 422),
        "{refused:?}"
    );

    // RBAC: a router identity with no role is denied; admin is not.
    let router = env.client("node1").await.unwrap();
    for result in [
        Api::<Secret>::all(router.clone())
            .list(&ListParams::default())
            .await
            .map(|_| ()),
        Api::<Node>::all(router.clone())
            .list(&ListParams::default())
            .await
            .map(|_| ()),
    ] {
        match result {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 403, "{e:?}");
                assert!(e.message.contains("weft-router:node1"), "{}", e.message);
            }
            other => panic!("router identity was not denied: {other:?}"),
        }
    }
    Api::<Secret>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap();

    // kubectl, as a human would use the printed KUBECONFIG.
    let (ok, text) = env.kubectl(&["version"]).unwrap();
    println!("{text}");
    assert!(ok, "{text}");
    assert!(text.contains("Server Version: v1.36"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshpeer_crd_installs_validates_and_takes_server_side_apply() {
    use router::meshpeer::{Endpoint, EndpointKind, MeshPeer, MeshPeerSpec, MeshPeerStatus};
    let dir = std::env::temp_dir().join(format!("weft-test-kube-mp-{}", std::process::id()));
    let _down = Down(dir.clone());
    let env = KubeEnv::up(&dir, &[]).await.expect("kube up");
    let admin = env.client("admin").await.unwrap();
    let kubectl = |args: &[&str]| env.kubectl(args).unwrap();
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds.yaml");
    let (ok, out) = kubectl(&["apply", "-f", crds]);
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/meshpeers.weft.dev",
        "--timeout=30s",
    ]);
    assert!(ok, "{out}");

    let peers: Api<MeshPeer> = Api::all(admin.clone());
    let spec = MeshPeerSpec::new(
        "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
        vec![Endpoint::new("10.99.0.11:51820", EndpointKind::Internal)],
        "fd77:6566:7400::1",
    );
    let pp = kube::api::PatchParams::apply("weft-router").force();
    let mp = MeshPeer::new("node1", spec.clone());
    peers
        .patch("node1", &pp, &kube::api::Patch::Apply(&mp))
        .await
        .unwrap();
    let status = serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "MeshPeer",
        "status": MeshPeerStatus { short_key: "xTIBA5rb".into(), ranges: vec!["10.32.0.0/13".into()], ..Default::default() }});
    peers
        .patch_status("node1", &pp, &kube::api::Patch::Apply(&status))
        .await
        .unwrap();
    let (ok, out) = kubectl(&["get", "meshpeers"]);
    println!("{out}");
    assert!(
        ok && out.contains("xTIBA5rb")
            && out.contains("10.99.0.11:51820")
            && out.contains("10.32.0.0/13"),
        "{out}"
    );

    let bad = MeshPeer::new(
        "node2",
        MeshPeerSpec {
            public_key: "not-a-key".into(),
            ..spec
        },
    );
    let refused = peers
        .patch("node2", &pp, &kube::api::Patch::Apply(&bad))
        .await;
    assert!(
        matches!(refused, Err(kube::Error::Api(ref e)) if e.code == 422),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_peer_store_works_for_a_router_with_weft_rbac_only() {
    use router::kube_store::KubeStore;
    use router::meshpeer::{Endpoint, EndpointKind, MeshPeerSpec};
    use router::peers::PeerStore;
    use router::view::PeerEvent;
    let dir = std::env::temp_dir().join(format!("weft-test-kube-store-{}", std::process::id()));
    let _down = Down(dir.clone());
    let env = KubeEnv::up(&dir, &["node1".to_string(), "node2".to_string()])
        .await
        .expect("kube up");
    let kubectl = |args: &[&str]| {
        let (ok, out) = env.kubectl(args).unwrap();
        assert!(ok, "kubectl {args:?}: {out}");
    };
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    kubectl(&["apply", "-f", &format!("{deploy}/crds.yaml")]);
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/meshpeers.weft.dev",
        "--timeout=30s",
    ]);
    let store1 = KubeStore::new(env.client("node1").await.unwrap());
    let spec = |key: &str, ip: &str| {
        let ep = Endpoint::new(&format!("{ip}:51820"), EndpointKind::Internal);
        MeshPeerSpec::new(key, vec![ep], "fd77:6566:7400::1")
    };
    let k1 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    let k2 = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    let denied = store1.publish("node1", &spec(k1, "10.99.0.11")).await;
    assert!(
        format!("{denied:?}").contains("forbidden"),
        "without RBAC: {denied:?}"
    );

    // weft's roles, bound (as in the lab) to the routers' group.
    env.grant_weft(weft_tests::kube_env::ROUTER_GROUP).unwrap();
    let store2 = KubeStore::new(env.client("node2").await.unwrap());
    let mut rx = store2.watch();
    // RBAC propagates through the authorizer cache: retry briefly.
    let mut published = Err(router::Error::Net {
        what: "".into(),
        reason: "not tried".into(),
    });
    for _ in 0..50 {
        published = store1.publish("node1", &spec(k1, "10.99.0.11")).await;
        if published.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    published.unwrap();
    store2
        .publish("node2", &spec(k2, "10.99.0.12"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // The watch's events, applied to a map of the MeshPeers as they come.
    let mut seen = std::collections::BTreeMap::new();
    let mut next = async |seen: &mut std::collections::BTreeMap<String, MeshPeerSpec>| {
        let event = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("a watch event in time")
            .expect("the watch goes on");
        match event.clone() {
            PeerEvent::Reset(all) => *seen = all.into_iter().map(|n| (n.name, n.spec)).collect(),
            PeerEvent::Upsert(n) => drop(seen.insert(n.name, n.spec)),
            PeerEvent::Delete(n) => drop(seen.remove(&n)),
        }
        event
    };
    while seen.len() < 2 {
        next(&mut seen).await;
    }
    let names: Vec<String> = store1
        .snapshot()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["node1", "node2"]);
    store2
        .publish("node2", &spec(k2, "10.99.0.22"))
        .await
        .unwrap();
    while seen["node2"].endpoints[0].address != "10.99.0.22:51820" {
        next(&mut seen).await;
    }
    // A status write (every router's, every few seconds) is no event; a delete is. Routers
    // may not delete MeshPeers (an admin or the garbage collector does).
    let status = router::meshpeer::MeshPeerStatus {
        short_key: "HIgo9xNz".into(),
        ..Default::default()
    };
    store2.publish_status("node2", &status).await.unwrap();
    kubectl(&["delete", "meshpeer", "node1"]);
    assert_eq!(next(&mut seen).await, PeerEvent::Delete("node1".into()));
    // Routers may not touch what weft doesn't need.
    let secrets = Api::<Secret>::all(env.client("node1").await.unwrap())
        .list(&ListParams::default())
        .await;
    assert!(
        matches!(secrets, Err(kube::Error::Api(ref e)) if e.code == 403),
        "{secrets:?}"
    );
    // Leases: only in weft's namespace, and only the seed Lease by name.
    use k8s_openapi::api::coordination::v1::Lease;
    let router = env.client("node1").await.unwrap();
    let lease = |name: &str| Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let elsewhere = Api::<Lease>::namespaced(router.clone(), "kube-system")
        .create(&PostParams::default(), &lease("weft-ring-seed"))
        .await;
    assert!(
        matches!(elsewhere, Err(kube::Error::Api(ref e)) if e.code == 403),
        "a router created a Lease in kube-system: {elsewhere:?}"
    );
    let weft = Api::<Lease>::namespaced(router, "weft");
    weft.create(&PostParams::default(), &lease("weft-ring-seed"))
        .await
        .expect("the seed Lease in weft's namespace");
    let other = weft.get("kube-controller-manager").await;
    assert!(
        matches!(other, Err(kube::Error::Api(ref e)) if e.code == 403),
        "a router read a Lease other than the seed: {other:?}"
    );
}
