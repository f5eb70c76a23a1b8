//! Activation recomputation, as `torch.utils.checkpoint.checkpoint_sequential`: the training forward keeps only
//! the tensors between segments of residual units; backward runs each segment's forward again, with its graph,
//! just before differentiating it, last segment first. One more forward pass per step buys the memory of all
//! saved activations down to one segment's plus the boundaries: with ⌈√units⌉ segments (Chen et al., 2016),
//! ResNet-1202's 600 units keep 25 boundaries and 24 units' activations at a time.
//!
//! The recomputed forward is the same arithmetic on the same inputs, so losses and gradients are the same bits as
//! without recomputation; the running BN statistics, which the second forward would update again, are put back.

use crate::param_store::is_buffer;
use crate::{Model, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::ops::Range;

/// Segments of `units` units: ⌈√units⌉ of them, as equal as possible (at least one, even for no units).
pub fn segments(units: usize) -> Vec<Range<usize>> {
    let count = units.isqrt() + usize::from(units.isqrt().pow(2) < units);
    let count = count.max(1);
    (0..count)
        .map(|s| s * units / count..(s + 1) * units / count)
        .collect()
}

/// A training-mode forward pass that kept only the segments' boundaries.
pub struct SegmentedForward<'a> {
    model: &'a Model,
    parts: Vec<Range<usize>>,
    /// `boundaries[s]` is what segment `s` reads (the images for s = 0).
    boundaries: Vec<Tensor>,
    /// The last segment's output, the head's input.
    top: Var,
    /// `[N, classes]`.
    pub logits: Tensor,
}

/// Segment `s` of `net`: (its stem when s = 0,) the units `parts[s]`, in training mode.
fn run_segment(model: &Model, parts: &[Range<usize>], s: usize, x: &Tensor) -> Result<Tensor> {
    let net = &model.net;
    let x = if s == 0 {
        net.stem_t(x, true)?
    } else {
        x.clone()
    };
    Ok(net.units_t(parts[s].clone(), &x, true)?)
}

/// The training-mode forward of `images` (BN running statistics updated) keeping only the segment boundaries.
pub fn forward<'a>(model: &'a Model, images: &Tensor) -> Result<SegmentedForward<'a>> {
    let parts = segments(model.net.unit_count());
    let mut boundaries = vec![images.clone()];
    for s in 0..parts.len() {
        // Detached: the segment's graph, and with it every activation inside it, is freed here.
        let out = run_segment(model, &parts, s, &boundaries[s])?.detach();
        boundaries.push(out);
    }
    let top = Var::from_tensor(&boundaries.pop().unwrap_or_else(|| images.clone()))?;
    let logits = model.net.head_t(top.as_tensor(), true)?;
    Ok(SegmentedForward {
        model,
        parts,
        boundaries,
        top,
        logits,
    })
}

impl SegmentedForward<'_> {
    /// The number of segments.
    pub fn segment_count(&self) -> usize {
        self.parts.len()
    }

    /// Bytes of the activations kept between segments (the images not counted).
    pub fn boundary_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.boundaries.iter().skip(1).map(bytes).sum::<usize>() + bytes(self.top.as_tensor())
    }

    /// The gradients of every variable of `loss` (computed from [`SegmentedForward::logits`]): the head's, then
    /// each segment's after running its forward again, last segment first.
    pub fn backward(mut self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let mut upstream = grads.remove(self.top.as_tensor());
        // The forward has updated the running statistics once; the recomputation must not count again.
        let running: Vec<(Var, Tensor)> = self
            .model
            .params
            .named_vars()
            .into_iter()
            .filter(|(name, _)| is_buffer(name))
            .map(|(_, v)| v.as_tensor().copy().map(|saved| (v, saved)))
            .collect::<candle_core::Result<_>>()?;
        for s in (0..self.parts.len()).rev() {
            let (Some(g), Some(boundary)) = (upstream.take(), self.boundaries.pop()) else {
                break;
            };
            // The images need no gradient; a boundary between segments becomes the variable it is taken for.
            let input = match s {
                0 => None,
                _ => Some(Var::from_tensor(&boundary)?),
            };
            let x = input.as_ref().map_or(&boundary, Var::as_tensor);
            let out = run_segment(self.model, &self.parts, s, x)?;
            // d(Σ out·g)/d out = g exactly: the segment's backward starts from the gradient that reached it.
            let mut segment_grads = (out * &g)?.sum_all()?.backward()?;
            // candle differentiates the product for `g` too; nothing needs that.
            segment_grads.remove(&g);
            upstream = input.and_then(|v| segment_grads.remove(v.as_tensor()));
            grads.extend(segment_grads)?;
        }
        for (var, value) in running {
            var.set(&value)?;
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_root_of_units_segments_cover_every_unit_once() {
        for (units, expected) in [
            (0, 1),
            (1, 1),
            (9, 3),
            (10, 4),
            (27, 6),
            (600, 25),
            (333, 19),
        ] {
            let parts = segments(units);
            assert_eq!(parts.len(), expected, "{units} units");
            assert_eq!(parts.first().map(|r| r.start), Some(0));
            assert_eq!(parts.last().map(|r| r.end), Some(units));
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
            let sizes: Vec<usize> = parts.iter().map(|r| r.len()).collect();
            let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
            assert!(hi.unwrap() - lo.unwrap() <= 1, "{sizes:?}");
        }
    }
}
