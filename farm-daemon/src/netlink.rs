//! Everything farmd asks of rtnetlink: facts about the interface, the VIP addresses, and the
//! NIC's unicast/multicast filter entry for the cluster MAC.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressFlags, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkXdp, XdpAttached},
    neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
};
use rtnetlink::Handle;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(std::io::Error),
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    #[error("{what}: {source}")]
    Request {
        what: String,
        source: rtnetlink::Error,
    },
}

impl NetlinkError {
    /// The errno of a kernel NACK, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => Some(-m.raw_code()),
            _ => None,
        }
    }
}

/// What farmd needs to know about its interface.
#[derive(Debug, Clone)]
pub struct LinkFacts {
    pub index: u32,
    pub mac: [u8; 6],
    pub up: bool,
    pub promiscuous: bool,
    /// An XDP program attached by anyone (mode, program id).
    pub xdp: Option<(String, u32)>,
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection; must be called inside a tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn link(&self, name: &str) -> Result<LinkFacts, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let msg = match links.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(NetlinkError::NoSuchInterface(name.into())),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Err(NetlinkError::NoSuchInterface(name.into()));
            }
            Err(source) => {
                return Err(NetlinkError::Request {
                    what: format!("reading interface {name}"),
                    source,
                });
            }
        };
        let mut mac = [0u8; 6];
        let mut xdp_mode = None;
        let mut prog_id = 0;
        for a in &msg.attributes {
            match a {
                LinkAttribute::Address(b) if b.len() == 6 => mac.copy_from_slice(b),
                LinkAttribute::Xdp(x) => {
                    for x in x {
                        match x {
                            LinkXdp::Attached(XdpAttached::None) => {}
                            LinkXdp::Attached(m) => xdp_mode = Some(format!("{m:?}")),
                            LinkXdp::ProgId(id) => prog_id = *id,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(LinkFacts {
            index: msg.header.index,
            mac,
            up: msg.header.flags.contains(LinkFlags::Up),
            promiscuous: msg.header.flags.contains(LinkFlags::Promisc),
            xdp: xdp_mode.map(|m| (m, prog_id)),
        })
    }

    /// Adds a VIP as a host address (/32, /128): no subnet route, never a primary address.
    /// IPv6 VIPs skip duplicate address detection: every member holds the address on purpose.
    pub async fn add_vip(&self, index: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        let mut req = self.handle.address().add(index, addr, host_prefix(addr));
        if addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute().await.map_err(|source| NetlinkError::Request {
            what: format!("adding VIP {addr}"),
            source,
        })
    }

    pub async fn del_vip(&self, index: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(addr);
        msg.header.prefix_len = host_prefix(addr);
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Address(addr));
        if addr.is_ipv4() {
            msg.attributes.push(AddressAttribute::Local(addr));
        }
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: format!("removing VIP {addr}"),
                source,
            })
    }

    /// Whether `addr` is configured on the interface (any prefix).
    pub async fn has_address(&self, index: u32, addr: IpAddr) -> Result<bool, NetlinkError> {
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = s.try_next().await.map_err(|source| NetlinkError::Request {
            what: "listing addresses".into(),
            source,
        })? {
            if m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(a) if *a == addr))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Adds the cluster MAC to the NIC's address filter (`bridge fdb add MAC dev IF self`): the
    /// kernel puts it in the unicast (or multicast) filter, or turns on promiscuous mode where the
    /// driver has no filter, and undoes exactly that on removal.
    pub async fn add_mac_filter(&self, index: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Own)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: format!(
                    "adding the cluster MAC {} to the interface's address filter",
                    crate::config::format_mac(&mac)
                ),
                source,
            })
    }

    pub async fn del_mac_filter(&self, index: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: format!(
                    "removing the cluster MAC {} from the interface's address filter",
                    crate::config::format_mac(&mac)
                ),
                source,
            })
    }
}

fn host_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}
