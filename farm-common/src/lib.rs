//! Types and functions shared by the farm XDP program (`farm-ebpf`) and the daemon.
//!
//! Everything here is `no_std` so that the kernel side and the user side compile the very same
//! code: the map layouts (`#[repr(C)]`, no implicit padding, network-order fields as byte arrays)
//! and the bucket hash. `farmctl whois` and the tests predict the owner of a client with exactly
//! the function the XDP program runs.
#![no_std]

pub mod hash;
pub mod maps;

pub use hash::{BucketKey, HashKey, Msg, bucket_of, bucket_of_msg, siphash13, siphash13_msg};
pub use maps::*;
