//! Models: the flat parameter layout and the layers' explicit forward/backward passes.

pub mod bag;
pub mod encoder;
pub mod mlp;
pub mod params;
