// Copyright (c) 2019 Cloudflare, Inc. All rights reserved.
// SPDX-License-Identifier: BSD-3-Clause

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6},
    str::FromStr,
};

use ip_network::IpNetwork;
use parking_lot::RwLock;
use socket2::{Domain, Protocol, Type};

use crate::{
    device::Error,
    noise::{Tunn, TunnResult},
};

#[derive(Default, Debug)]
pub struct Endpoint {
    pub addr: Option<SocketAddr>,
    pub conn: Option<socket2::Socket>,
}

pub struct Peer {
    /// The associated tunnel struct
    pub(crate) tunnel: Tunn,
    /// The index the tunnel uses
    index: u32,
    endpoint: RwLock<Endpoint>,
    /// The networks this peer may send from. A list (weft): a peer has a few, and a trie's
    /// preallocated nodes cost every peer 4 KiB (22 MiB at 5000 peers). The device-wide
    /// lookup of a destination stays a trie.
    allowed_ips: Vec<IpNetwork>,
    preshared_key: Option<[u8; 32]>,
}

#[derive(Copy, Clone, Ord, PartialOrd, Eq, PartialEq, Hash, Debug)]
pub struct AllowedIP {
    pub addr: IpAddr,
    pub cidr: u8,
}

impl FromStr for AllowedIP {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ip: Vec<&str> = s.split('/').collect();
        if ip.len() != 2 {
            return Err("Invalid IP format".to_owned());
        }

        let (addr, cidr) = (ip[0].parse::<IpAddr>(), ip[1].parse::<u8>());
        match (addr, cidr) {
            (Ok(addr @ IpAddr::V4(_)), Ok(cidr)) if cidr <= 32 => Ok(AllowedIP { addr, cidr }),
            (Ok(addr @ IpAddr::V6(_)), Ok(cidr)) if cidr <= 128 => Ok(AllowedIP { addr, cidr }),
            _ => Err("Invalid IP format".to_owned()),
        }
    }
}

impl Peer {
    pub fn new(
        tunnel: Tunn,
        index: u32,
        endpoint: Option<SocketAddr>,
        allowed_ips: &[AllowedIP],
        preshared_key: Option<[u8; 32]>,
    ) -> Peer {
        Peer {
            tunnel,
            index,
            endpoint: RwLock::new(Endpoint {
                addr: endpoint,
                conn: None,
            }),
            allowed_ips: {
                let mut nets: Vec<IpNetwork> = allowed_ips
                    .iter()
                    .map(|ip| {
                        IpNetwork::new_truncate(ip.addr, ip.cidr).expect("cidr is valid length")
                    })
                    .collect();
                nets.sort_unstable();
                nets.dedup();
                nets.shrink_to_fit();
                nets
            },
            preshared_key,
        }
    }

    pub fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> TunnResult<'a> {
        self.tunnel.update_timers(dst)
    }

    pub fn endpoint(&self) -> parking_lot::RwLockReadGuard<'_, Endpoint> {
        self.endpoint.read()
    }

    pub(crate) fn endpoint_mut(&self) -> parking_lot::RwLockWriteGuard<'_, Endpoint> {
        self.endpoint.write()
    }

    pub fn shutdown_endpoint(&self) {
        if let Some(conn) = self.endpoint.write().conn.take() {
            tracing::info!("Disconnecting from endpoint");
            conn.shutdown(Shutdown::Both).unwrap();
        }
    }

    pub fn set_endpoint(&self, addr: SocketAddr) -> bool {
        let mut endpoint = self.endpoint.write();
        if endpoint.addr == Some(addr) {
            false
        } else {
            // We only need to update the endpoint if it differs from the current one
            if let Some(conn) = endpoint.conn.take() {
                conn.shutdown(Shutdown::Both).unwrap();
            }

            endpoint.addr = Some(addr);
            true
        }
    }

    pub fn connect_endpoint(
        &self,
        port: u16,
        #[allow(unused)] fwmark: Option<u32>,
    ) -> Result<socket2::Socket, Error> {
        let mut endpoint = self.endpoint.write();

        if endpoint.conn.is_some() {
            return Err(Error::Connect("Connected".to_owned()));
        }

        let addr = endpoint
            .addr
            .expect("Attempt to connect to undefined endpoint");

        let udp_conn =
            socket2::Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::UDP))?;
        udp_conn.set_reuse_address(true)?;
        let bind_addr = if addr.is_ipv4() {
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into()
        } else {
            SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0).into()
        };
        udp_conn.bind(&bind_addr)?;
        udp_conn.connect(&addr.into())?;
        udp_conn.set_nonblocking(true)?;

        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        if let Some(fwmark) = fwmark {
            udp_conn.set_mark(fwmark)?;
        }

        tracing::info!(
            message="Connected endpoint",
            port=port,
            endpoint=?endpoint.addr.unwrap()
        );

        endpoint.conn = Some(udp_conn.try_clone().unwrap());

        Ok(udp_conn)
    }

    pub fn is_allowed_ip<I: Into<IpAddr>>(&self, addr: I) -> bool {
        let addr = addr.into();
        self.allowed_ips.iter().any(|net| net.contains(addr))
    }

    pub fn allowed_ips(&self) -> impl Iterator<Item = (IpAddr, u8)> + '_ {
        self.allowed_ips
            .iter()
            .map(|net| (net.network_address(), net.netmask()))
    }

    pub fn time_since_last_handshake(&self) -> Option<std::time::Duration> {
        self.tunnel.time_since_last_handshake()
    }

    pub fn last_handshake_time(&self) -> Option<std::time::Duration> {
        self.tunnel.last_handshake_time()
    }

    pub fn persistent_keepalive(&self) -> Option<u16> {
        self.tunnel.persistent_keepalive()
    }

    pub fn preshared_key(&self) -> Option<&[u8; 32]> {
        self.preshared_key.as_ref()
    }

    pub fn index(&self) -> u32 {
        self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // (weft) The per-peer source check is a list now: it must answer as the trie did.
    #[test]
    fn allowed_ips_list_matches_networks_and_reports_them_once() {
        let secret = x25519_dalek::StaticSecret::random();
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::random());
        let tunn = Tunn::new(secret, public, None, None, 1, None);
        let ips: Vec<AllowedIP> = ["10.40.0.7/14", "10.40.0.0/14", "fd00::1/64", "192.0.2.9/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let peer = Peer::new(tunn, 1, None, &ips, None);
        for (addr, want) in [
            ("10.40.0.1", true),
            ("10.43.255.255", true),
            ("10.44.0.0", false),
            ("10.39.255.255", false),
            ("fd00::ffff", true),
            ("fd00:0:0:1::", false),
            ("192.0.2.9", true),
            ("192.0.2.8", false),
        ] {
            let addr: IpAddr = addr.parse().unwrap();
            assert_eq!(peer.is_allowed_ip(addr), want, "{addr}");
        }
        let mut listed: Vec<String> = peer
            .allowed_ips()
            .map(|(ip, cidr)| format!("{ip}/{cidr}"))
            .collect();
        listed.sort();
        assert_eq!(listed, ["10.40.0.0/14", "192.0.2.9/32", "fd00::/64"]);
    }
}
