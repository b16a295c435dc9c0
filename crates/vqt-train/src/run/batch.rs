//! Batching: dataset rows, the trunk-path batchers (images or feature-cache rows) and the
//! per-epoch seeded shuffle that makes resumed runs see the same batches.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::transform::ShuffledDataset;
use burn::data::dataset::{Dataset, InMemDataset};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::sync::{Arc, Mutex};
use vqt_core::data::preprocess::{augment_seed as augment_seed_for, Preprocess};
use vqt_core::data::Sample;
use vqt_models::cache::FeatureCache;
use vqt_models::{TrunkBatch, TrunkInput, Vit};

/// One dataset row: its index into the split and its label.
#[derive(Clone, Debug)]
pub struct Item {
    /// Row within the split (and within its cache, when cached).
    pub row: usize,
    /// Class id.
    pub label: usize,
    /// The epoch it is served in (training; 0 elsewhere): seeds its augmentation.
    pub epoch: usize,
}

/// Builds trunk-path batches from images (decoded and preprocessed in the loader workers) or
/// from a feature cache.
#[derive(Clone)]
pub enum TrunkBatcher {
    /// Images of a split.
    Images {
        /// The split's samples.
        samples: Arc<Vec<Sample>>,
        /// Preprocessing.
        pre: Preprocess,
        /// `Some(run seed)`: apply the training augmentation, seeded per (seed, epoch, row).
        augment_seed: Option<u64>,
        /// Threads preprocessing one batch (`train.num_workers`); the result does not depend on it.
        threads: usize,
    },
    /// Rows of a feature cache.
    Cached {
        /// The cache.
        cache: Arc<FeatureCache>,
        /// The frozen backbone (hidden caches recompute K/V with it).
        vit: Arc<Vit>,
    },
}

impl Batcher<Item, TrunkBatch> for TrunkBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> TrunkBatch {
        let labels: Vec<i64> = items.iter().map(|i| i.label as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(labels, [items.len()]), device);
        let input = match self {
            TrunkBatcher::Images { samples, pre, augment_seed, threads } => {
                let (values, shape) = match augment_seed {
                    Some(seed) => {
                        let imgs: Vec<_> = items.iter().map(|i| (&samples[i.row].image, augment_seed_for(*seed, i.epoch, i.row))).collect();
                        pre.batch_train_on(&imgs, *threads)
                    }
                    None => pre.batch_on(&items.iter().map(|i| &samples[i.row].image).collect::<Vec<_>>(), *threads),
                };
                TrunkInput::Images(Tensor::from_data(TensorData::new(values, shape), &device.clone().without_autodiff()))
            }
            TrunkBatcher::Cached { cache, vit } => {
                let rows: Vec<usize> = items.iter().map(|i| i.row).collect();
                TrunkInput::Cached(cache.batch(vit, &rows, device))
            }
        };
        TrunkBatch { input, targets, rng_seed: None }
    }
}

/// The training batcher: a [`TrunkBatcher`] whose batches carry a device seed derived from the
/// run seed, the epoch and the batch's rows (see [`TrunkBatch::rng_seed`]), so dropout and
/// drop-path masks repeat exactly in a resumed run.
#[derive(Clone)]
pub struct SeededBatcher {
    /// Builds the batch.
    pub inner: TrunkBatcher,
    /// The run seed.
    pub seed: u64,
}

impl Batcher<Item, TrunkBatch> for SeededBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> TrunkBatch {
        let epoch = items.first().map_or(0, |i| i.epoch);
        let rows = items.iter().fold(0x5EED_u64, |h, i| augment_seed_for(h, epoch, i.row));
        let seed = augment_seed_for(self.seed ^ 0xD0_0D_F00D, epoch, rows as usize);
        TrunkBatch { rng_seed: Some(seed), ..self.inner.batch(items, device) }
    }
}

/// The training split in a fresh, seeded order every epoch, where epoch e's order depends only on
/// `(seed, e)`. burn's loader-level shuffle draws from an RNG that a resumed run cannot restore;
/// this order can be, so a resumed run sees the same batches as an uninterrupted one.
///
/// The loader asks for every row exactly once per epoch, so the epoch is the number of rows
/// served so far divided by the split size (plus the epoch the run started at).
pub struct EpochShuffled {
    items: Arc<Vec<Item>>,
    seed: u64,
    start_epoch: usize,
    served: std::sync::atomic::AtomicUsize,
    orders: Mutex<Vec<(usize, Arc<ShuffledDataset<InMemDataset<usize>, usize>>)>>,
}

impl EpochShuffled {
    /// Rows `items`, shuffled per epoch from `seed`, starting at epoch index `start_epoch`.
    pub fn new(items: Vec<Item>, seed: u64, start_epoch: usize) -> Self {
        Self { items: Arc::new(items), seed, start_epoch, served: Default::default(), orders: Mutex::new(Vec::new()) }
    }

    fn order(&self, epoch: usize) -> Arc<ShuffledDataset<InMemDataset<usize>, usize>> {
        let mut orders = self.orders.lock().expect("orders");
        if let Some((_, o)) = orders.iter().find(|(e, _)| *e == epoch) {
            return o.clone();
        }
        let ids = InMemDataset::new((0..self.items.len()).collect());
        let o = Arc::new(ShuffledDataset::new(ids, self.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64)));
        orders.retain(|(e, _)| *e + 1 >= epoch); // keep the current and previous epoch only
        orders.push((epoch, o.clone()));
        o
    }
}

impl Dataset<Item> for EpochShuffled {
    fn get(&self, index: usize) -> Result<Item, burn::data::dataset::DatasetError> {
        let n = self.served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let epoch = self.start_epoch + n / self.items.len().max(1);
        let row = self.order(epoch).get(index)?;
        Ok(Item { epoch, ..self.items[row].clone() })
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

/// One item per sample of a split, in order (epoch 0).
pub fn items(s: &[Sample]) -> Vec<Item> {
    s.iter().enumerate().map(|(row, x)| Item { row, label: x.label, epoch: 0 }).collect()
}
