//! Nixery: a container registry that builds images on demand from Nix packages.
//!
//! Dependencies point one way: `http` → `actors` (the coordinator deduplicates
//! builds) → `pipeline` (the steps of a build, run on the NixWorker and UploadActor
//! actors) → `storage` and Nix; `state` holds what the HTTP handlers read without
//! asking an actor. The pure modules
//! (`reference`, `image`, `manifest`, `layers`, `archive`, `nix`, `signing`,
//! `config`, `error`) import no actor, HTTP server or storage code.

pub mod actors;
pub mod app;
pub mod archive;
pub mod auth;
pub mod blob_gc;
pub mod built;
pub mod compression;
pub mod config;
pub mod error;
pub mod http;
pub mod image;
pub mod layers;
pub mod limits;
pub mod logsink;
pub mod manifest;
pub mod metrics;
pub mod nix;
pub mod pargzip;
pub mod pipeline;
pub mod process;
pub mod reference;
pub mod sbom;
pub mod signing;
pub mod source;
pub mod state;
pub mod storage;
pub mod tags;
pub mod tls;
