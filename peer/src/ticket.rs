//! Tickets: a layer id and the providers that hold it, as one string.
//!
//! ```text
//! ticket := "xenod1" base32-lower-nopad(postcard(Ticket))
//! Ticket := { layer: [u8; 32], name: Option<String>,
//!             providers: [ { node: [u8; 32], addrs: [SocketAddr] } ] }
//! ```
//!
//! Base32 keeps the ticket to one word a shell or a terminal never splits
//! or wraps at punctuation.

use std::net::SocketAddr;
use std::str::FromStr;

use iroh::{EndpointAddr, EndpointId};
use serde::{Deserialize, Serialize};

use xenod_store::LayerId;

const PREFIX: &str = "xenod1";
/// Guards against a hostile ticket asking for thousands of dials.
const MAX_PROVIDERS: usize = 64;
const MAX_ADDRS: usize = 16;

/// A layer and where to get it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub layer: LayerId,
    /// The name it was shared under, for display (not trusted: names are
    /// only believed from signed records).
    pub name: Option<String>,
    pub providers: Vec<EndpointAddr>,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    layer: [u8; 32],
    name: Option<String>,
    providers: Vec<WireProvider>,
}

#[derive(Serialize, Deserialize)]
struct WireProvider {
    node: [u8; 32],
    addrs: Vec<SocketAddr>,
}

/// A string that is not a ticket.
#[derive(Debug, thiserror::Error)]
#[error("not a xenod ticket: {0}")]
pub struct TicketError(pub String);

impl std::fmt::Display for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = Wire {
            layer: *self.layer.as_bytes(),
            name: self.name.clone(),
            providers: self
                .providers
                .iter()
                .map(|p| WireProvider { node: *p.id.as_bytes(), addrs: p.ip_addrs().copied().collect() })
                .collect(),
        };
        let bytes = postcard::to_stdvec(&w).map_err(|_| std::fmt::Error)?;
        write!(f, "{PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&bytes).to_ascii_lowercase())
    }
}

impl FromStr for Ticket {
    type Err = TicketError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s.trim().strip_prefix(PREFIX).ok_or_else(|| TicketError(format!("does not start with {PREFIX}")))?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|e| TicketError(format!("base32: {e}")))?;
        let w: Wire = postcard::from_bytes(&bytes).map_err(|e| TicketError(format!("decoding: {e}")))?;
        if w.providers.len() > MAX_PROVIDERS || w.providers.iter().any(|p| p.addrs.len() > MAX_ADDRS) {
            return Err(TicketError("too many providers or addresses".into()));
        }
        let providers = w
            .providers
            .into_iter()
            .map(|p| {
                let id = EndpointId::from_bytes(&p.node).map_err(|e| TicketError(format!("provider id: {e}")))?;
                Ok(EndpointAddr::new(id).with_addrs(p.addrs.into_iter().map(iroh::TransportAddr::Ip)))
            })
            .collect::<Result<_, TicketError>>()?;
        Ok(Self { layer: LayerId::from_bytes(w.layer), name: w.name, providers })
    }
}

/// Parses `NODE@IP:PORT[,IP:PORT...]` (NODE in hex or base32, as iroh prints it).
pub fn parse_peer(s: &str) -> Result<EndpointAddr, TicketError> {
    let (node, addrs) = s.split_once('@').ok_or_else(|| TicketError(format!("{s:?}: expected NODE@ADDR")))?;
    let id = EndpointId::from_str(node).map_err(|e| TicketError(format!("{node:?}: {e}")))?;
    let mut out = EndpointAddr::new(id);
    for a in addrs.split(',') {
        out = out.with_ip_addr(a.parse().map_err(|e| TicketError(format!("{a:?}: {e}")))?);
    }
    Ok(out)
}

/// Formats `addr` the way [`parse_peer`] reads it.
pub fn format_peer(addr: &EndpointAddr) -> String {
    let addrs: Vec<String> = addr.ip_addrs().map(|a| a.to_string()).collect();
    format!("{}@{}", addr.id, addrs.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let node = iroh::SecretKey::from_bytes(&[7; 32]).public();
        let t = Ticket {
            layer: LayerId::of(b"layer"),
            name: Some("template://a/b".into()),
            providers: vec![
                EndpointAddr::new(node).with_ip_addr("127.0.0.1:4000".parse().unwrap()),
                EndpointAddr::new(node),
            ],
        };
        let s = t.to_string();
        assert!(s.starts_with("xenod1") && s.chars().all(|c| c.is_ascii_alphanumeric()), "{s}");
        assert_eq!(s.parse::<Ticket>().unwrap(), t);
        assert_eq!(s.to_ascii_uppercase().replace("XENOD1", "xenod1").parse::<Ticket>().unwrap(), t);
        assert!("xenod2abc".parse::<Ticket>().is_err());
        assert!("xenod1!!".parse::<Ticket>().is_err());
        assert!(s[..s.len() - 4].parse::<Ticket>().is_err());

        let p = parse_peer(&format!("{node}@127.0.0.1:1,[::1]:2")).unwrap();
        assert_eq!(p.ip_addrs().count(), 2);
        assert_eq!(parse_peer(&format_peer(&p)).unwrap(), p);
        assert!(parse_peer("nonsense").is_err());
    }
}
