//! IPv4 address arithmetic: CIDRs, half-open ranges, and the minimal CIDR cover of a range.
//!
//! Addresses are plain `u32`s inside the ring; conversion to [`Ipv4Addr`] happens at the edges.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::Error;

/// A half-open address range `[start, end)`. `end` is exclusive, so a range never contains
/// 255.255.255.255 (a universe is required to stay below it, see [`Cidr::universe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub start: u32,
    pub end: u32,
}

impl Range {
    pub fn new(start: u32, end: u32) -> Self {
        debug_assert!(start <= end, "range start {start} after end {end}");
        Range { start, end }
    }

    pub fn size(&self) -> u32 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    pub fn contains(&self, addr: u32) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The minimal list of CIDR blocks covering exactly this range, in address order.
    /// This is what becomes WireGuard AllowedIPs and routes.
    pub fn cidrs(&self) -> Vec<Cidr> {
        let mut out = Vec::new();
        let mut start = self.start;
        while start < self.end {
            // Largest block aligned at `start` that still fits before `end`.
            let align = if start == 0 {
                32
            } else {
                start.trailing_zeros()
            };
            let fit = 31 - (self.end - start).leading_zeros();
            let bits = align.min(fit);
            out.push(Cidr {
                addr: start,
                prefix: (32 - bits) as u8,
            });
            start += 1u32 << bits;
        }
        out
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}",
            Ipv4Addr::from(self.start),
            Ipv4Addr::from(self.end.wrapping_sub(1))
        )
    }
}

/// An IPv4 CIDR block; the address is always the network address (host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: u32,
    prefix: u8,
}

impl Cidr {
    /// A block from an address and prefix length; host bits must be zero.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, Error> {
        let addr = u32::from(addr);
        if prefix > 32 {
            return Err(Error::InvalidCidr(format!(
                "{}/{prefix}: prefix over 32",
                Ipv4Addr::from(addr)
            )));
        }
        let cidr = Cidr { addr, prefix };
        if addr & !cidr.mask() != 0 {
            return Err(Error::InvalidCidr(format!(
                "{}/{prefix}: host bits set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(addr),
                Ipv4Addr::from(addr & cidr.mask())
            )));
        }
        Ok(cidr)
    }

    /// A block suitable as the pod address universe: between /8 and /30, and not containing
    /// 255.255.255.255 (ranges are half-open over `u32`).
    pub fn universe(self) -> Result<Self, Error> {
        if !(8..=30).contains(&self.prefix) {
            return Err(Error::InvalidCidr(format!(
                "universe {self}: prefix must be /8 to /30"
            )));
        }
        if self.addr.checked_add(self.size_u64() as u32 - 1) == Some(u32::MAX) {
            return Err(Error::InvalidCidr(format!(
                "universe {self}: must not contain 255.255.255.255"
            )));
        }
        Ok(self)
    }

    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    fn size_u64(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    /// The block as a range. Only valid for blocks that do not end at 2^32 (any universe).
    pub fn range(&self) -> Range {
        Range::new(self.addr, (self.addr as u64 + self.size_u64()) as u32)
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == self.addr
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| Error::InvalidCidr(format!("{s}: missing /prefix")))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| Error::InvalidCidr(format!("{s}: bad IPv4 address")))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| Error::InvalidCidr(format!("{s}: bad prefix length")))?;
        Cidr::new(addr, prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: &str, b: &str) -> Range {
        Range::new(
            u32::from(a.parse::<Ipv4Addr>().unwrap()),
            u32::from(b.parse::<Ipv4Addr>().unwrap()),
        )
    }

    fn strs(c: Vec<Cidr>) -> Vec<String> {
        c.into_iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn aligned_range_is_one_cidr() {
        assert_eq!(strs(r("10.32.0.0", "10.48.0.0").cidrs()), ["10.32.0.0/12"]);
    }

    #[test]
    fn unaligned_range_decomposes_minimally() {
        assert_eq!(
            strs(r("10.0.0.1", "10.0.0.9").cidrs()),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/30", "10.0.0.8/32"]
        );
        assert!(r("10.0.0.5", "10.0.0.5").cidrs().is_empty());
    }

    #[test]
    fn parse_rejects_host_bits_and_bad_universe() {
        assert!("10.32.0.1/12".parse::<Cidr>().is_err());
        assert!("10.32.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        let c: Cidr = "10.32.0.0/12".parse().unwrap();
        assert_eq!(c.range().size(), 1 << 20);
        assert!(c.universe().is_ok());
        assert!("255.0.0.0/8".parse::<Cidr>().unwrap().universe().is_err());
        assert!("10.0.0.0/31".parse::<Cidr>().unwrap().universe().is_err());
    }
}
