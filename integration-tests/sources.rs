//! Package sources over time: warm pulls that run no Nix, edits and moved branches
//! seen within their bounds, channels from a mirror, and a fresh machine.

mod common;
