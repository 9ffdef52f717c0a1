//! dtrain: a data-parallel trainer for semi-supervised text classification.
//!
//! The crate is both the library and the `dtrain` binary (`main.rs`, CLI only). See
//! ARCHITECTURE.md for the code map and the invariants every module keeps.

pub mod algo;
pub mod backend;
pub mod bank;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod fsutil;
pub mod hostmem;
pub mod knn;
pub mod logits;
pub mod model;
pub mod optim;
pub mod plot;
pub mod predict;
pub mod pretrain;
pub mod propagate;
pub mod rng;
pub mod rowvec;
pub mod train;

pub use error::{Error, Result};
