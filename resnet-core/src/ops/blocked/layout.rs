//! The channel-blocked activation layout `[N, C/B, H, W, B]` (NCHW8c for AVX2 and portable code, NCHW16c for
//! AVX-512), its conversions from and to NCHW, and the zero-bordered copy a padded convolution reads.

use crate::ops::cpu_slice::Scratch;
use crate::ops::isa::Isa;
use crate::ops::parallel::for_each_chunk;
use candle_core::{Device, Result, Tensor};
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
    /// The layout of a contiguous `[N, C, H, W]` CPU tensor, `C` a multiple of `lanes`.
    pub fn from_nchw(x: &Tensor, lanes: usize) -> Result<Blocked> {
        let dims = x.dims4()?;
        Self::from_nchw_slice(&x.flatten_all()?.to_vec1::<f32>()?, dims, lanes)
    }

    /// The layout of `[N, C, H, W]` values of `dims`, `C` a multiple of `lanes`: by 8×8 transposes where the
    /// kernel set has them (a convolution's padded copy, without the border).
    pub fn from_nchw_slice(
        data: &[f32],
        dims: (usize, usize, usize, usize),
        lanes: usize,
    ) -> Result<Blocked> {
        let (n, c, h, w) = dims;
        // The same count and whole blocks as the blocked values will have.
        BlockedSlice::new(data, dims, lanes)?;
        match Padded::batch(Source::nchw(data, dims), 0, lanes).data {
            Data::Copied(data) => Ok(Blocked {
                data,
                n,
                c,
                h,
                w,
                lanes,
            }),
            _ => unreachable!("an NCHW source is copied"),
        }
    }

    /// Back to `[N, C, H, W]`.
    pub fn to_nchw(&self) -> Result<Tensor> {
        Tensor::from_vec(
            self.to_nchw_vec(),
            (self.n, self.c, self.h, self.w),
            &Device::Cpu,
        )
    }

    /// The elements in `[N, C, H, W]` order.
    pub fn to_nchw_vec(&self) -> Vec<f32> {
        self.slice().to_nchw_vec()
    }

    /// The global average pool: `[N, C]`, each mean summed over the plane in order.
    pub fn mean_pool(&self) -> Vec<f32> {
        let (plane, lanes) = (self.h * self.w, self.lanes);
        let mut out = vec![0f32; self.n * self.c];
        for_each_chunk(&mut out, lanes, |block, dst| {
            for pixel in self.data[block * plane * lanes..][..plane * lanes].chunks_exact(lanes) {
                dst.iter_mut().zip(pixel).for_each(|(d, v)| *d += v);
            }
            dst.iter_mut().for_each(|d| *d /= plane as f32);
        });
        out
    }
}

/// Blocked values borrowed, with their shape: a [`Blocked`] activation, or a training tensor's storage in that
/// layout (`[N, C/B, H, W, B]`, see `ops::conv`).
#[derive(Clone, Copy)]
pub struct BlockedSlice<'a> {
    pub data: &'a [f32],
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub lanes: usize,
}

impl<'a> BlockedSlice<'a> {
    /// `data` as `(n, c, h, w)` in blocks of `lanes`, checked.
    pub fn new(
        data: &'a [f32],
        (n, c, h, w): (usize, usize, usize, usize),
        lanes: usize,
    ) -> Result<Self> {
        if lanes == 0 || !c.is_multiple_of(lanes) || data.len() != n * c * h * w {
            candle_core::bail!(
                "blocked layout: {} values as [{n}, {c}, {h}, {w}] in blocks of {lanes}: expected that many \
                 values and whole blocks",
                data.len()
            );
        }
        Ok(Self {
            data,
            n,
            c,
            h,
            w,
            lanes,
        })
    }

    /// The elements in `[N, C, H, W]` order.
    pub fn to_nchw_vec(&self) -> Vec<f32> {
        let (plane, lanes) = (self.h * self.w, self.lanes);
        let fill = |out: &mut [MaybeUninit<f32>]| {
            for_each_chunk(out, plane * lanes, |k, dst| {
                block_to_nchw(&self.data[k * plane * lanes..][..plane * lanes], dst, lanes)
            })
        };
        // SAFETY: the chunks cover the output, and each writes all of its plane.
        unsafe { crate::ops::cpu_slice::written_by(self.data.len(), fill) }
    }
}

/// `[N, C, H, W]` values of `dims` in blocks of `lanes`, in a plain vector (a training tensor's storage): as
/// [`Blocked::from_nchw_slice`].
pub fn blocked_values(
    data: &[f32],
    dims: (usize, usize, usize, usize),
    lanes: usize,
) -> Result<Vec<f32>> {
    BlockedSlice::new(data, dims, lanes)?;
    // Left to the caller image by image: no copy is made here.
    let padded = Padded::new(Source::nchw(data, dims), 0, lanes, true);
    let plane = padded.plane();
    let fill = |out: &mut [MaybeUninit<f32>]| {
        for_each_chunk(out, plane, |block, dst| padded.fill_plane(block, dst))
    };
    // SAFETY: `fill_plane` writes every element of a plane, and the planes cover the output.
    Ok(unsafe { crate::ops::cpu_slice::written_by(data.len(), fill) })
}

impl Blocked {
    /// The values borrowed.
    pub fn slice(&self) -> BlockedSlice<'_> {
        BlockedSlice {
            data: &self.data,
            n: self.n,
            c: self.c,
            h: self.h,
            w: self.w,
            lanes: self.lanes,
        }
    }

    /// What a convolution reads from these values.
    pub fn source(&self) -> Source<'_> {
        Source::Blocked(self.slice())
    }
}

/// One block of `lanes` channels, `[plane][lanes]`, as its `lanes` NCHW channel planes `[lanes][plane]`: read
/// in order, written as `lanes` sequential streams (by 8×8 transposes where [`transposes_by_8`]).
pub(super) fn block_to_nchw(src: &[f32], dst: &mut [MaybeUninit<f32>], lanes: usize) {
    let plane = src.len() / lanes;
    let mut start = 0;
    if transposes_by_8(lanes) {
        for p in (0..plane / 8).map(|t| t * 8) {
            for q in (0..lanes / 8).map(|q| q * 8) {
                let (from, to) = (
                    src[p * lanes + q..].as_ptr(),
                    dst[q * plane + p..].as_mut_ptr(),
                );
                // SAFETY: channels `q..q + 8` of the block's 8 pixels from `p`, and those channels' rows
                // from `p` (AVX2 checked).
                unsafe { transpose(from, lanes, to, plane) };
            }
        }
        start = plane / 8 * 8;
    }
    for (p, pixel) in src.chunks_exact(lanes).enumerate().skip(start) {
        for (lane, v) in pixel.iter().enumerate() {
            dst[lane * plane + p].write(*v);
        }
    }
}

/// What a convolution reads: the blocked output of a layer, or the network's `[N, C, H, W]` input.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Blocked(BlockedSlice<'a>),
    Nchw {
        data: &'a [f32],
        n: usize,
        c: usize,
        h: usize,
        w: usize,
    },
}

impl<'a> Source<'a> {
    /// An NCHW batch of `(n, c, h, w)`.
    pub fn nchw(data: &'a [f32], (n, c, h, w): (usize, usize, usize, usize)) -> Self {
        Source::Nchw { data, n, c, h, w }
    }
}

impl Source<'_> {
    /// `(n, c, h, w)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        match *self {
            Source::Blocked(b) => (b.n, b.c, b.h, b.w),
            Source::Nchw { n, c, h, w, .. } => (n, c, h, w),
        }
    }
}

/// A convolution's input as its kernel reads it: `[N, C/bi, H + 2p, W + 2p, bi]`, zero-bordered.
pub(super) struct Padded<'a> {
    src: Source<'a>,
    pad: usize,
    data: Data<'a>,
    pub blocks: usize,
    pub h: usize,
    pub w: usize,
    /// Channels per block: the layout's lanes, or all channels of a narrow input (the RGB image: `bi = 3`).
    pub bi: usize,
}

enum Data<'a> {
    /// A blocked source of block `bi` without border: read where it lies.
    InPlace(&'a [f32]),
    /// The whole batch copied.
    Copied(Scratch),
    /// Copied image by image by the caller ([`Padded::fill_image`]), into a buffer that stays in cache.
    PerImage,
}

impl<'a> Padded<'a> {
    /// `src` with a border of `pad` zeros in blocks of `bi` channels. `per_image`: where a copy is needed,
    /// leave it to the caller, one image at a time.
    pub fn new(src: Source<'a>, pad: usize, bi: usize, per_image: bool) -> Padded<'a> {
        let (n, c, h, w) = src.dims();
        let mut padded = Padded {
            src,
            pad,
            data: Data::PerImage,
            blocks: c / bi,
            h: h + 2 * pad,
            w: w + 2 * pad,
            bi,
        };
        match src {
            Source::Blocked(b) if pad == 0 && b.lanes == bi => padded.data = Data::InPlace(b.data),
            _ if per_image => {}
            _ => {
                let plane = padded.plane();
                // SAFETY: `fill_plane` writes every element of a plane.
                let scratch = unsafe {
                    Scratch::written_by(n * padded.blocks * plane, |out| {
                        for_each_chunk(out, plane, |block, dst| padded.fill_plane(block, dst))
                    })
                };
                padded.data = Data::Copied(scratch);
            }
        }
        padded
    }

    /// `src` as [`Padded::new`] makes it, the whole batch copied now (or read in place where it already is
    /// that layout): for the gradient kernels, which read every image's planes from any task.
    pub fn batch(src: Source<'a>, pad: usize, bi: usize) -> Padded<'a> {
        Padded::new(src, pad, bi, false)
    }

    /// The elements of a [`Padded::batch`].
    pub fn batch_data(&self) -> &[f32] {
        match &self.data {
            Data::InPlace(d) => d,
            Data::Copied(s) => s,
            Data::PerImage => unreachable!("Padded::batch copies the batch or reads it in place"),
        }
    }

    fn plane(&self) -> usize {
        self.h * self.w * self.bi
    }

    /// Elements of one image.
    pub fn image_len(&self) -> usize {
        self.blocks * self.plane()
    }

    /// The whole batch, unless it is left to [`Padded::fill_image`].
    pub fn data(&self) -> Option<&[f32]> {
        match self.data {
            Data::PerImage => None,
            _ => Some(self.batch_data()),
        }
    }

    /// Image `img`'s `image_len()` elements.
    pub fn fill_image(&self, img: usize, dst: &mut [MaybeUninit<f32>]) {
        for (cb, plane) in dst.chunks_exact_mut(self.plane()).enumerate() {
            self.fill_plane(img * self.blocks + cb, plane);
        }
    }

    /// Plane `block` (image · blocks + channel block): border zero, inside copied.
    fn fill_plane(&self, block: usize, dst: &mut [MaybeUninit<f32>]) {
        let (bi, pad, blocks) = (self.bi, self.pad, self.blocks);
        let (_, _, h, w) = self.src.dims();
        let (img, cb) = (block / blocks, block % blocks);
        let zero = |d: &mut [MaybeUninit<f32>]| {
            d.iter_mut().for_each(|v| {
                v.write(0.0);
            })
        };
        for (y, row) in dst.chunks_exact_mut(self.w * bi).enumerate() {
            if y < pad || y >= h + pad {
                zero(row);
                continue;
            }
            let sy = y - pad;
            let (left, rest) = row.split_at_mut(pad * bi);
            let (inside, right) = rest.split_at_mut(w * bi);
            zero(left);
            zero(right);
            match self.src {
                // The same blocks (a blocked input's channels are whole blocks, read as such): one copy.
                Source::Blocked(b) => {
                    debug_assert_eq!(b.lanes, bi);
                    let at = ((img * blocks + cb) * h + sy) * w * bi;
                    for (d, v) in inside.iter_mut().zip(&b.data[at..at + w * bi]) {
                        d.write(*v);
                    }
                }
                // NCHW: each channel's row is contiguous, written every `bi` values.
                Source::Nchw { data, c, .. } => {
                    let at = |i: usize| ((img * c + cb * bi + i) * h + sy) * w;
                    if bi == 1 {
                        for (d, v) in inside.iter_mut().zip(&data[at(0)..at(0) + w]) {
                            d.write(*v);
                        }
                        continue;
                    }
                    let mut start = 0;
                    if transposes_by_8(bi) {
                        for sx in (0..w / 8).map(|t| t * 8) {
                            for q in (0..bi / 8).map(|q| q * 8) {
                                let (src, dst) =
                                    (data[at(q) + sx..].as_ptr(), &mut inside[sx * bi + q..]);
                                // SAFETY: 8 values of channel rows `q..q + 8` of the block from `sx`, those
                                // channels of 8 pixels of the padded row from `sx` (AVX2 checked).
                                unsafe { transpose(src, h * w, dst.as_mut_ptr(), bi) };
                            }
                        }
                        start = w / 8 * 8;
                    }
                    let rest = &mut inside[start * bi..];
                    if bi == 3 {
                        // An RGB stem's: pixel by pixel, the three channel rows read side by side.
                        let row = |i: usize| &data[at(i) + start..at(i) + w];
                        interleave([row(0), row(1), row(2)], rest);
                        continue;
                    }
                    for i in 0..bi {
                        for (sx, v) in data[at(i) + start..at(i) + w].iter().enumerate() {
                            rest[sx * bi + i].write(*v);
                        }
                    }
                }
            }
        }
    }
}

/// `dst` pixel by pixel, `B` values each, value `i` of pixel `x` from `rows[i][x]`.
fn interleave<const B: usize>(rows: [&[f32]; B], dst: &mut [MaybeUninit<f32>]) {
    let pixels = dst.len() / B;
    let rows = rows.map(|r| &r[..pixels]);
    for (x, pixel) in dst.chunks_exact_mut(B).enumerate() {
        for (d, row) in pixel.iter_mut().zip(rows) {
            d.write(row[x]);
        }
    }
}

/// Whether blocks of `lanes` channels convert from and to NCHW by 8×8 transposes (a block of 16 as two): with
/// a kernel set that has AVX2 (the portable set keeps the element-by-element copy).
fn transposes_by_8(lanes: usize) -> bool {
    cfg!(target_arch = "x86_64") && lanes.is_multiple_of(8) && Isa::current() >= Isa::Avx2
}

/// [`simd::transpose_8x8`](super::simd) into an uninitialised destination.
///
/// # Safety
/// As `transpose_8x8`; call where [`transposes_by_8`].
#[inline]
unsafe fn transpose(
    src: *const f32,
    src_stride: usize,
    dst: *mut MaybeUninit<f32>,
    dst_stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        crate::ops::simd::transpose_8x8(src, src_stride, dst.cast::<f32>(), dst_stride)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (src, src_stride, dst, dst_stride);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conversions by 8×8 transposes (with the kernel set this CPU runs by default) against the layout's
    /// definition (element `(img, ch, y, x)` at `(((img·C/B + ch/B)·h + y)·w + x)·B + ch % B`), on planes whose
    /// rows are whole transposes, have a tail, or are shorter than one.
    #[test]
    fn conversions_follow_the_layouts_definition() {
        for lanes in [8, 16] {
            for (h, w) in [(16, 16), (9, 9), (5, 17), (3, 7)] {
                let (n, c) = (3, 2 * lanes);
                let values: Vec<f32> = (0..n * c * h * w).map(|i| i as f32).collect();
                let mut expected = vec![0f32; values.len()];
                for (i, v) in values.iter().enumerate() {
                    let (x, y, ch, img) = (i % w, i / w % h, i / (w * h) % c, i / (w * h * c));
                    expected
                        [(((img * c / lanes + ch / lanes) * h + y) * w + x) * lanes + ch % lanes] =
                        *v;
                }
                let tensor = Tensor::from_vec(values.clone(), (n, c, h, w), &Device::Cpu).unwrap();
                let blocked = Blocked::from_nchw(&tensor, lanes).unwrap();
                assert_eq!(&*blocked.data, &expected[..], "{lanes} lanes, {h}×{w}");
                assert_eq!(blocked.to_nchw_vec(), values, "{lanes} lanes, {h}×{w} back");
            }
        }
        // Channels not in whole blocks, or too few values: an error, not a panic.
        assert!(Blocked::from_nchw_slice(&[0.0; 24], (1, 12, 1, 2), 8).is_err());
        assert!(Blocked::from_nchw_slice(&[0.0; 15], (1, 8, 1, 2), 8).is_err());
    }
}
