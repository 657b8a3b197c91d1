//! CNI specification types: versions, the error object and its codes, the ADD result.
//!
//! Error codes: the spec's (1-99) and weft's own (100+):
//!
//! | code | meaning |
//! | --- | --- |
//! | 1 | incompatible CNI version |
//! | 2 | unsupported field in the network configuration (e.g. an `ipam` section) |
//! | 3 | container unknown or does not exist (netns path missing, CHECK on an unknown attachment) |
//! | 4 | invalid necessary environment variables |
//! | 5 | I/O failure (reading stdin, writing stdout) |
//! | 6 | failed to decode content (stdin is not JSON) |
//! | 7 | invalid network configuration |
//! | 11 | try again later: weft-router unreachable or busy |
//! | 50 | plugin not available (STATUS: weft-router unreachable or not ready) |
//! | 100 | the interface already exists in the netns (ADD) |
//! | 101 | a netlink operation failed |
//! | 102 | the bridge named by weft-router does not exist |
//! | 103 | entering the netns failed |
//! | 104 | weft-router refused the request or answered something unexpected |
//! | 105 | CHECK: the live state differs from prevResult |

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Versions this plugin accepts and answers in; results echo the requested one.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];
/// The newest supported version: used in errors when the request's version is unknown.
pub const LATEST_VERSION: &str = "1.1.0";

pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const UNSUPPORTED_FIELD: u32 = 2;
pub const UNKNOWN_CONTAINER: u32 = 3;
pub const INVALID_ENV: u32 = 4;
pub const IO_FAILURE: u32 = 5;
pub const DECODE_FAILURE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
pub const NOT_AVAILABLE: u32 = 50;
pub const IFACE_EXISTS: u32 = 100;
pub const NETLINK_FAILURE: u32 = 101;
pub const BRIDGE_MISSING: u32 = 102;
pub const NETNS_FAILURE: u32 = 103;
pub const ROUTER_REFUSED: u32 = 104;
pub const CHECK_MISMATCH: u32 = 105;

/// A CNI error: printed as JSON on stdout, exit code 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The spec's error object, in the given version.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"unprintable error\"}}", self.code))
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

/// Checks a requested version: accepted only if listed in [`SUPPORTED_VERSIONS`].
pub fn check_version(requested: &str) -> Result<()> {
    if SUPPORTED_VERSIONS.contains(&requested) {
        Ok(())
    } else {
        Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "CNI version {requested:?} is not supported; weft supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ))
    }
}

/// The version to print an error in: the request's when supported, else the latest.
pub fn error_version(requested: Option<&str>) -> &str {
    match requested {
        Some(v) if SUPPORTED_VERSIONS.contains(&v) => v,
        _ => LATEST_VERSION,
    }
}

/// The VERSION command's answer.
pub fn version_json() -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct VersionInfo {
        cni_version: &'static str,
        supported_versions: [&'static str; 2],
    }
    serde_json::to_string(&VersionInfo {
        cni_version: LATEST_VERSION,
        supported_versions: SUPPORTED_VERSIONS,
    })
    .unwrap_or_default()
}

/// The ADD result (also read back as `prevResult`, leniently: unknown fields are ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Only in 1.1.0 results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; empty for host interfaces.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR notation, e.g. `10.32.0.5/32`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// What ADD wired, for building the result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wired {
    pub host_ifname: String,
    pub host_mac: String,
    pub pod_ifname: String,
    pub pod_mac: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

impl CniResult {
    /// The ADD result for `wired`, in `cni_version` (1.1.0 adds the interfaces' MTU).
    pub fn for_add(cni_version: &str, w: &Wired) -> Self {
        let mtu = (cni_version != "1.0.0" && w.mtu > 0).then_some(w.mtu);
        CniResult {
            cni_version: cni_version.to_string(),
            interfaces: vec![
                Interface {
                    name: w.host_ifname.clone(),
                    mac: w.host_mac.clone(),
                    mtu,
                    sandbox: String::new(),
                },
                Interface {
                    name: w.pod_ifname.clone(),
                    mac: w.pod_mac.clone(),
                    mtu,
                    sandbox: w.netns.clone(),
                },
            ],
            ips: vec![IpConfig {
                address: format!("{}/{}", w.ip, w.prefix),
                gateway: Some(w.gateway),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some(w.gateway),
            }],
            dns: Dns::default(),
        }
    }

    /// The IPv4 addresses configured on the interface named `ifname` (CHECK).
    pub fn addresses_of(&self, ifname: &str) -> Vec<(Ipv4Addr, u8)> {
        self.ips
            .iter()
            .filter(|ip| match ip.interface {
                Some(i) => self
                    .interfaces
                    .get(i)
                    .is_some_and(|iface| iface.name == ifname),
                None => true,
            })
            .filter_map(|ip| parse_cidr(&ip.address))
            .collect()
    }
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some(())?;
    Some((ip.parse().ok()?, len))
}

/// Formats a hardware address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn wired() -> Wired {
        Wired {
            host_ifname: "wft0123456789a".into(),
            host_mac: "aa:bb:cc:dd:ee:01".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "aa:bb:cc:dd:ee:02".into(),
            netns: "/run/netns/pod".into(),
            ip: Ipv4Addr::new(10, 32, 0, 5),
            prefix: 32,
            gateway: Ipv4Addr::new(10, 32, 0, 1),
            mtu: 1420,
        }
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(11, "router down").with_details("connect: ENOENT");
        let v: Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion":"1.0.0","code":11,"msg":"router down","details":"connect: ENOENT"})
        );
        let v: Value = serde_json::from_str(&CniError::new(4, "x").to_json("1.1.0")).unwrap();
        assert_eq!(v, json!({"cniVersion":"1.1.0","code":4,"msg":"x"}));
    }

    #[test]
    fn version_negotiation() {
        assert!(check_version("1.0.0").is_ok());
        assert!(check_version("1.1.0").is_ok());
        for bad in ["0.4.0", "0.3.1", "2.0.0", "", "1.0"] {
            assert_eq!(
                check_version(bad).unwrap_err().code,
                INCOMPATIBLE_VERSION,
                "{bad}"
            );
        }
        assert_eq!(error_version(Some("1.0.0")), "1.0.0");
        assert_eq!(error_version(Some("0.4.0")), LATEST_VERSION);
        assert_eq!(error_version(None), LATEST_VERSION);
        let v: Value = serde_json::from_str(&version_json()).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion":"1.1.0","supportedVersions":["1.0.0","1.1.0"]})
        );
    }

    #[test]
    fn add_result_json_1_0_0() {
        let v = serde_json::to_value(CniResult::for_add("1.0.0", &wired())).unwrap();
        assert_eq!(
            v,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "wft0123456789a", "mac": "aa:bb:cc:dd:ee:01"},
                    {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/pod"}
                ],
                "ips": [{"address": "10.32.0.5/32", "gateway": "10.32.0.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.32.0.1"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn add_result_1_1_0_carries_mtu_and_round_trips() {
        let r = CniResult::for_add("1.1.0", &wired());
        assert_eq!(r.interfaces[1].mtu, Some(1420));
        let back: CniResult = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            back.addresses_of("eth0"),
            vec![(Ipv4Addr::new(10, 32, 0, 5), 32)]
        );
        assert!(back.addresses_of("eth1").is_empty());
    }

    #[test]
    fn prev_result_is_read_leniently() {
        let r: CniResult = serde_json::from_value(json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.1.2.3/24"}],
            "somethingNew": true
        }))
        .unwrap();
        assert_eq!(
            r.addresses_of("eth0"),
            vec![(Ipv4Addr::new(10, 1, 2, 3), 24)]
        );
    }

    #[test]
    fn cidr_and_mac_formatting() {
        assert_eq!(
            parse_cidr("10.0.0.1/32"),
            Some((Ipv4Addr::new(10, 0, 0, 1), 32))
        );
        assert_eq!(parse_cidr("10.0.0.1/33"), None);
        assert_eq!(parse_cidr("10.0.0.1"), None);
        assert_eq!(parse_cidr("fe80::1/64"), None);
        assert_eq!(format_mac(&[0, 0x1a, 0xff]), "00:1a:ff");
    }
}
