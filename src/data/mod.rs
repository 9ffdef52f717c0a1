//! Data: raw input → tokenized, split, sharded data sets on disk, and zero-copy reading back.

pub mod augment;
pub mod dataset;
pub mod input;
pub mod loader;
pub mod manifest;
pub mod prepare;
pub mod shard;
pub mod split;
pub mod subword;
pub mod tokenize;
pub mod vocab;
