//! Trainable models as Meta Pseudo Labels drives them ([`Net`]): a text classifier (bag
//! model or encoder) with its parameters, optimizer and pass buffers ([`ModelNet`]), and a
//! dense stack over rows of features ([`DenseNet`]: reduced MPL's g(z) = z + MLP(z) over
//! fixed logits, and the small nets of the tests).

use crate::algo::mpl::Net;
use crate::backend::{Backend, DropoutKey, EncoderOps, GradSync, SparseRows};
use crate::model::mlp::{Mlp, MlpActs};
use crate::model::params::{Layout, Slot};
use crate::model::{Acts, Input, Model};
use crate::optim::{OptimConfig, Optimizer, TableGrad};

/// The buffers of a classifier's passes: activations, the dense gradient, a bag model's
/// table rows and its pooled gradient.
pub struct ModelBufs<B: Backend> {
    acts: Acts<B>,
    grads: B::Buf,
    table: SparseRows<B::Buf>,
    dpooled: B::Buf,
}

impl<B: Backend> ModelBufs<B> {
    pub fn new(be: &B, model: &Model) -> Self {
        ModelBufs {
            acts: Acts::new(be, model),
            grads: be.zeros(model.dense_len()),
            table: SparseRows::new(be.zeros(0), model.table_dim()),
            dpooled: be.zeros(0),
        }
    }
}

/// A classifier, its parameters and optimizer, borrowed for a step.
pub struct ModelNet<'a, B: Backend> {
    pub model: &'a Model,
    pub params: &'a mut B::Buf,
    pub opt: &'a mut Optimizer<B>,
    pub bufs: &'a mut ModelBufs<B>,
}

impl<B: EncoderOps> Net<B> for ModelNet<'_, B> {
    type Input = Input<B>;

    fn classes(&self) -> usize {
        self.model.classes()
    }

    fn forward(&mut self, be: &B, x: &Input<B>, n: usize, noise: Option<DropoutKey>) -> &B::Buf {
        self.model.forward(be, self.params, x, n, noise, &mut self.bufs.acts);
        self.bufs.acts.logits()
    }

    fn backward(&mut self, be: &B, x: &Input<B>, dlogits: &B::Buf) {
        let b = &mut *self.bufs;
        self.model.backward_dense(be, self.params, x, &b.acts, dlogits, &mut b.grads, &mut b.dpooled, None);
        if let (Some(bag), Some(dev)) = (self.model.bag(), x.bag()) {
            be.embedding_bag_backward(dev, &b.dpooled, bag.spec.dim, &mut b.table);
        }
    }

    fn update(&mut self, be: &B, lr: f64, sync: &dyn GradSync<B>) -> f64 {
        let b = &mut *self.bufs;
        let m = self.model;
        sync.average(be, &mut b.grads, Some(&mut b.table), m.table_rows());
        let norm = self.opt.step(
            be,
            m.layout(),
            m.table(),
            self.params,
            &mut b.grads,
            TableGrad::Rows(&mut b.table),
            lr,
        );
        be.fill_zero(&mut b.grads);
        b.table.rows.clear();
        norm
    }
}

/// A dense stack over rows of `input` features with its parameters and optimizer; with
/// `residual`, the output is `x + MLP(x)` (input width = outputs), which starts as the
/// identity because the output layer starts at zero.
pub struct DenseNet<B: Backend> {
    pub mlp: Mlp,
    pub layout: Layout,
    pub params: B::Buf,
    pub opt: Optimizer<B>,
    pub residual: bool,
    acts: MlpActs<B>,
    out: B::Buf,
    grads: B::Buf,
    dx: B::Buf,
    /// No table: an empty slot at the layout's end, and its (empty) gradient.
    none: Slot,
    no_rows: SparseRows<B::Buf>,
    key: Option<DropoutKey>,
    n: usize,
}

impl<B: Backend> DenseNet<B> {
    /// A stack `input → widths → outputs`, initialised from `seed`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        input: usize,
        widths: &[usize],
        outputs: usize,
        activation: crate::backend::Activation,
        dropout: f32,
        residual: bool,
        optim: OptimConfig,
        seed: u64,
    ) -> Self {
        assert!(!residual || input == outputs, "a residual stack maps a width to itself");
        let mut layout = Layout::new();
        let mlp = Mlp::new(&mut layout, input, widths, outputs, activation, dropout);
        let mut host = vec![<B::F as crate::backend::Real>::of(0.0); layout.total()];
        mlp.init(&mut host, seed);
        let none = Slot { offset: layout.total(), rows: 0, cols: 0 };
        let opt = Optimizer::new(be, &layout, none, optim);
        DenseNet {
            params: be.upload(&host),
            grads: be.zeros(layout.total()),
            acts: MlpActs::new(be, &mlp),
            out: be.zeros(0),
            dx: be.zeros(0),
            no_rows: SparseRows::new(be.zeros(0), 1),
            none,
            mlp,
            layout,
            opt,
            residual,
            key: None,
            n: 0,
        }
    }

    /// The empty slot standing for the table the optimizer expects.
    pub fn table_slot(&self) -> Slot {
        self.none
    }
}

impl<B: Backend> Net<B> for DenseNet<B> {
    type Input = B::Buf;

    fn classes(&self) -> usize {
        self.mlp.output.1.len()
    }

    fn forward(&mut self, be: &B, x: &B::Buf, n: usize, noise: Option<DropoutKey>) -> &B::Buf {
        (self.key, self.n) = (noise, n);
        self.mlp.forward(be, &self.params, x, n, noise, &mut self.acts, &mut self.out);
        if self.residual {
            be.axpy(&mut self.out, x, 1.0);
        }
        &self.out
    }

    fn backward(&mut self, be: &B, x: &B::Buf, dlogits: &B::Buf) {
        // The residual's path ends at the constant input: nothing to add.
        self.mlp.backward(
            be,
            &self.params,
            x,
            self.n,
            self.key,
            &self.acts,
            dlogits,
            &mut self.grads,
            &mut self.dx,
        );
    }

    fn update(&mut self, be: &B, lr: f64, sync: &dyn GradSync<B>) -> f64 {
        sync.average(be, &mut self.grads, None, 0);
        let norm = self.opt.step(
            be,
            &self.layout,
            self.none,
            &mut self.params,
            &mut self.grads,
            TableGrad::Rows(&mut self.no_rows),
            lr,
        );
        be.fill_zero(&mut self.grads);
        norm
    }
}
