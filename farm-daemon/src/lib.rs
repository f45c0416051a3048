//! farmd: the farm daemon, as a library so that farmctl and the tests share its types.

pub mod assign;
pub mod config;
pub mod secret;
