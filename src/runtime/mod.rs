//! Containers: named working copies of images, and running processes inside them.

pub mod container;
