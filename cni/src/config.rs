//! The plugin's inputs, parsed and checked before anything is changed: the network
//! configuration on stdin and the `CNI_*` environment variables.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;
use weft_node_api::Attachment;

use crate::spec::{self, CniError, CniResult, Result};

/// The network configuration, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The node API socket of weft-router.
    pub socket: PathBuf,
    /// Overrides the MTU weft-router hands out.
    pub mtu: Option<u32>,
    pub prev_result: Option<CniResult>,
    /// GC: the attachments still in use (`cni.dev/valid-attachments` or `cni.dev/attachments`).
    pub attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    prev_result: Option<CniResult>,
    /// The spec's name for the GC list; libcni also sends the same list as
    /// `cni.dev/attachments` (the name an earlier draft used), so both are read.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<RawAttachment>>,
    #[serde(default, rename = "cni.dev/attachments")]
    attachments: Option<Vec<RawAttachment>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The `cniVersion` of a configuration, if it can be read at all: errors are printed in it.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    Some(v.get("cniVersion")?.as_str()?.to_string())
}

impl NetConf {
    /// Parses stdin: not JSON → 6; unsupported version → 1; wrong shape or values → 7;
    /// an `ipam` section → 2 (weft-router allocates; another IPAM plugin would be ignored).
    /// Unknown fields (and `runtimeConfig`, `args`, `capabilities`) are accepted and ignored.
    pub fn parse(stdin: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                spec::DECODE_FAILURE,
                format!("decoding the network configuration on stdin as JSON: {e}"),
            )
        })?;
        let cni_version = match value.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            Some(_) => return Err(invalid("cniVersion must be a string")),
            None => return Err(invalid("cniVersion is missing")),
        };
        spec::check_version(&cni_version)?;
        if value.get("ipam").is_some_and(|v| !v.is_null()) {
            return Err(CniError::new(
                spec::UNSUPPORTED_FIELD,
                "the network configuration has an \"ipam\" section, but weft-router allocates \
                 pod addresses itself: remove it",
            ));
        }
        let raw: RawConf = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        if raw.name.is_empty() {
            return Err(invalid("name is empty"));
        }
        if raw.kind != "weft" {
            return Err(invalid(format!(
                "type is {:?}, expected \"weft\"",
                raw.kind
            )));
        }
        if let Some(mtu) = raw.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(invalid(format!("mtu {mtu} is outside 68..=65535")));
            }
        }
        let socket = match raw.socket {
            Some(s) if s.as_os_str().is_empty() => return Err(invalid("socket is empty")),
            Some(s) => s,
            None => PathBuf::from(weft_node_api::DEFAULT_SOCKET),
        };
        Ok(NetConf {
            cni_version,
            name: raw.name.clone(),
            socket,
            mtu: raw.mtu,
            prev_result: raw.prev_result,
            attachments: raw.valid_attachments.or(raw.attachments).map(|list| {
                list.into_iter()
                    .map(|a| Attachment {
                        network: raw.name.clone(),
                        container_id: a.container_id,
                        ifname: a.ifname,
                    })
                    .collect()
            }),
        })
    }
}

fn invalid(what: impl std::fmt::Display) -> CniError {
    CniError::new(
        spec::INVALID_CONFIG,
        format!("invalid network configuration: {what}"),
    )
}

/// The CNI command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: Option<&str>) -> Result<Self> {
        Ok(match s {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some(other) => {
                return Err(CniError::new(
                    spec::INVALID_ENV,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
                    ),
                ))
            }
            None => return Err(CniError::new(spec::INVALID_ENV, "CNI_COMMAND is not set")),
        })
    }
}

/// The per-attachment environment of ADD, DEL and CHECK, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub container_id: String,
    pub ifname: String,
    /// Empty on DEL when the runtime has no netns any more (containerd).
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS` pairs; weft uses none but checks their shape.
    pub args: Vec<(String, String)>,
}

impl Env {
    /// Reads the environment through `var` (so tests need no process environment).
    /// `netns_required`: ADD and CHECK need CNI_NETNS, DEL does not.
    pub fn parse(var: impl Fn(&str) -> Option<String>, netns_required: bool) -> Result<Self> {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let container_id =
            get("CNI_CONTAINERID").ok_or_else(|| env_err("CNI_CONTAINERID is not set"))?;
        check_container_id(&container_id)?;
        let ifname = get("CNI_IFNAME").ok_or_else(|| env_err("CNI_IFNAME is not set"))?;
        check_ifname(&ifname)?;
        let netns = get("CNI_NETNS").map(PathBuf::from);
        if netns_required && netns.is_none() {
            return Err(env_err("CNI_NETNS is not set"));
        }
        let args = parse_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Env {
            container_id,
            ifname,
            netns,
            args,
        })
    }

    /// This attachment on network `network` (the configuration's `name`).
    pub fn attachment(&self, network: &str) -> Attachment {
        Attachment {
            network: network.into(),
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

fn env_err(msg: impl Into<String>) -> CniError {
    CniError::new(spec::INVALID_ENV, msg)
}

/// The spec: alphanumeric plus `_`, `.` and `-`, starting alphanumeric.
fn check_container_id(id: &str) -> Result<()> {
    let ok_start = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok_start && ok_rest {
        Ok(())
    } else {
        Err(env_err(format!(
            "CNI_CONTAINERID {id:?} must be alphanumeric with '_', '.', '-' and start alphanumeric"
        )))
    }
}

/// A Linux interface name: 1-15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn check_ifname(name: &str) -> Result<()> {
    let bad = name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if bad {
        Err(env_err(format!(
            "CNI_IFNAME {name:?} is not a valid interface name"
        )))
    } else {
        Ok(())
    }
}

/// `K=V;K2=V2`: every pair needs a `=` and a non-empty key.
fn parse_args(s: &str) -> Result<Vec<(String, String)>> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(env_err(format!("CNI_ARGS: {pair:?} is not KEY=VALUE"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn conf(s: &str) -> Result<NetConf> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = conf(r#"{"cniVersion":"1.0.0","name":"weft","type":"weft"}"#).unwrap();
        assert_eq!(c.cni_version, "1.0.0");
        assert_eq!(c.socket, PathBuf::from(weft_node_api::DEFAULT_SOCKET));
        assert_eq!((c.mtu, c.prev_result, c.attachments), (None, None, None));
    }

    #[test]
    fn full_config_with_unknown_fields() {
        let c = conf(
            r#"{"cniVersion":"1.1.0","name":"weft","type":"weft","socket":"/tmp/w.sock",
                "mtu":1400,"runtimeConfig":{"portMappings":[]},"args":{"x":1},"whatever":[1],
                "prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.2/32"}]},
                "cni.dev/attachments":[{"containerID":"abc","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/w.sock"));
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.prev_result.unwrap().ips.len(), 1);
        let v = conf(
            r#"{"cniVersion":"1.1.0","name":"weft","type":"weft",
                "cni.dev/valid-attachments":[{"containerID":"v","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(v.attachments.unwrap()[0].container_id, "v");
        assert_eq!(
            c.attachments.unwrap(),
            vec![Attachment {
                network: "weft".into(),
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn config_errors_have_the_spec_codes() {
        let code = |s: &str| conf(s).unwrap_err().code;
        assert_eq!(code("not json"), spec::DECODE_FAILURE);
        assert_eq!(code(""), spec::DECODE_FAILURE);
        assert_eq!(
            code(r#"{"cniVersion":"0.4.0","name":"n","type":"weft"}"#),
            1
        );
        assert_eq!(
            code(r#"{"cniVersion":"9.9.9","name":"n","type":"weft"}"#),
            1
        );
        assert_eq!(code(r#"{"name":"n","type":"weft"}"#), 7);
        assert_eq!(code(r#"{"cniVersion":1,"name":"n","type":"weft"}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","type":"weft"}"#), 7);
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":10}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":"x"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"weft","socket":""}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"weft","prevResult":{"ips":3}}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"weft","ipam":{"type":"host-local"}}"#),
            spec::UNSUPPORTED_FIELD
        );
        assert_eq!(
            peek_version(b"{\"cniVersion\":\"1.0.0\"}").as_deref(),
            Some("1.0.0")
        );
        assert_eq!(peek_version(b"nope"), None);
    }

    fn env(pairs: &[(&str, &str)], netns_required: bool) -> Result<Env> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::parse(|k| map.get(k).cloned(), netns_required)
    }

    #[test]
    fn env_parsing() {
        let full = [
            ("CNI_CONTAINERID", "c0ffee-1_2.3"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p;"),
        ];
        let e = env(&full, true).unwrap();
        assert_eq!(e.container_id, "c0ffee-1_2.3");
        assert_eq!(e.netns, Some(PathBuf::from("/run/netns/x")));
        assert_eq!(e.args.len(), 2);
        // DEL without a netns (containerd).
        let e = env(
            &[
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", ""),
            ],
            false,
        )
        .unwrap();
        assert_eq!(e.netns, None);
    }

    #[test]
    fn env_errors_are_code_4() {
        let cases: &[&[(&str, &str)]] = &[
            &[("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/n")],
            &[("CNI_CONTAINERID", "c"), ("CNI_NETNS", "/n")],
            &[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")],
            &[
                ("CNI_CONTAINERID", "c/d"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/n"),
            ],
            &[
                ("CNI_CONTAINERID", "-c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/n"),
            ],
            &[
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "a/b"),
                ("CNI_NETNS", "/n"),
            ],
            &[
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "sixteen-chars-xx"),
                ("CNI_NETNS", "/n"),
            ],
            &[
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", ".."),
                ("CNI_NETNS", "/n"),
            ],
            &[
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "e"),
                ("CNI_NETNS", "/n"),
                ("CNI_ARGS", "x"),
            ],
        ];
        for c in cases {
            assert_eq!(env(c, true).unwrap_err().code, spec::INVALID_ENV, "{c:?}");
        }
    }

    #[test]
    fn commands() {
        assert_eq!(Command::parse(Some("ADD")).unwrap(), Command::Add);
        assert_eq!(Command::parse(Some("GC")).unwrap(), Command::Gc);
        assert_eq!(
            Command::parse(Some("add")).unwrap_err().code,
            spec::INVALID_ENV
        );
        assert_eq!(Command::parse(None).unwrap_err().code, spec::INVALID_ENV);
    }
}
