//! strata: a FUSE overlay filesystem compatible with kernel overlayfs, and a container-image
//! layer toolkit.

#![deny(unsafe_op_in_unsafe_fn)]
// Every `unsafe` is in `sys/` (which allows it), behind fd-typed helpers.
#![deny(unsafe_code)]

pub mod build;
pub mod cli;
pub mod cmd;
pub mod container;
pub mod fuse;
pub mod image;
pub mod mounts;
pub mod overlay;
pub mod paths;
pub mod registry;
pub mod runtime;
pub mod sys;
