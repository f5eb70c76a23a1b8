//! What an autograd graph keeps alive for backward: the bytes of the storages of its tensors.

use candle_core::{Storage, Tensor};
use std::collections::HashMap;

/// Bytes of every distinct storage that the graph of `output` holds, parameters (variables) excluded: the
/// activations a training forward pass saves for backward. A storage seen through several views counts once,
/// at the furthest element any of them reaches.
pub fn saved_tensor_bytes(output: &Tensor) -> usize {
    let mut extents: HashMap<usize, usize> = HashMap::new();
    for node in output.sorted_nodes() {
        if node.is_variable() {
            continue;
        }
        let (storage, layout) = node.storage_and_layout();
        let key = &*storage as *const Storage as usize;
        let last = layout.start_offset()
            + layout
                .dims()
                .iter()
                .zip(layout.stride())
                .map(|(&d, &s)| d.saturating_sub(1) * s)
                .sum::<usize>();
        let bytes = (last + 1) * node.dtype().size_in_bytes();
        let extent = extents.entry(key).or_default();
        *extent = (*extent).max(bytes);
    }
    extents.values().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn counts_each_saved_storage_once_and_no_parameter() -> candle_core::Result<()> {
        let w = Var::ones((4, 8), candle_core::DType::F32, &Device::Cpu)?;
        let h = w.as_tensor().exp()?; // 32 floats
        let view = h.narrow(1, 0, 4)?; // a view of h: no new storage
        let out = (view.sum_all()? + h.sqr()?.sum_all()?)?; // h² (32 floats) and three scalars
        assert_eq!(saved_tensor_bytes(&out), (32 + 32 + 3) * 4);
        Ok(())
    }
}
