//! A network together with its variables: what training, evaluation and checkpoints work on.

use crate::param_store::ParamStore;
use crate::{registry, weights, ResNet, ResNetConfig, Result};
use candle_core::{Device, ModuleT, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

pub struct Model {
    pub net: ResNet,
    pub params: ParamStore,
    device: Device,
}

impl Model {
    /// Builds `config` with weights initialised from `seed` (He fan-out convolutions, BN γ=1 β=0).
    pub fn new(config: &ResNetConfig, seed: u64, device: &Device) -> Result<Self> {
        let params = ParamStore::new(seed);
        let net = ResNet::new(config, params.var_builder(device))?;
        net.dropout_draws().set_seed(seed);
        Ok(Self {
            net,
            params,
            device: device.clone(),
        })
    }

    /// A registered architecture by name (see [`registry::config_for`]).
    pub fn by_name(name: &str, seed: u64, device: &Device) -> Result<Self> {
        Self::new(&registry::config_for(name)?, seed, device)
    }

    pub fn config(&self) -> &ResNetConfig {
        self.net.config()
    }

    /// The training step whose dropout-shortcut masks the next training-mode forwards draw (a mask depends on
    /// the seed, the unit and this step only; the trainer sets it every iteration, so a resumed run draws the
    /// masks of an uninterrupted one).
    pub fn set_training_step(&self, step: u64) {
        self.net.dropout_draws().set_step(step);
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.net.forward_t(x, train)
    }

    /// The evaluation-mode network, with BatchNorm folded into the convolutions when `fold` and possible.
    pub fn predictor(&self, fold: bool) -> Result<crate::folded::Predictor> {
        Ok(crate::folded::Predictor::new(&self.net, fold)?)
    }

    pub fn parameter_count(&self) -> usize {
        self.params.parameter_count()
    }

    /// Multiply-adds per image at `h`×`w`.
    pub fn macs(&self, hw: (usize, usize)) -> u64 {
        self.net.macs(hw)
    }

    /// Every convolution applied to an `h`×`w` input, in order.
    pub fn conv_shapes(&self, hw: (usize, usize)) -> Vec<crate::conv::ConvShape> {
        self.net.conv_shapes(hw)
    }

    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    /// Loads a safetensors file with this model's names (any float dtype, converted to f32).
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        weights::load_file(&self.params, path)
    }

    /// Loads named tensors already in memory (same checks as [`Model::load_weights`]; `source` names them in errors).
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        weights::load_tensors(&self.params, tensors, source)
    }

    /// Saves every weight and BN statistic under its published name, atomically (see [`weights::save_file`]).
    pub fn save_weights(&self, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
        weights::save_file(&self.state_dict()?, metadata, path)
    }

    /// Re-estimates every BN's running statistics as the plain average over `batches` (training-mode forwards),
    /// as PyTorch's `update_bn` and the paper's authors did after training, instead of the moving average.
    /// Returns the number of batches used.
    pub fn recalibrate_batch_norm(
        &self,
        batches: impl IntoIterator<Item = candle_core::Result<Tensor>>,
    ) -> Result<usize> {
        let stats: Vec<Var> = self
            .params
            .named_vars()
            .into_iter()
            .filter(|(n, _)| crate::param_store::is_buffer(n))
            .map(|(_, v)| v)
            .collect();
        let m = crate::batch_norm::MOMENTUM;
        let mut averages: Vec<Tensor> = Vec::new();
        let mut count = 0usize;
        for x in batches {
            let before: Vec<Tensor> = stats
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?;
            self.forward_t(&x?, true)?;
            count += 1;
            for (i, (var, prev)) in stats.iter().zip(&before).enumerate() {
                // The forward set r = (1 − m)·prev + m·s: recover this batch's statistic s.
                let s = ((var.as_tensor() - (prev * (1.0 - m))?)? / m)?;
                if i == averages.len() {
                    averages.push(s);
                } else {
                    averages[i] = (&averages[i] + ((s - &averages[i])? / count as f64)?)?;
                }
            }
        }
        for (var, avg) in stats.iter().zip(&averages) {
            var.set(avg)?;
        }
        Ok(count)
    }

    /// Every weight and BN statistic under its published name, on the CPU.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.params
            .named_vars()
            .into_iter()
            .map(|(name, var)| Ok((name, var.as_tensor().to_device(&Device::Cpu)?)))
            .collect()
    }
}
