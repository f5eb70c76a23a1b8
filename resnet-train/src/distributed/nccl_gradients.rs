//! Gradients on CUDA devices summed by NCCL, device to device; everything else (the start-up checks, the
//! step's loss and counts, CPU tensors) over MPI, which also hands NCCL's unique id from rank 0 to the rest.

use super::mpi_world::MpiWorld;
use super::Collective;
use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use std::cell::OnceCell;
use std::rc::Rc;

pub struct NcclGradients {
    mpi: MpiWorld,
    /// Made at the first CUDA gradient, on that tensor's device and stream.
    comm: OnceCell<Rc<Comm>>,
}

impl NcclGradients {
    pub fn new(mpi: MpiWorld) -> Result<Self> {
        Ok(Self {
            mpi,
            comm: OnceCell::new(),
        })
    }

    fn comm(&self, device: &candle_core::CudaDevice) -> Result<Rc<Comm>> {
        if let Some(comm) = self.comm.get() {
            return Ok(comm.clone());
        }
        let mut id = [0u8; 128];
        if self.rank() == 0 {
            let made =
                Id::new().map_err(|e| anyhow::anyhow!("NCCL: creating its unique id: {e:?}"))?;
            for (b, c) in id.iter_mut().zip(made.internal()) {
                *b = *c as u8;
            }
        }
        self.mpi.broadcast_bytes(&mut id);
        let id = Id::uninit(id.map(|b| b as ::core::ffi::c_char));
        let comm = Comm::from_rank(device.cuda_stream(), self.rank(), self.ranks(), id)
            .map_err(|e| anyhow::anyhow!("NCCL: joining {} ranks: {e:?}", self.ranks()))?;
        Ok(self.comm.get_or_init(|| Rc::new(comm)).clone())
    }
}

/// The sum over ranks of a contiguous f32 CUDA tensor, as a candle op (so candle owns the result).
struct AllReduce(Rc<Comm>);

// SAFETY: candle needs custom ops to be Send + Sync; this one is made, run and dropped on the training thread.
unsafe impl Send for AllReduce {}
unsafe impl Sync for AllReduce {}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL sums CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL all-reduce: the gradient vector is not contiguous")
        };
        let source = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let device = storage.device().clone();
        // SAFETY: every element is written by the all-reduce before it is read.
        let mut sum = unsafe { device.alloc::<f32>(end - start)? };
        self.0
            .all_reduce(&source, &mut sum, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(sum, device),
            layout.shape().clone(),
        ))
    }
}

impl Collective for NcclGradients {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn ranks(&self) -> usize {
        self.mpi.ranks()
    }
    fn sum_f64(&self, values: &mut [f64]) {
        self.mpi.sum_f64(values)
    }
    fn sum_f32(&self, values: &[f32], sum: &mut [f32]) {
        self.mpi.sum_f32(values, sum)
    }
    fn broadcast_f32(&self, values: &mut [f32]) {
        self.mpi.broadcast_f32(values)
    }
    fn gather_u64(&self, value: u64) -> Vec<u64> {
        self.mpi.gather_u64(value)
    }

    fn sum_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        let Device::Cuda(device) = flat.device() else {
            return self.mpi.sum_tensor(flat);
        };
        if flat.dtype() != candle_core::DType::F32 {
            bail!(
                "NCCL all-reduce: gradients are {:?}, expected f32",
                flat.dtype()
            );
        }
        let comm = self.comm(device)?;
        Ok(flat.contiguous()?.apply_op1_no_bwd(&AllReduce(comm))?)
    }

    fn describe(&self) -> String {
        format!("{}, gradients on CUDA through NCCL", self.mpi.describe())
    }
}
