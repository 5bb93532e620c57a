//! The package set is what the registry's configuration says: binary caches,
//! nixpkgs config and refusals, and the error texts clients print.

mod common;
