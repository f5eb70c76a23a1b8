//! The MPI world through rsmpi: the collectives of [`super::Collective`] on `MPI_COMM_WORLD`.

use super::Collective;
use anyhow::{Context, Result};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

pub struct MpiWorld {
    world: SimpleCommunicator,
    /// Finalizes MPI when dropped, after the last collective.
    _universe: mpi::environment::Universe,
}

impl MpiWorld {
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .context("MPI could not be initialized (was it initialized twice?)")?;
        Ok(Self {
            world: universe.world(),
            _universe: universe,
        })
    }

    /// Rank 0's bytes on every rank (NCCL's unique id).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) {
        self.world.process_at_rank(0).broadcast_into(bytes);
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn ranks(&self) -> usize {
        self.world.size() as usize
    }

    fn sum_f64(&self, values: &mut [f64]) {
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
    }

    fn sum_f32(&self, values: &[f32], sum: &mut [f32]) {
        self.world
            .all_reduce_into(values, sum, SystemOperation::sum());
    }

    fn broadcast_f32(&self, values: &mut [f32]) {
        self.world.process_at_rank(0).broadcast_into(values);
    }

    fn gather_u64(&self, value: u64) -> Vec<u64> {
        let mut all = vec![0u64; self.ranks()];
        self.world.all_gather_into(&value, &mut all[..]);
        all
    }

    fn describe(&self) -> String {
        let (major, minor) = mpi::environment::version();
        let library = mpi::environment::library_version().unwrap_or_default();
        let library = library.lines().next().unwrap_or("").trim().to_string();
        format!(
            "rank {} of {} (MPI {major}.{minor}, {library})",
            self.rank(),
            self.ranks()
        )
    }
}
