//! farmd: the farm daemon, as a library so that farmctl, the tests and the benchmarks share its
//! types and its data plane.

pub mod announce;
pub mod assign;
pub mod checks;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod drill;
pub mod handover;
pub mod heartbeat;
pub mod hooks;
pub mod lateness;
pub mod membership;
pub mod metrics;
pub mod mirror;
pub mod mountns;
pub mod netlink;
pub mod node;
pub mod packet;
pub mod reload;
pub mod secret;
pub mod service;
pub mod sysctl;
pub mod ticker;
pub mod transition;
pub mod trust;
pub mod upgrade;
pub mod witness;
