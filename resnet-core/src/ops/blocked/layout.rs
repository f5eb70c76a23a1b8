//! The channel-blocked activation layout `[N, C/B, H, W, B]` (NCHW8c for AVX2 and portable code, NCHW16c for
//! AVX-512), its conversions from and to NCHW, and the zero-bordered copy a padded convolution reads.

use crate::ops::cpu_slice::Scratch;
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Activations of `n` images of `c` channels on an `h`×`w` plane, channels in blocks of `lanes`:
/// element `(img, ch, y, x)` is at `(((img·C/B + ch/B)·h + y)·w + x)·B + ch % B`.
///
/// The elements are a pooled buffer ([`Scratch`]): freed activations of one forward pass are the next one's,
/// without the allocator handing the pages back to the system in between (which cost page faults on every layer).
pub struct Blocked {
    pub(super) data: Scratch,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub lanes: usize,
}

impl Blocked {
    pub(super) fn blocks(&self) -> usize {
        self.c / self.lanes
    }

    /// The layout of a contiguous `[N, C, H, W]` CPU tensor, `C` a multiple of `lanes`.
    pub fn from_nchw(x: &Tensor, lanes: usize) -> Result<Blocked> {
        let (n, c, h, w) = x.dims4()?;
        if !c.is_multiple_of(lanes) {
            candle_core::bail!("blocked layout: {c} channels are not blocks of {lanes}");
        }
        let src = x.flatten_all()?.to_vec1::<f32>()?;
        let plane = h * w;
        let mut data = Scratch::zeroed(src.len());
        data.par_chunks_mut(plane * lanes)
            .enumerate()
            .for_each(|(block, dst)| {
                let (img, cb) = (block / (c / lanes), block % (c / lanes));
                for lane in 0..lanes {
                    let s = &src[(img * c + cb * lanes + lane) * plane..][..plane];
                    for (p, v) in s.iter().enumerate() {
                        dst[p * lanes + lane] = *v;
                    }
                }
            });
        Ok(Blocked {
            data,
            n,
            c,
            h,
            w,
            lanes,
        })
    }

    /// Back to `[N, C, H, W]`.
    pub fn to_nchw(&self) -> Result<Tensor> {
        let (plane, lanes) = (self.h * self.w, self.lanes);
        let mut out = vec![0f32; self.data.len()];
        out.par_chunks_mut(plane).enumerate().for_each(|(row, dst)| {
            let (img, ch) = (row / self.c, row % self.c);
            let src = &self.data[(img * self.blocks() + ch / lanes) * plane * lanes..];
            for (p, v) in dst.iter_mut().enumerate() {
                *v = src[p * lanes + ch % lanes];
            }
        });
        Tensor::from_vec(out, (self.n, self.c, self.h, self.w), &Device::Cpu)
    }

    /// The global average pool: `[N, C]`, each mean summed over the plane in order.
    pub fn mean_pool(&self) -> Result<Tensor> {
        let (plane, lanes) = (self.h * self.w, self.lanes);
        let mut out = vec![0f32; self.n * self.c];
        out.par_chunks_mut(lanes).enumerate().for_each(|(block, dst)| {
            for pixel in self.data[block * plane * lanes..][..plane * lanes].chunks_exact(lanes) {
                dst.iter_mut().zip(pixel).for_each(|(d, v)| *d += v);
            }
            dst.iter_mut().for_each(|d| *d /= plane as f32);
        });
        Tensor::from_vec(out, (self.n, self.c), &Device::Cpu)
    }
}

/// What a convolution reads: the blocked output of a layer, or the network's `[N, C, H, W]` input.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Blocked(&'a Blocked),
    Nchw {
        data: &'a [f32],
        n: usize,
        c: usize,
        h: usize,
        w: usize,
    },
}

impl Source<'_> {
    /// `(n, c, h, w)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        match *self {
            Source::Blocked(b) => (b.n, b.c, b.h, b.w),
            Source::Nchw { n, c, h, w, .. } => (n, c, h, w),
        }
    }

    /// Element `(img, ch, y, x)`.
    fn at(&self, img: usize, ch: usize, y: usize, x: usize) -> f32 {
        match *self {
            Source::Blocked(b) => {
                let l = b.lanes;
                b.data[(((img * b.blocks() + ch / l) * b.h + y) * b.w + x) * l + ch % l]
            }
            Source::Nchw { data, c, h, w, .. } => data[((img * c + ch) * h + y) * w + x],
        }
    }
}

/// A convolution's input as its kernel reads it: `[N, C/bi, H + 2p, W + 2p, bi]`, zero-bordered.
pub(super) struct Padded<'a> {
    data: Data<'a>,
    pub blocks: usize,
    pub h: usize,
    pub w: usize,
    /// Channels per block: the layout's lanes, or all channels of a narrow input (the RGB image: `bi = 3`).
    pub bi: usize,
}

enum Data<'a> {
    InPlace(&'a [f32]),
    Copied(Scratch),
}

impl<'a> Padded<'a> {
    /// `src` with a border of `pad` zeros in blocks of `bi` channels; a blocked source of block `bi` without
    /// border is read where it lies.
    pub fn new(src: Source<'a>, pad: usize, bi: usize) -> Padded<'a> {
        let (n, c, h, w) = src.dims();
        let blocks = c / bi;
        if let Source::Blocked(b) = src {
            if pad == 0 && b.lanes == bi {
                return Padded {
                    data: Data::InPlace(&b.data),
                    blocks,
                    h,
                    w,
                    bi,
                };
            }
        }
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        let plane = hp * wp * bi;
        let fill = |block: usize, dst: &mut [MaybeUninit<f32>]| {
            let (img, cb) = (block / blocks, block % blocks);
            let zero = |d: &mut [MaybeUninit<f32>]| {
                d.iter_mut().for_each(|v| {
                    v.write(0.0);
                })
            };
            for (y, row) in dst.chunks_exact_mut(wp * bi).enumerate() {
                if y < pad || y >= h + pad {
                    zero(row);
                    continue;
                }
                let sy = y - pad;
                let (left, rest) = row.split_at_mut(pad * bi);
                let (inside, right) = rest.split_at_mut(w * bi);
                zero(left);
                zero(right);
                match src {
                    // The same blocks: the row is one copy.
                    Source::Blocked(b) if b.lanes == bi => {
                        let at = ((img * blocks + cb) * h + sy) * w * bi;
                        for (d, v) in inside.iter_mut().zip(&b.data[at..at + w * bi]) {
                            d.write(*v);
                        }
                    }
                    _ => {
                        for (sx, px) in inside.chunks_exact_mut(bi).enumerate() {
                            for (i, d) in px.iter_mut().enumerate() {
                                d.write(src.at(img, cb * bi + i, sy, sx));
                            }
                        }
                    }
                }
            }
        };
        // SAFETY: every element of every plane is written by `fill` (inside: copied, border: zero).
        let scratch = unsafe {
            Scratch::written_by(n * blocks * plane, |out| {
                out.par_chunks_mut(plane)
                    .enumerate()
                    .for_each(|(block, dst)| fill(block, dst))
            })
        };
        Padded {
            data: Data::Copied(scratch),
            blocks,
            h: hp,
            w: wp,
            bi,
        }
    }

    pub fn data(&self) -> &[f32] {
        match &self.data {
            Data::InPlace(d) => d,
            Data::Copied(s) => s,
        }
    }
}
