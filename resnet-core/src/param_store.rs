//! The variables of a network, created from a seed so that the same seed gives the same initial weights
//! whatever the order in which layers are built, and kept under their published names.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Names of BatchNorm buffers: saved with the weights, never trained.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

#[derive(Clone)]
pub struct ParamStore {
    varmap: VarMap,
    seed: u64,
}

impl ParamStore {
    pub fn new(seed: u64) -> Self {
        Self {
            varmap: VarMap::new(),
            seed,
        }
    }

    /// A builder whose `get_with_hints` creates seeded variables in this store.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// Every variable, parameters and buffers, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self
            .varmap
            .data()
            .lock()
            .expect("parameter store lock poisoned");
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The trainable parameters (no BN buffers), sorted by name so optimizers see a fixed order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.named_vars()
            .into_iter()
            .filter(|(n, _)| !is_buffer(n))
            .collect()
    }

    pub fn var(&self, name: &str) -> Option<Var> {
        let data = self
            .varmap
            .data()
            .lock()
            .expect("parameter store lock poisoned");
        data.get(name).cloned()
    }

    /// Number of trainable scalars (what papers and torchvision call parameters).
    pub fn parameter_count(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// A deterministic generator per tensor: FNV-1a of the name mixed with the seed.
    fn rng_for(&self, name: &str) -> rand::rngs::StdRng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        rand::rngs::StdRng::seed_from_u64(h)
    }

    fn initial_value(
        &self,
        shape: &Shape,
        name: &str,
        init: Init,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = self.rng_for(name);
        let values: Vec<f32> = match init {
            Init::Const(v) => return Tensor::full(v as f32, shape, dev),
            Init::Randn { mean, stdev } => {
                let normal = Normal::new(mean, stdev).map_err(candle_core::Error::wrap)?;
                (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
            }
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
            kaiming @ Init::Kaiming { .. } => {
                return Ok(kaiming
                    .var(shape.clone(), DType::F32, dev)?
                    .as_tensor()
                    .clone())
            }
        };
        Tensor::from_vec(values, shape, dev)
    }
}

impl candle_nn::var_builder::SimpleBackend for ParamStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .expect("parameter store lock poisoned");
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "variable `{name}` exists with shape {:?}, requested {shape:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let value = self
            .initial_value(&shape, name, init, dev)?
            .to_dtype(dtype)?;
        let var = Var::from_tensor(&value)?;
        let tensor = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.var(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable named `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.var(name).is_some()
    }
}
