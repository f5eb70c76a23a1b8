//! Matrix products on strided f32 slices through the `gemm` crate (the GEMM candle itself uses), for the
//! convolution algorithms.

use gemm::Parallelism;

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, each operand given by its (row, column) strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: the slices cover every index the strides reach: dst is m×n row-major, lhs/rhs are checked
    // by the callers' shapes (m·k and k·n elements with the given strides).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
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
