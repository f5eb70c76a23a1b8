//! The gradients of several micro-batches (gradient accumulation) or of several data-parallel ranks, summed in
//! one flat vector over the trainable parameters, in their order: one buffer to add to, to all-reduce in
//! buckets and to hand back to SGD as the mean.

use crate::{ResNetError, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};

pub struct GradientSum {
    vars: Vec<Var>,
    /// Start of each parameter in the flat vector; one more entry for the end.
    offsets: Vec<usize>,
    sum: Option<Tensor>,
    batches: usize,
}

impl GradientSum {
    /// An empty sum over `vars` (the trainable parameters, in the order every rank lists them).
    pub fn new(vars: &[(String, Var)]) -> Self {
        let mut offsets = vec![0];
        for (_, v) in vars {
            offsets.push(offsets[offsets.len() - 1] + v.elem_count());
        }
        Self {
            vars: vars.iter().map(|(_, v)| v.clone()).collect(),
            offsets,
            sum: None,
            batches: 0,
        }
    }

    /// Elements of the flat vector: the number of trainable parameters.
    pub fn len(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batches added since the sum was last taken.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Adds one batch's gradients. A parameter without a gradient counts as zero.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        let parts = self
            .vars
            .iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.detach().to_dtype(DType::F32)?.flatten_all()?),
                None => Ok(Tensor::zeros(v.elem_count(), DType::F32, v.device())?),
            })
            .collect::<Result<Vec<_>>>()?;
        let flat = Tensor::cat(&parts, 0)?;
        self.sum = Some(match self.sum.take() {
            Some(sum) => (sum + flat)?,
            None => flat,
        });
        self.batches += 1;
        Ok(())
    }

    /// The flat sum, leaving this empty for the next step.
    pub fn take(&mut self) -> Result<Tensor> {
        self.batches = 0;
        self.sum.take().ok_or_else(|| ResNetError::Invalid {
            what: "gradient sum".into(),
            reason: "no batch was added".into(),
        })
    }

    /// `flat · scale` cut back into one gradient per parameter, for [`crate::optim::Sgd::step`].
    pub fn to_grad_store(&self, flat: &Tensor, scale: f64) -> Result<GradStore> {
        if flat.elem_count() != self.len() {
            return Err(ResNetError::Invalid {
                what: "gradient vector".into(),
                reason: format!(
                    "has {} elements, the parameters {}",
                    flat.elem_count(),
                    self.len()
                ),
            });
        }
        let flat = if scale == 1.0 {
            flat.clone()
        } else {
            (flat * scale)?
        };
        let mut store = GradStore::default();
        for (i, v) in self.vars.iter().enumerate() {
            let (start, end) = (self.offsets[i], self.offsets[i + 1]);
            let grad = flat.narrow(0, start, end - start)?.reshape(v.shape())?;
            store.insert(v.as_tensor(), grad.to_dtype(v.dtype())?);
        }
        Ok(store)
    }
}
