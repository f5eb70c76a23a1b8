//! Shuffled, augmented batches decoded on a thread pool, with a bounded prefetch queue.
//!
//! Deterministic: the order of an epoch depends on (seed, epoch) only, and each sample's augmentation on
//! (seed, epoch, sample index) only, so the same seed gives the same batches whatever the thread count.

use crate::dataset::Split;
use crate::pipeline::{Pipeline, Processed};
use crate::{DatasetError, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use std::sync::{mpsc, Arc, Mutex};

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Decode threads (0: one per core).
    pub threads: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Drop a last, incomplete batch (training) or keep it (evaluation).
    pub drop_last: bool,
    /// Fail on the first unreadable image instead of skipping and counting it.
    pub strict: bool,
    /// Which part of each step's batch this loader yields (data-parallel ranks, accumulation).
    pub shard: Shard,
}

/// A data-parallel share of the data, as PyTorch's DistributedSampler but by batch: the epoch's order is cut
/// into global batches of `batch_size × ranks × micro_batches` images, and rank `rank` takes the `rank`-th
/// slice of each, as `micro_batches` consecutive micro-batches of `batch_size`. The global batch of a step is
/// the same images whatever the world size: 2 ranks × 1 micro-batch see what 1 rank × 2 micro-batches sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
    pub micro_batches: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            rank: 0,
            ranks: 1,
            micro_batches: 1,
        }
    }
}

impl Shard {
    /// Micro-batches in one step's global batch, over all ranks.
    pub fn per_step(&self) -> usize {
        self.ranks * self.micro_batches
    }

    /// The global micro-batch index of this rank's `local`-th micro-batch of an epoch.
    fn global_index(&self, local: usize) -> usize {
        let (step, k) = (local / self.micro_batches, local % self.micro_batches);
        (step * self.ranks + self.rank) * self.micro_batches + k
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            shuffle: true,
            seed: 0,
            threads: 0,
            prefetch: 4,
            drop_last: false,
            strict: false,
            shard: Shard::default(),
        }
    }
}

/// One batch: NCHW f32 pixels, labels, and the dataset indices they came from. With several views per
/// sample (ten-crop), N = samples × views and the views of a sample are consecutive.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    pub shape: (usize, usize, usize, usize),
    pub views: usize,
    pub labels: Vec<u32>,
    pub indices: Vec<usize>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `(images [N,3,H,W] f32, labels [N] u32)` on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let images = Tensor::from_slice(&self.images, self.shape, device)?;
        let labels = Tensor::from_slice(&self.labels, self.labels.len(), device)?;
        Ok((images, labels))
    }
}

/// splitmix64: decorrelates nearby (seed, epoch, index) triples.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone)]
pub struct Loader {
    split: Arc<Split>,
    pipeline: Arc<Pipeline>,
    config: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
    skipped: Arc<Mutex<Vec<String>>>,
}

impl Loader {
    pub fn new(split: Split, pipeline: Pipeline, config: LoaderConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(DatasetError::Invalid {
                what: "batch size".into(),
                reason: "must be at least 1".into(),
            });
        }
        if split.is_empty() {
            return Err(DatasetError::Invalid {
                what: "dataset split".into(),
                reason: "has no images".into(),
            });
        }
        let shard = config.shard;
        if shard.ranks == 0 || shard.micro_batches == 0 || shard.rank >= shard.ranks {
            return Err(DatasetError::Invalid {
                what: "data shard".into(),
                reason: format!(
                    "rank {} of {} ranks with {} micro-batches per step",
                    shard.rank, shard.ranks, shard.micro_batches
                ),
            });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .map_err(|e| DatasetError::Invalid {
                what: "decode thread pool".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            split: Arc::new(split),
            pipeline: Arc::new(pipeline),
            config,
            pool: Arc::new(pool),
            skipped: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Threads decoding and augmenting images (`threads` of the config, or one per core for 0).
    pub fn decode_threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn split(&self) -> &Split {
        &self.split
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.split.len()
    }

    pub fn is_empty(&self) -> bool {
        self.split.is_empty()
    }

    /// Steps of an epoch: global batches of `batch_size × ranks × micro_batches` images.
    pub fn steps_per_epoch(&self) -> usize {
        let (n, b) = (
            self.split.len(),
            self.config.batch_size * self.config.shard.per_step(),
        );
        if self.config.drop_last {
            (n / b).max(1)
        } else {
            n.div_ceil(b)
        }
    }

    /// The micro-batches this loader yields in an epoch (its shard's, `micro_batches` per step).
    pub fn batches_per_epoch(&self) -> usize {
        self.steps_per_epoch() * self.config.shard.micro_batches
    }

    /// Sample indices of an epoch, in visiting order.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.split.len()).collect();
        if self.config.shuffle {
            let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.config.seed ^ mix(epoch)));
            order.shuffle(&mut rng);
        }
        order
    }

    /// Images skipped so far because they could not be decoded (path and reason).
    pub fn skipped(&self) -> Vec<String> {
        self.skipped.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Batch `index` of `epoch`, computed now on the pool.
    pub fn batch(&self, epoch: u64, index: usize) -> Result<Batch> {
        let order = self.order(epoch);
        self.batch_of(&order, epoch, index)
    }

    fn batch_of(&self, order: &[usize], epoch: u64, index: usize) -> Result<Batch> {
        let b = self.config.batch_size;
        let ids = &order[(index * b).min(order.len())..((index + 1) * b).min(order.len())];
        let seed = self.config.seed;
        let results: Vec<(usize, Result<Processed>)> = self.pool.install(|| {
            ids.par_iter()
                .map(|&i| {
                    let mut rng =
                        rand::rngs::StdRng::seed_from_u64(mix(seed ^ mix(epoch ^ mix(i as u64))));
                    let out = self
                        .split
                        .image(i)
                        .and_then(|img| self.pipeline.apply(&img, &mut rng));
                    (i, out)
                })
                .collect()
        });
        let mut batch = Batch {
            images: Vec::new(),
            shape: (0, 3, 0, 0),
            views: self.pipeline.views(),
            labels: Vec::with_capacity(ids.len()),
            indices: Vec::with_capacity(ids.len()),
        };
        for (i, result) in results {
            let (pixels, (h, w)) = match result {
                Ok(ok) => ok,
                Err(e @ DatasetError::Decode { .. }) => {
                    self.skip(i, e)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if batch.labels.is_empty() {
                batch.shape = (0, 3, h, w);
                batch.images.reserve(pixels.len() * ids.len());
            } else if (h, w) != (batch.shape.2, batch.shape.3) {
                return Err(DatasetError::Invalid {
                    what: self.split.describe_item(i),
                    reason: format!(
                        "is {h}×{w} after preprocessing but the batch is {}×{}: use a resize/crop transform",
                        batch.shape.2, batch.shape.3
                    ),
                });
            }
            batch.images.extend_from_slice(&pixels);
            batch.labels.push(self.split.label(i));
            batch.indices.push(i);
        }
        batch.shape.0 = batch.labels.len() * batch.views;
        Ok(batch)
    }

    fn skip(&self, index: usize, error: DatasetError) -> Result<()> {
        let mut skipped = self.skipped.lock().expect("skip list lock poisoned");
        let what = format!("{}: {error}", self.split.describe_item(index));
        if self.config.strict {
            return Err(DatasetError::Strict {
                count: skipped.len() + 1,
                first: skipped.first().cloned().unwrap_or(what),
            });
        }
        if !skipped.contains(&what) {
            eprintln!("warning: skipping unreadable image {what}");
            skipped.push(what);
        }
        Ok(())
    }

    /// This shard's batches of `epoch` from its `start`-th on, prepared ahead on a background thread.
    pub fn epoch(&self, epoch: u64, start: usize) -> Batches {
        let (tx, rx) = mpsc::sync_channel(self.config.prefetch.max(1));
        let loader = self.clone();
        let n = self.batches_per_epoch();
        let worker = std::thread::spawn(move || {
            let order = loader.order(epoch);
            for local in start..n {
                let index = loader.config.shard.global_index(local);
                let batch = loader.batch_of(&order, epoch, index);
                let stop = batch.is_err();
                if tx.send(batch).is_err() || stop {
                    break;
                }
            }
        });
        Batches {
            rx,
            _worker: worker,
        }
    }
}

/// Iterator over prefetched batches; dropping it stops the worker after its current batch.
pub struct Batches {
    rx: mpsc::Receiver<Result<Batch>>,
    _worker: std::thread::JoinHandle<()>,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

/// The mean image (CHW, [0, 1] pixels) of a split of equal-size images: the paper's per-pixel mean.
pub fn mean_image(split: &Split) -> Result<Vec<f32>> {
    let sums = (0..split.len())
        .into_par_iter()
        .map(|i| -> Result<Vec<f64>> {
            let img = split.image(i)?;
            Ok(crate::transforms::to_chw(&img)
                .iter()
                .map(|&v| v as f64)
                .collect())
        })
        .try_reduce_with(|mut a, b| {
            if a.len() != b.len() {
                return Err(DatasetError::Invalid {
                    what: "per-pixel mean".into(),
                    reason: "images of different sizes have no per-pixel mean".into(),
                });
            }
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            Ok(a)
        })
        .unwrap_or_else(|| Ok(Vec::new()))?;
    Ok(sums
        .iter()
        .map(|s| (s / split.len() as f64) as f32)
        .collect())
}
