//! One SGD training step — forward, loss, backward, update — the single function that `resnet-train` runs and
//! `resnet-infer bench --train` times, so the benchmark measures exactly what training does.

use crate::optim::Sgd;
use crate::recompute;
use crate::threads::on_pool;
use crate::{Model, Result};
use candle_core::{backprop::GradStore, Tensor, D};
use std::time::{Duration, Instant};

/// What one step produced.
pub struct TrainStep {
    /// `[N, classes]`, from the training-mode forward pass.
    pub logits: Tensor,
    /// The mean loss of the batch. When it is not finite, backward and the update were skipped: the parameters
    /// are those before the step.
    pub loss: f32,
    /// Wall time of the forward pass (with the loss), of backward and of the update.
    pub forward: Duration,
    pub backward: Duration,
    pub update: Duration,
    /// Segments whose activations backward recomputed (0 without recomputation).
    pub recomputed_segments: usize,
}

/// Cross-entropy with label smoothing ε, as `torch.nn.CrossEntropyLoss(label_smoothing=ε)`:
/// (1−ε)·CE + ε·mean over classes of −log p.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = candle_nn::loss::nll(&log_p, labels)?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = log_p.mean(D::Minus1)?.mean_all()?.neg()?;
    Ok(((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?)
}

/// How a training step runs, beyond the SGD settings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepOptions {
    /// ε of [`cross_entropy`].
    pub label_smoothing: f64,
    /// Keep only the activations between ⌈√units⌉ segments and recompute the rest in backward
    /// ([`crate::recompute`]): less memory, one more forward pass, the same results.
    pub recompute: bool,
}

/// What the gradient pass of one (micro-)batch produced, before any update.
pub struct BatchGradients {
    pub logits: Tensor,
    /// The mean loss of the batch. When it is not finite, backward was skipped and `grads` is empty.
    pub loss: f32,
    pub grads: GradStore,
    pub forward: Duration,
    pub backward: Duration,
    pub recomputed_segments: usize,
}

/// Forward in training mode (BN batch statistics, running averages updated), the loss and backward: the
/// gradients of the batch's mean loss. On the CPU each phase runs on rayon's pool ([`crate::threads::on_pool`]).
/// With recomputation, the segments' second forward passes are timed with backward.
pub fn batch_gradients(
    model: &Model,
    images: &Tensor,
    labels: &Tensor,
    options: &StepOptions,
) -> Result<BatchGradients> {
    let device = images.device().clone();
    let t0 = Instant::now();
    // `segmented`: the forward that kept only the segment boundaries, when recomputing.
    let (logits, loss, segmented) = on_pool(&device, || -> Result<_> {
        let (logits, segmented) = match options.recompute {
            true => {
                let pass = recompute::forward(model, images)?;
                (pass.logits.clone(), Some(pass))
            }
            false => (model.forward_t(images, true)?, None),
        };
        let loss = cross_entropy(&logits, labels, options.label_smoothing)?;
        Ok((logits, loss, segmented))
    })?;
    let recomputed_segments = segmented.as_ref().map_or(0, |p| p.segment_count());
    let loss_value = loss.to_scalar::<f32>()?;
    let t1 = Instant::now();
    let grads = if loss_value.is_finite() {
        on_pool(&device, || match segmented {
            Some(pass) => pass.backward(&loss),
            None => Ok(loss.backward()?),
        })?
    } else {
        GradStore::default()
    };
    Ok(BatchGradients {
        logits,
        loss: loss_value,
        grads,
        forward: t1 - t0,
        backward: t1.elapsed(),
        recomputed_segments,
    })
}

/// [`batch_gradients`] and one SGD update with `sgd`'s current learning rate (none when the loss is not finite).
pub fn train_step(
    model: &Model,
    sgd: &mut Sgd,
    images: &Tensor,
    labels: &Tensor,
    options: &StepOptions,
) -> Result<TrainStep> {
    let pass = batch_gradients(model, images, labels, options)?;
    let t2 = Instant::now();
    if pass.loss.is_finite() {
        on_pool(images.device(), || sgd.step(&pass.grads))?;
    }
    Ok(TrainStep {
        logits: pass.logits,
        loss: pass.loss,
        forward: pass.forward,
        backward: pass.backward,
        update: t2.elapsed(),
        recomputed_segments: pass.recomputed_segments,
    })
}
