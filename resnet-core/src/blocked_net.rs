//! The folded network run in the channel-blocked layout on the CPU (`ops::blocked`): the input image is read
//! once into the stem's blocks, every unit stays blocked, and the head takes the global average pool.

use crate::folded::{FoldedConv, FoldedResNet, FoldedShortcut};
use crate::ops::blocked::{max_pool, zero_pad_shortcut, Blocked, BlockedConv, Source};
use crate::ops::cpu_slice::contiguous_f32;
use crate::ops::isa::Isa;
use crate::ops::linear::Linear;
use crate::ops::max_pool::MaxPool2d;
use crate::ops::parallel::on_rayon;
use crate::shortcut::ShortcutPath;
use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

/// The bytes of the largest activation of a pass of images through the net (`BlockedResNet::images_per_pass`).
/// CIFAR ResNet-56 at batch 500 (64 KB per image), img/s by pass size, one run each (AMD EPYC Zen 4, 2 threads):
/// 8 images 825, 16 849, 32 839, 64 806, the whole batch 780. Passes of 16 against the whole batch, 10
/// alternated rounds: a median 1.03× (0.98–1.08×; faster in 6, the other 4 within 2.3 %). The peak RSS falls
/// from 162 to 48 MB. Since the blocked Winograd kernels, passes of 32: the 64→64 layers on 8×8 then have GEMMs
/// of 48 tiles or more (`winograd::blocked_applies`) and leave the direct kernel; 16 → 32 images, 6 alternated
/// rounds: 1.067× (faster in 6; AVX2 1.083×, 3 of 4), ResNet-20 1.097× (4 of 4); 64 images level with 32.
const PASS_BYTES: usize = 2 << 20;

/// The fewest images per pass: enough to share a layer's work among the threads.
const MIN_IMAGES_PER_PASS: usize = 8;

#[derive(Debug, Clone)]
pub(crate) struct BlockedResNet {
    stem: BlockedConv,
    pool: Option<MaxPool2d>,
    units: Vec<BlockedUnit>,
    head: Linear,
}

#[derive(Debug, Clone)]
struct BlockedUnit {
    /// The last convolution adds the shortcut before its ReLU.
    branch: Vec<BlockedConv>,
    shortcut: Option<BlockedShortcut>,
}

#[derive(Debug, Clone)]
enum BlockedShortcut {
    Identity,
    ZeroPad {
        stride: usize,
        before: usize,
        after: usize,
    },
    Projection(BlockedConv),
}

impl BlockedResNet {
    /// `None` where a layer has no blocked kernel on `isa` (output channels not in whole blocks).
    pub(crate) fn new(net: &FoldedResNet, isa: Isa) -> Result<Option<Self>> {
        let conv = |c: &FoldedConv| -> Result<Option<BlockedConv>> {
            let (c_out, ..) = c.weight.dims4()?;
            if !BlockedConv::applies(isa, c_out) {
                return Ok(None);
            }
            let relu = c.op.epilogue.relu;
            let geometry = (c.op.stride, c.op.padding);
            BlockedConv::new(isa, &c.weight, &c.op.epilogue.bias, geometry, relu).map(Some)
        };
        let Some(stem) = conv(&net.stem)? else {
            return Ok(None);
        };
        let mut units = Vec::with_capacity(net.units.len());
        for unit in &net.units {
            let mut branch = Vec::with_capacity(unit.branch.len());
            for c in &unit.branch {
                let Some(c) = conv(c)? else { return Ok(None) };
                branch.push(c);
            }
            let shortcut = match &unit.shortcut {
                None => None,
                Some(FoldedShortcut::Projection(c)) => match conv(c)? {
                    Some(c) => Some(BlockedShortcut::Projection(c)),
                    None => return Ok(None),
                },
                Some(FoldedShortcut::Unchanged(ShortcutPath::Identity)) => {
                    Some(BlockedShortcut::Identity)
                }
                Some(FoldedShortcut::Unchanged(ShortcutPath::ZeroPad {
                    stride,
                    before,
                    after,
                })) => Some(BlockedShortcut::ZeroPad {
                    stride: *stride,
                    before: *before,
                    after: *after,
                }),
                Some(FoldedShortcut::Unchanged(ShortcutPath::Projection { .. })) => {
                    return Ok(None)
                }
            };
            units.push(BlockedUnit { branch, shortcut });
        }
        Ok(Some(Self {
            stem,
            pool: net.pool,
            units,
            head: Linear::new(&net.head)?,
        }))
    }

    /// Logits `[N, classes]` of a contiguous f32 CPU batch `[N, 3, H, W]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let chunk = self.images_per_pass((h, w));
        if n <= chunk {
            return self.forward_all(x);
        }
        // The passes run side by side, one per thread: each layer's tasks then come from the thread's own pass,
        // and no thread waits for the other at the end of every layer (rayon's sleeps and wake-ups between the
        // short layers of a pass were ~4 % of the time in `perf`, 0.04 % after). ResNet-56 at b500 against one pass
        // at a time, 8 alternated rounds (AMD EPYC Zen 4 only): a median 1.05× (1.02–1.09×, faster in 8).
        // The passes' own loops then run on rayon too (`on_rayon`), not on the kernel threads, which would only take
        // cores from the other passes.
        let firsts: Vec<usize> = (0..n).step_by(chunk).collect();
        let logits = firsts
            .into_par_iter()
            .with_max_len(1)
            .map(|first| {
                on_rayon(|| {
                    self.forward_all(&x.narrow(0, first, chunk.min(n - first))?.contiguous()?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&logits, 0)
    }

    /// Images per pass through the whole net. Each layer runs over the images of a pass; with many small images
    /// (CIFAR), a pass of as many images as keep its largest activation within [`PASS_BYTES`] runs from the
    /// cache instead of streaming every layer's input and output through memory. The convolutions compute an
    /// image the same way whatever the pass; the head's matrix product may round differently with its row count.
    /// ImageNet nets (3.2 MB per image at 224×224) run the batch in one pass.
    fn images_per_pass(&self, (h, w): (usize, usize)) -> usize {
        let per_image = self.largest_activation((h, w)) * std::mem::size_of::<f32>();
        match PASS_BYTES / per_image.max(1) {
            // Fewer images would leave the threads short of work.
            chunk if chunk >= MIN_IMAGES_PER_PASS => chunk,
            _ => usize::MAX,
        }
    }

    /// The most values one image has in a layer's output, for an `h`×`w` input.
    fn largest_activation(&self, (h, w): (usize, usize)) -> usize {
        let mut side = (self.stem.output_size(h), self.stem.output_size(w));
        let mut largest = self.stem.c_out() * side.0 * side.1;
        if let Some(pool) = &self.pool {
            side = (pool.output_size(side.0), pool.output_size(side.1));
        }
        for c in self.units.iter().flat_map(|u| &u.branch) {
            side = (c.output_size(side.0), c.output_size(side.1));
            largest = largest.max(c.c_out() * side.0 * side.1);
        }
        largest
    }

    fn forward_all(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let x = x.contiguous()?;
        // The batch is read where it lies (a copy was ~0.3 % of ResNet-50 at batch 1).
        let (storage, layout) = x.storage_and_layout();
        let pixels = match &*storage {
            Storage::Cpu(cpu) => contiguous_f32(cpu, layout, "blocked net input")?,
            _ => candle_core::bail!("blocked net: the input must be a CPU tensor"),
        };
        let image = Source::nchw(pixels, (n, c, h, w));
        let mut y = self.stem.forward(image, None)?;
        if let Some(pool) = &self.pool {
            y = max_pool(&y, pool)?;
        }
        for unit in &self.units {
            let made;
            let shortcut = match &unit.shortcut {
                None => None,
                Some(BlockedShortcut::Identity) => Some(&y),
                &Some(BlockedShortcut::ZeroPad {
                    stride,
                    before,
                    after,
                }) => {
                    made = zero_pad_shortcut(y.slice(), stride, before, after)?;
                    Some(&made)
                }
                Some(BlockedShortcut::Projection(c)) => {
                    made = c.forward(y.source(), None)?;
                    Some(&made)
                }
            };
            let Some((last, first)) = unit.branch.split_last() else {
                candle_core::bail!("folded residual unit without convolutions");
            };
            let mut b = None::<Blocked>;
            for c in first {
                b = Some(c.forward(b.as_ref().unwrap_or(&y).source(), None)?);
            }
            let next = last.forward(b.as_ref().unwrap_or(&y).source(), shortcut)?;
            y = next;
        }
        let logits = self.head.forward(&y.mean_pool(), n)?;
        Tensor::from_vec(logits, (n, self.head.outputs()), x.device())
    }
}
