//! The flat parameter layout: named tensors at offsets in one buffer, shared by parameters,
//! gradients, optimizer moments and EMA weights, and used as the safetensors tensor names.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::{mix64, Real};

/// Where one tensor lives in a flat buffer, and its shape (row-major).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// First element in the flat buffer.
    pub offset: usize,
    /// Rows (the first dimension; 1 for a vector).
    pub rows: usize,
    /// Columns (the last dimension).
    pub cols: usize,
}

impl Slot {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element range in the flat buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// One named tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The tensor's name, e.g. `output.weight`; also its safetensors name.
    pub name: String,
    /// Shape as stored: `[rows, cols]`, or `[cols]` for a vector.
    pub shape: Vec<usize>,
    /// Its place in the flat buffer.
    pub slot: Slot,
}

/// The ordered list of tensors of a model. Offsets are assigned in order, each tensor
/// starting at a multiple of [`ALIGN`] elements so that every tensor is 64-byte aligned for
/// vector loads on any backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    tensors: Vec<TensorSpec>,
    total: usize,
    /// Each tensor's index in `tensors` by name (a layout of thousands of layers is built
    /// in linear time).
    index: std::collections::HashMap<String, usize>,
}

/// Tensor alignment in elements (16 f32 = 64 bytes).
pub const ALIGN: usize = 16;

impl Layout {
    /// An empty layout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a matrix `[rows, cols]` named `name`; returns its slot.
    pub fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Slot {
        self.push(name, vec![rows, cols], rows, cols)
    }

    /// Appends a vector `[len]` named `name`; returns its slot.
    pub fn vector(&mut self, name: &str, len: usize) -> Slot {
        self.push(name, vec![len], 1, len)
    }

    fn push(&mut self, name: &str, shape: Vec<usize>, rows: usize, cols: usize) -> Slot {
        let previous = self.index.insert(name.to_owned(), self.tensors.len());
        assert!(previous.is_none(), "tensor {name} defined twice");
        let offset = self.total.div_ceil(ALIGN) * ALIGN;
        let slot = Slot { offset, rows, cols };
        self.total = offset + slot.len();
        self.tensors.push(TensorSpec { name: name.to_owned(), shape, slot });
        slot
    }

    /// Total elements of a flat buffer with this layout (padding included).
    pub fn total(&self) -> usize {
        self.total
    }

    /// The tensors in order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
}

/// Fills `p` uniformly in `[−bound, bound)`. Element `i` is a function of `(seed, tensor, i)`
/// alone (a counter-based hash), so a table is filled in parallel and the result does not
/// depend on the thread count. `tensor` tells a model's tensors apart.
pub fn fill_uniform<F: Real>(p: &mut [F], seed: u64, tensor: u64, bound: f64) {
    let base = mix64(seed ^ mix64(0x1417_u64 << 32 | tensor));
    p.par_chunks_mut(1 << 14).enumerate().for_each(|(c, chunk)| {
        for (k, v) in chunk.iter_mut().enumerate() {
            let i = (c << 14 | k) as u64;
            // 53 random bits → [0, 1), then to [−bound, bound).
            let u = (mix64(base ^ mix64(i)) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            *v = F::of((2.0 * u - 1.0) * bound);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_aligned_and_disjoint() {
        let mut l = Layout::new();
        let a = l.matrix("a", 3, 5);
        let b = l.vector("b", 7);
        let c = l.matrix("c", 2, 16);
        assert_eq!((a.offset, b.offset, c.offset), (0, 16, 32));
        assert_eq!(l.total(), 64);
        assert_eq!(l.get("b").unwrap().shape, [7]);
        assert!(a.range().end <= b.offset && b.range().end <= c.offset);
    }
}
