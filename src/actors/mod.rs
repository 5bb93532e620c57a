//! The actors: BuildCoordinator (one build per image), NixWorker (runs Nix, packs
//! layers), UploadActor (puts blobs into storage) and SignerActor (blob URLs).
//! HTTP handlers talk to these; the actors never call back into HTTP.

pub mod coordinator;
pub mod nix_serve;
pub mod nix_worker;
pub mod signer;
pub mod store_gc;
pub mod upload;
