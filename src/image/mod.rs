//! Images: the OCI store, layer tar <-> directory, commit, diff, history, save/load.
//! Never imports the FUSE adapter.

pub mod archive;
pub mod check;
pub mod commit;
pub mod config;
pub mod diff;
pub mod digest;
pub mod layer;
pub mod progress;
pub mod reference;
pub mod store;
pub mod tree;
