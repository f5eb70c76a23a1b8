//! Data-parallel training as PyTorch's DistributedDataParallel: one process per rank, launched by `mpirun`;
//! rank 0's weights broadcast at the start, gradients summed over ranks after backward and averaged, so that
//! every rank applies the same update to the same parameters. The collectives come from MPI (the `mpi`
//! feature, rsmpi over the system's Open MPI) and, for gradients on CUDA devices, from NCCL (the `nccl`
//! feature); one process without `--distributed` is a world of one, where every collective is the identity.

#[cfg(feature = "mpi")]
mod mpi_world;
#[cfg(feature = "nccl")]
mod nccl_gradients;

use anyhow::{bail, Result};
use candle_core::Tensor;

/// Gradients are summed in buckets of this many bytes (PyTorch DDP's default bucket: 25 MiB), so that the
/// staging buffers stay small whatever the net.
pub const BUCKET_BYTES: usize = 25 << 20;

/// The collectives training needs, over every rank of the job.
pub trait Collective {
    fn rank(&self) -> usize;
    fn ranks(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn sum_f64(&self, values: &mut [f64]);
    /// Element-wise sum over ranks of every rank's `values`, into `sum` (of the same length).
    fn sum_f32(&self, values: &[f32], sum: &mut [f32]);
    /// Rank 0's values on every rank.
    fn broadcast_f32(&self, values: &mut [f32]);
    /// Every rank's value, in rank order.
    fn gather_u64(&self, value: u64) -> Vec<u64>;

    /// A flat f32 gradient vector summed over ranks. The default goes through host memory in buckets of
    /// [`BUCKET_BYTES`]; a device-side engine (NCCL) overrides it.
    fn sum_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        if self.ranks() == 1 {
            return Ok(flat.clone());
        }
        let values = flat.to_vec1::<f32>()?;
        let mut sum = vec![0f32; values.len()];
        let bucket = BUCKET_BYTES / 4;
        for (send, receive) in values.chunks(bucket).zip(sum.chunks_mut(bucket)) {
            self.sum_f32(send, receive);
        }
        let n = sum.len();
        Ok(Tensor::from_vec(sum, n, flat.device())?)
    }

    /// Where this process runs, for the log.
    fn describe(&self) -> String {
        format!("rank {} of {}", self.rank(), self.ranks())
    }
}

/// One process: every collective is the identity.
pub struct Alone;

impl Collective for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn ranks(&self) -> usize {
        1
    }
    fn sum_f64(&self, _: &mut [f64]) {}
    fn sum_f32(&self, values: &[f32], sum: &mut [f32]) {
        sum.copy_from_slice(values)
    }
    fn broadcast_f32(&self, _: &mut [f32]) {}
    fn gather_u64(&self, value: u64) -> Vec<u64> {
        vec![value]
    }
}

/// The environment variables MPI launchers set in every rank (Open MPI, MPICH/Hydra, PMIx, Slurm's srun).
#[cfg(feature = "mpi")]
const LAUNCHER_VARIABLES: [&str; 4] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "SLURM_NTASKS",
];

/// Ranks of this job on this machine, as the launcher says (1 when it does not).
pub fn local_ranks() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(1)
}

#[cfg(feature = "mpi")]
fn launched_by_mpi() -> bool {
    LAUNCHER_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Splits the cores of this machine between its ranks: each rank's kernel pool gets cores / local ranks
/// threads unless `RAYON_NUM_THREADS` says otherwise (as torchrun sets OMP_NUM_THREADS). Call before the
/// first parallel op.
pub fn share_cores() {
    let local = local_ranks();
    if local > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY (edition 2021: safe fn): called from `main` before any thread pool exists.
        std::env::set_var("RAYON_NUM_THREADS", (cores / local).max(1).to_string());
    }
}

/// The world this process trains in: [`Alone`] without `--distributed`; with it, MPI's world (needs an MPI
/// launcher and a build with the `mpi` feature; with `nccl`, gradients on CUDA go through NCCL).
pub fn join(distributed: bool) -> Result<Box<dyn Collective>> {
    if !distributed {
        return Ok(Box::new(Alone));
    }
    #[cfg(not(feature = "mpi"))]
    bail!("--distributed needs a build with the `mpi` feature: cargo build --release -p resnet-train --features mpi (Open MPI from Debian: apt-get install libopenmpi-dev openmpi-bin libclang-dev)");
    #[cfg(feature = "mpi")]
    {
        if !launched_by_mpi() {
            bail!("--distributed needs an MPI launcher: start one process per rank with `mpirun -np N resnet-train --distributed …`");
        }
        let world = mpi_world::MpiWorld::init()?;
        #[cfg(feature = "nccl")]
        return Ok(Box::new(nccl_gradients::NcclGradients::new(world)?));
        #[cfg(not(feature = "nccl"))]
        return Ok(Box::new(world));
    }
}

/// FNV-1a over bytes: a fingerprint of a configuration or of parameter bits, the same on every rank.
pub fn fingerprint(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fails on every rank, naming the first that differs from rank 0, when the ranks' `value`s disagree; `then`
/// says what to do.
pub fn check_agreement(world: &dyn Collective, what: &str, value: u64, then: &str) -> Result<()> {
    let all = world.gather_u64(value);
    if let Some(r) = all.iter().position(|&v| v != all[0]) {
        bail!(
            "rank {r} of {} disagrees with rank 0 on {what}: {then}",
            all.len()
        );
    }
    Ok(())
}

/// At the start of a run: checks that every rank starts the same run (`facts`: what, its description on this
/// rank), then gives every rank rank 0's weights and BatchNorm statistics, as DDP does.
pub fn agree_and_broadcast(
    world: &dyn Collective,
    model: &resnet_core::Model,
    facts: &[(&str, String)],
) -> Result<()> {
    for (what, value) in facts {
        check_agreement(
            world,
            what,
            fingerprint(value.bytes()),
            "start every rank with the same flags, data and run folder",
        )?;
    }
    broadcast_state(world, model)
}

/// Rank 0's weights and BatchNorm statistics on every rank.
pub fn broadcast_state(world: &dyn Collective, model: &resnet_core::Model) -> Result<()> {
    let tensors = model.state_dict()?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut flat = Vec::new();
    for name in &names {
        let t = tensors[*name].to_dtype(candle_core::DType::F32)?;
        flat.extend(t.flatten_all()?.to_vec1::<f32>()?);
    }
    world.broadcast_f32(&mut flat);
    let mut from_rank0 = std::collections::HashMap::new();
    let mut offset = 0;
    for name in names {
        let t = &tensors[name];
        let n = t.elem_count();
        let values = Tensor::from_slice(&flat[offset..offset + n], t.shape(), t.device())?;
        from_rank0.insert(name.clone(), values.to_dtype(t.dtype())?);
        offset += n;
    }
    model.load_tensors(&from_rank0, std::path::Path::new("rank 0's broadcast"))?;
    Ok(())
}

/// A fingerprint of `model`'s trainable parameters, bit for bit.
pub fn parameter_fingerprint(model: &resnet_core::Model) -> Result<u64> {
    let mut h = fingerprint(std::iter::empty());
    for (_, var) in model.trainable_vars() {
        let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        h = fingerprint(
            h.to_le_bytes()
                .into_iter()
                .chain(values.iter().flat_map(|v| v.to_bits().to_le_bytes())),
        );
    }
    Ok(h)
}
