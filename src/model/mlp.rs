//! The dense stack shared by every model: hidden layers (linear → activation → dropout) and a
//! linear output layer, with explicit forward and backward passes over slots of a flat
//! parameter buffer.
//!
//! Shapes (n rows, I = input width, Hk = hidden sizes, C = outputs):
//! ```text
//! h_k      n×Hk  = dropout(act(x_{k}·hidden.k.weightᵀ + hidden.k.bias), dropout)   site k+1
//! out      n×C   = x_L·output.weightᵀ + output.bias                                   (x_0 = input)
//! ```
//! Dropout site 0 is left to the layer that feeds the stack (the bag model's pooled
//! embedding).

use crate::backend::{Activation, Backend, DropoutKey, Real};
use crate::model::params::{fill_uniform, Layout, Slot};

/// The slots and settings of a dense stack.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    /// Input width I.
    pub input: usize,
    /// Hidden widths.
    pub widths: Vec<usize>,
    pub activation: Activation,
    /// Dropout after each hidden layer.
    pub dropout: f32,
    pub hidden: Vec<(Slot, Slot)>,
    pub output: (Slot, Slot),
}

/// Saved activations of one forward pass of the stack, for its backward pass.
pub struct MlpActs<B: Backend> {
    /// Per hidden layer: pre-activation and output (after dropout).
    pre: Vec<B::Buf>,
    post: Vec<B::Buf>,
}

impl<B: Backend> MlpActs<B> {
    /// Empty buffers; they grow to the batch's size on first use.
    pub fn new(be: &B, mlp: &Mlp) -> Self {
        let k = mlp.hidden.len();
        MlpActs { pre: (0..k).map(|_| be.zeros(0)).collect(), post: (0..k).map(|_| be.zeros(0)).collect() }
    }
}

impl Mlp {
    /// Adds the stack's tensors (`hidden.{k}.weight` [Hk, H(k−1)], `hidden.{k}.bias` [Hk],
    /// `output.weight` [C, H_last], `output.bias` [C]) to `layout`.
    pub fn new(
        layout: &mut Layout,
        input: usize,
        widths: &[usize],
        outputs: usize,
        activation: Activation,
        dropout: f32,
    ) -> Self {
        let mut width = input;
        let mut hidden = Vec::new();
        for (k, &h) in widths.iter().enumerate() {
            let w = layout.matrix(&format!("hidden.{k}.weight"), h, width);
            let b = layout.vector(&format!("hidden.{k}.bias"), h);
            hidden.push((w, b));
            width = h;
        }
        let output = (layout.matrix("output.weight", outputs, width), layout.vector("output.bias", outputs));
        Mlp { input, widths: widths.to_vec(), activation, dropout, hidden, output }
    }

    /// Initialises the stack's slots of `p`: hidden weights uniform in ±√(6/fan_in) (He)
    /// from `(seed, k + 1)`; biases and the output layer stay zero.
    pub fn init<F: Real>(&self, p: &mut [F], seed: u64) {
        for (k, (w, _)) in self.hidden.iter().enumerate() {
            fill_uniform(&mut p[w.range()], seed, k as u64 + 1, (6.0 / w.cols as f64).sqrt());
        }
    }

    /// Forward pass over `x` (n×I); `dropout` is `Some(key)` in training (its `site` is
    /// replaced by each layer's). The outputs go to `out` (n×C).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &B::Buf,
        n: usize,
        dropout: Option<DropoutKey>,
        acts: &mut MlpActs<B>,
        out: &mut B::Buf,
    ) {
        for (k, &(w, b)) in self.hidden.iter().enumerate() {
            let input = if k == 0 { x } else { &acts.post[k - 1] };
            be.linear_forward(input, n, params, w, b, &mut acts.pre[k]);
            be.activation_forward(self.activation, &acts.pre[k], &mut acts.post[k]);
            if let Some(key) = dropout {
                be.dropout(
                    self.dropout,
                    DropoutKey { site: k as u32 + 1, ..key },
                    self.widths[k],
                    &mut acts.post[k],
                );
            }
        }
        let last = if self.hidden.is_empty() { x } else { &acts.post[self.hidden.len() - 1] };
        be.linear_forward(last, n, params, self.output.0, self.output.1, out);
    }

    /// Backward pass for `dout` (n×C) of the forward pass that filled `acts` from `x` with
    /// `dropout`: accumulates the stack's gradients into `grads` (same layout as `params`)
    /// and writes `∂loss/∂x` (n×I) into `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &B::Buf,
        n: usize,
        dropout: Option<DropoutKey>,
        acts: &MlpActs<B>,
        dout: &B::Buf,
        grads: &mut B::Buf,
        dx: &mut B::Buf,
    ) {
        let last = if self.hidden.is_empty() { x } else { &acts.post[self.hidden.len() - 1] };
        be.linear_backward(last, n, params, self.output.0, self.output.1, dout, grads, Some(&mut *dx));
        let mut dpre = be.zeros(0);
        for (k, &(w, b)) in self.hidden.iter().enumerate().rev() {
            // dx is ∂L/∂post[k]: through dropout, then the activation.
            if let Some(key) = dropout {
                be.dropout(self.dropout, DropoutKey { site: k as u32 + 1, ..key }, self.widths[k], dx);
            }
            be.activation_backward(self.activation, &acts.pre[k], dx, &mut dpre);
            let input = if k == 0 { x } else { &acts.post[k - 1] };
            be.linear_backward(input, n, params, w, b, &dpre, grads, Some(&mut *dx));
        }
    }
}
