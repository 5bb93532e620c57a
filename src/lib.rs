//! Nixery: a container registry that builds images on demand from Nix packages.
//!
//! Dependencies point one way: `http` → `actors` → `storage` and Nix; the pure
//! modules (`reference`, `image`, `manifest`, `layers`, `archive`, `nix`, `signing`,
//! `config`, `error`) import no actor, HTTP server or storage code.

pub mod actors;
pub mod app;
pub mod archive;
pub mod config;
pub mod error;
pub mod http;
pub mod image;
pub mod layers;
pub mod manifest;
pub mod metrics;
pub mod nix;
pub mod pargzip;
pub mod process;
pub mod reference;
pub mod sbom;
pub mod signing;
pub mod source;
pub mod storage;
pub mod tags;
