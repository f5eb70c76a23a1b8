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
    // A build with the feature reached the driver and it failed; a build without it cannot try.
    let unavailable = |built: bool, feature: &str, e: candle_core::Error| {
        // candle appends a backtrace to driver errors: the first line says what happened.
        let reason = e.to_string();
        let reason = reason.lines().next().unwrap_or("unknown error");
        ResNetError::InvalidConfig(match built {
            true => format!("--device {spec}: the device cannot be opened ({reason})"),
            false => format!(
                "--device {spec}: not available ({reason}); build with `--features {feature}` on a machine that has one"
            ),
        })
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            Device::new_cuda(index).map_err(|e| unavailable(cfg!(feature = "cuda"), "cuda", e))
        }
        "metal" => {
            Device::new_metal(index).map_err(|e| unavailable(cfg!(feature = "metal"), "metal", e))
        }
        _ => Err(ResNetError::InvalidConfig(format!(
            "--device {spec}: expected cpu, cuda, cuda:N, metal or metal:N"
        ))),
    }
}

/// The `--device` spelling of a device: `cpu`, `cuda:N` or `metal:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
