//! `--device cpu | cuda[:N] | metal[:N]` to a candle device, with an error that says which build is needed.

use crate::{ResNetError, Result};
use candle_core::Device;

pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => {
            let i = i.parse::<usize>().map_err(|_| {
                ResNetError::InvalidConfig(format!("--device {spec}: `{i}` is not a device index"))
            })?;
            (k, i)
        }
        None => (spec, 0),
    };
    let unavailable = |feature: &str, e: candle_core::Error| {
        ResNetError::InvalidConfig(format!(
            "--device {spec}: not available ({e}); build with `--features {feature}` on a machine that has one"
        ))
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(index).map_err(|e| unavailable("cuda", e)),
        "metal" => Device::new_metal(index).map_err(|e| unavailable("metal", e)),
        _ => Err(ResNetError::InvalidConfig(format!(
            "--device {spec}: expected cpu, cuda, cuda:N, metal or metal:N"
        ))),
    }
}
