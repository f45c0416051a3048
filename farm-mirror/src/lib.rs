//! Mirror mode: a directory replicated synchronously from the primary to the secondary.
//!
//! The design: on the primary, the application works in a FUSE filesystem in front of a local
//! backing directory; every change is applied there and shipped to the secondary in order, and
//! every fsync, fdatasync, O_SYNC/O_DSYNC write and fsync of a directory returns only once the
//! secondary has made everything before it durable. This crate has so far:
//! - `wire`: the replication protocol (operations by relative path, sync barriers and their
//!   acknowledgements), authenticated with a key derived from the cluster key, every frame
//!   tagged with its direction and number;
//! - `replica`: the secondary, which applies operations beneath its replica directory only
//!   (openat2 RESOLVE_BENEATH, no symlink followed) and acknowledges a barrier after syncfs;
//! - `link`: the primary's side: a full initial copy (sparse holes and hard links kept), then
//!   operations in order and syncs that complete once the secondary acknowledges them; a lost
//!   session or an overflowing queue makes the link degraded (loudly);
//! - `fs`: the primary's FUSE filesystem over the backing directory, which queues every change
//!   and answers fsync/fdatasync/O_SYNC writes/fsync of a directory once the secondary has
//!   acknowledged;
//! - `tree`: a tree's content digest, to prove a replica equal to its primary.

pub mod fs;
pub mod link;
pub mod replica;
pub mod resync;
pub mod state;
pub mod tree;
pub mod wire;
