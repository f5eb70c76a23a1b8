use candle_core::{Device, Tensor};
use resnet_core::ops::channel_blocks::to_blocked;
use resnet_core::ops::conv::Conv2dOp;
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (n, ci, co, side, iters) = (a[0], a[1], a[2], a[3], a[4]);
    let x = to_blocked(&Tensor::randn(0f32, 1.0, (n, ci, side, side), &dev)?, 16)?;
    let w = Tensor::randn(0f32, 0.1, (co, ci, 3, 3), &dev)?;
    let dy = to_blocked(
        &Tensor::randn(0f32, 1.0, (n, co, side / 2, side / 2), &dev)?,
        16,
    )?;
    let op = Conv2dOp {
        stride: 2,
        padding: 1,
    };
    let mut all = vec![];
    for _ in 0..iters {
        let t = Instant::now();
        let y = op.input_gradient(&dy, &w, x.shape())?;
        all.push(t.elapsed().as_secs_f64());
        drop(y);
    }
    all.sort_by(f64::total_cmp);
    let fl = 2.0 * 9.0 * (ci * co * side * side / 4 * n) as f64;
    println!(
        "best {:.1} median {:.1} GFLOP/s",
        fl / all[0] / 1e9,
        fl / all[all.len() / 2] / 1e9
    );
    Ok(())
}
