//! The nine taps of one 3×3 kernel of a weight tensor, as the direct and Winograd kernels read them.

/// The 3×3 kernel from input channel `i` to output channel `o` of `conv3x3(·, w)` (`w` `[C_out, C_in, 3, 3]`)
/// or, `transposed`, of the convolution that gives its input gradient: `w'[ci, co] = w[co, ci]` flipped in
/// both axes. Taps row-major.
pub(crate) fn kernel_3x3(
    w: &[f32],
    c_in: usize,
    transposed: bool,
    (o, i): (usize, usize),
) -> [f32; 9] {
    let (co, ci) = if transposed { (i, o) } else { (o, i) };
    let k = &w[(co * c_in + ci) * 9..][..9];
    std::array::from_fn(|t| if transposed { k[8 - t] } else { k[t] })
}
