//! Matrix products on strided f32 slices through the `gemm` crate (the GEMM candle itself uses), for the
//! convolution algorithms.

use gemm::Parallelism;

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, `dst` row-major, the others given by their (row, column) strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    parallelism: Parallelism,
) {
    let dst = (dst, (n, 1));
    matmul_strided(
        (m, n, k),
        dst,
        accumulate,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        parallelism,
    )
}

/// [`matmul`] into a `dst` of any (row, column) strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_strided(
    (m, n, k): (usize, usize, usize),
    (dst, (dst_rs, dst_cs)): (&mut [f32], (usize, usize)),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: Parallelism,
) {
    debug_assert!(m * n == 0 || dst.len() > (m - 1) * dst_rs + (n - 1) * dst_cs);
    // SAFETY: the slices cover every index the strides reach: dst by the assertion above, lhs/rhs by the
    // callers' shapes (m·k and k·n elements with the given strides).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
