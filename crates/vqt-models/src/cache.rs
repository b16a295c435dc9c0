//! The feature cache: with a deterministic frozen trunk, every image's trunk outputs are the same
//! every epoch, so they are computed once and training reads them back.
//!
//! * `kv`: per layer, the keys and values of the block's normalised input (`2·N·D` floats per
//!   layer per image) plus the final class token. Training does no trunk work at all.
//! * `hidden`: per layer, the block's input hidden state (`N·D`, half the bytes); each batch
//!   recomputes `LN1` and the K/V projections (2·N·D² MACs per layer) without autodiff.
//!
//! Storage is f32 or f16 (halving memory again; values are rounded once, then widened to f32).

use crate::vit::{TrunkKv, Vit};
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// What the cache stores per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheKind {
    /// Keys and values of each block's normalised input.
    Kv,
    /// Each block's input hidden state.
    Hidden,
}

/// Element type of the stored features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheDtype {
    /// 4 bytes per value, exact.
    F32,
    /// 2 bytes per value, rounded to half precision.
    F16,
}

#[derive(Debug, Clone)]
enum Store {
    /// Shared with the whole-layer tensors attention reads in place ([`FeatureCache::batch`]);
    /// written only while the cache is built.
    F32(std::sync::Arc<Vec<f32>>),
    F16(std::sync::Arc<Vec<half::f16>>),
    /// A section of a memory-mapped cache file: `elems` values of `dtype` at byte `offset`.
    Mapped { map: std::sync::Arc<memmap2::Mmap>, offset: usize, elems: usize, dtype: CacheDtype },
}

impl Store {
    fn new(dtype: CacheDtype) -> Self {
        match dtype {
            CacheDtype::F32 => Store::F32(Default::default()),
            CacheDtype::F16 => Store::F16(Default::default()),
        }
    }

    fn extend(&mut self, values: &[f32]) {
        match self {
            Store::F32(v) => std::sync::Arc::get_mut(v).expect("a cache is extended only while it is built").extend_from_slice(values),
            Store::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                let v = std::sync::Arc::get_mut(v).expect("a cache is extended only while it is built");
                let start = v.len();
                v.resize(start + values.len(), half::f16::ZERO);
                v[start..].convert_from_f32_slice(values);
            }
            Store::Mapped { .. } => unreachable!("mapped caches are read-only"),
        }
    }

    fn raw_bytes(&self) -> &[u8] {
        match self {
            Store::F32(v) => bytemuck_f32(v),
            Store::F16(v) => {
                // SAFETY: f16 is a plain 2-byte value type with no padding.
                unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2) }
            }
            Store::Mapped { map, offset, elems, dtype } => &map[*offset..*offset + elems * dtype.size()],
        }
    }

    fn gather(&self, rows: &[usize], row_len: usize, out: &mut Vec<f32>) {
        for &r in rows {
            let range = r * row_len..(r + 1) * row_len;
            match self {
                Store::F32(v) => out.extend_from_slice(&v[range]),
                Store::F16(v) => {
                    use half::slice::HalfFloatSliceExt;
                    let start = out.len();
                    out.resize(start + row_len, 0.0);
                    v[range].convert_to_f32_slice(&mut out[start..]);
                }
                Store::Mapped { map, offset, dtype, .. } => {
                    let bytes = &map[offset + range.start * dtype.size()..offset + range.end * dtype.size()];
                    match dtype {
                        CacheDtype::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
                        CacheDtype::F16 => out.extend(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
                    }
                }
            }
        }
    }

    /// The stored values as bytes shared with this store (no copy: the bytes keep a clone of
    /// the store, whose buffers are shared), in RAM or mapped, with their dtype.
    fn shared(&self) -> (bytes::Bytes, burn::tensor::DType) {
        struct Shared(Store);
        impl AsRef<[u8]> for Shared {
            fn as_ref(&self) -> &[u8] {
                self.0.raw_bytes()
            }
        }
        let dtype = match self {
            Store::F32(_) | Store::Mapped { dtype: CacheDtype::F32, .. } => burn::tensor::DType::F32,
            Store::F16(_) | Store::Mapped { dtype: CacheDtype::F16, .. } => burn::tensor::DType::F16,
        };
        // Mapped sections start 64-byte aligned in the file, and the map at a page.
        (bytes::Bytes::from_owner(Shared(self.clone())), dtype)
    }

    fn bytes(&self) -> usize {
        match self {
            Store::F32(v) => v.len() * 4,
            Store::F16(v) => v.len() * 2,
            Store::Mapped { elems, dtype, .. } => elems * dtype.size(),
        }
    }
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) }
}

impl CacheDtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            CacheDtype::F32 => 4,
            CacheDtype::F16 => 2,
        }
    }
}

/// Why a cache file could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// I/O failure on the file.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// Not a cache file, or a damaged one.
    #[error("{path}: not a vqt-rs feature cache: {msg}")]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A valid cache built for other inputs (checkpoint, data, preprocessing, size, dtype).
    #[error("{path}: cache was built for another `{field}` ({found}; this run: {expected}): delete it or pass another path to rebuild")]
    KeyMismatch {
        /// The file.
        path: std::path::PathBuf,
        /// The first key field that differs.
        field: String,
        /// Its value in the file (shortened).
        found: String,
        /// Its value for this run (shortened).
        expected: String,
    },
}

/// Format 2: a JSON key object and a CRC-32 of the payload. Format 1 (a string key, no
/// checksum) is refused.
const MAGIC: &[u8; 10] = b"VQTCACHE2\n";
/// The first 8 bytes of every format's magic.
const MAGIC_STEM: &[u8; 8] = b"VQTCACHE";

/// What a cache holds and how it is laid out (also the cache file's header, with the key).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Layout {
    kind: CacheKind,
    dtype: CacheDtype,
    /// Cached images.
    len: usize,
    heads: usize,
    tokens: usize,
    dim: usize,
}

#[derive(Serialize, Deserialize)]
struct FileHeader {
    /// What the cache was built from, one field per input (checkpoint, data content, pipeline…).
    key: serde_json::Value,
    #[serde(flatten)]
    layout: Layout,
    depth: usize,
}

/// The first field of `expected` whose value differs in `found` (keys of both objects, in
/// order), shortened for a one-line message.
fn key_difference(found: &serde_json::Value, expected: &serde_json::Value) -> Option<(String, String, String)> {
    let short = |v: Option<&serde_json::Value>| {
        let s = v.map_or("absent".to_string(), |v| v.to_string());
        if s.chars().count() > 80 { format!("{}…", s.chars().take(77).collect::<String>()) } else { s }
    };
    let (Some(f), Some(e)) = (found.as_object(), expected.as_object()) else {
        return (found != expected).then(|| ("key".to_string(), short(Some(found)), short(Some(expected))));
    };
    e.keys().chain(f.keys().filter(|k| !e.contains_key(*k))).find(|k| f.get(*k) != e.get(*k)).map(|k| (k.clone(), short(f.get(k)), short(e.get(k))))
}

/// Trunk outputs of a whole dataset, in host memory or a memory-mapped file, indexed by dataset
/// position.
#[derive(Debug)]
pub struct FeatureCache {
    layout: Layout,
    /// Per layer: keys `[len, H, N, Dh]` (kv) or hidden states `[len, N, D]` (hidden).
    layers: Vec<Store>,
    /// Per layer: values `[len, H, N, Dh]` (kv only; empty for hidden).
    values: Vec<Store>,
    /// `[len, D]`.
    cls: Store,
    /// Per layer, keys and values as `[len, H, N, Dh]` Flex tensors sharing the stores' memory
    /// (made on the first batch that reads them in place; `None` for a `hidden` cache).
    in_place: std::sync::OnceLock<Option<Vec<(Tensor<4>, Tensor<4>)>>>,
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    vqt_core::HostTensor::from_tensor(t).data
}

impl FeatureCache {
    /// Runs the frozen trunk over `batches` (images `[B, C, H, W]`, any device; run without
    /// autodiff) and stores the outputs in order. `progress` is called with each batch's size.
    pub fn build(
        vit: &Vit,
        batches: impl IntoIterator<Item = Tensor<4>>,
        kind: CacheKind,
        dtype: CacheDtype,
        mut progress: impl FnMut(usize),
    ) -> Self {
        let depth = vit.depth();
        let (tokens, dim) = (vit.num_tokens(), vit.embed_dim());
        let heads = vit.blocks.first().map(|b| b.attn.num_heads).unwrap_or(1);
        let mut cache = FeatureCache {
            layout: Layout { kind, dtype, len: 0, heads, tokens, dim },
            layers: (0..depth).map(|_| Store::new(dtype)).collect(),
            values: (0..if kind == CacheKind::Kv { depth } else { 0 }).map(|_| Store::new(dtype)).collect(),
            cls: Store::new(dtype),
            in_place: Default::default(),
        };
        for images in batches {
            let images = images.without_autodiff();
            let b = images.dims()[0];
            let mut z = vit.embed(images);
            for (m, block) in vit.blocks.iter().enumerate() {
                match kind {
                    CacheKind::Hidden => {
                        cache.layers[m].extend(&host(z.clone()));
                        z = block.forward(z);
                    }
                    CacheKind::Kv => {
                        // Stored in the [B, H, N, Dh] layout attention reads, so a batch is
                        // one contiguous upload per tensor.
                        let (next, k, v) = block.forward_kv(z, crate::vit::KeepKv::Copies);
                        cache.layers[m].extend(&host(k));
                        cache.values[m].extend(&host(v));
                        z = next;
                    }
                }
            }
            cache.cls.extend(&host(vit.pool(z).unsqueeze_dim::<3>(1)));
            cache.layout.len += b;
            progress(b);
        }
        cache
    }

    /// Number of cached images.
    pub fn len(&self) -> usize {
        self.layout.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.layout.len == 0
    }

    /// What is stored.
    pub fn kind(&self) -> CacheKind {
        self.layout.kind
    }

    /// Storage element type.
    pub fn dtype(&self) -> CacheDtype {
        self.layout.dtype
    }

    /// Host bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().chain(&self.values).map(Store::bytes).sum::<usize>() + self.cls.bytes()
    }

    /// Writes the cache to `path` (temp file + rename, so a crash never leaves a file that looks
    /// valid; a failed write removes the temp file). `key` identifies what it was built from (one
    /// field per input: checkpoint, data content, pipeline, kind, dtype);
    /// [`FeatureCache::open`] checks it field by field. The payload ends with its CRC-32.
    pub fn save(&self, path: &std::path::Path, key: &serde_json::Value) -> Result<(), CacheError> {
        vqt_core::fs::write_atomic_with(path, |f| self.write_to(f, key)).map_err(|error| CacheError::Io { path: path.to_path_buf(), error })
    }

    fn write_to(&self, f: &mut impl std::io::Write, key: &serde_json::Value) -> std::io::Result<()> {
        let header = FileHeader { key: key.clone(), layout: self.layout, depth: self.layers.len() };
        let header = serde_json::to_vec(&header).expect("header serialises");
        f.write_all(MAGIC)?;
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        let mut written = MAGIC.len() + 8 + header.len();
        let mut crc = crc32fast::Hasher::new();
        for store in self.layers.iter().chain(&self.values).chain(std::iter::once(&self.cls)) {
            let pad = vec![0u8; (64 - written % 64) % 64]; // 64-byte aligned sections
            for chunk in [&pad[..], store.raw_bytes()] {
                f.write_all(chunk)?;
                crc.update(chunk);
            }
            written += pad.len() + store.bytes();
        }
        f.write_all(&crc.finalize().to_le_bytes())
    }

    /// Memory-maps a cache written by [`FeatureCache::save`]; fails if a field of its key differs
    /// from `key` (naming the field), or if the file is damaged: truncated, or a payload whose
    /// CRC-32 does not match (checked here, one sequential read of the file). Pages are read on
    /// demand afterwards, so the cache may exceed RAM.
    pub fn open(path: &std::path::Path, key: &serde_json::Value) -> Result<Self, CacheError> {
        let fmt = |msg: String| CacheError::Format { path: path.to_path_buf(), msg };
        let file = std::fs::File::open(path).map_err(|source| CacheError::Io { path: path.to_path_buf(), error: source })?;
        // SAFETY: the file is only read; vqt-rs never modifies a cache file in place (it writes
        // a new file and renames it).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| CacheError::Io { path: path.to_path_buf(), error: source })?;
        if map.len() < MAGIC.len() + 8 || &map[..MAGIC_STEM.len()] != MAGIC_STEM {
            return Err(fmt("bad magic".into()));
        }
        if &map[..MAGIC.len()] != MAGIC {
            let v = String::from_utf8_lossy(&map[MAGIC_STEM.len()..MAGIC.len() - 1]).into_owned();
            return Err(fmt(format!("format {v} (an older vqt-rs); this version reads format 2: delete it or pass another path to rebuild")));
        }
        let hlen = u64::from_le_bytes(map[MAGIC.len()..MAGIC.len() + 8].try_into().unwrap()) as usize;
        let hstart = MAGIC.len() + 8;
        let header: FileHeader = map
            .get(hstart..hstart.saturating_add(hlen))
            .ok_or_else(|| fmt("truncated header".into()))
            .and_then(|h| serde_json::from_slice(h).map_err(|e| fmt(format!("bad header: {e}"))))?;
        if let Some((field, found, expected)) = key_difference(&header.key, key) {
            return Err(CacheError::KeyMismatch { path: path.to_path_buf(), field, found, expected });
        }
        let map = std::sync::Arc::new(map);
        let l = header.layout;
        // Keys, values ([len, H, N, Dh]) and hidden states ([len, N, D]) all hold len·N·D values.
        let per_layer = l.len * l.tokens * l.dim;
        let n_values = if l.kind == CacheKind::Kv { header.depth } else { 0 };
        let payload = hstart + hlen;
        let mut offset = payload;
        let mut section = |elems: usize| -> Result<Store, CacheError> {
            offset += (64 - offset % 64) % 64;
            let end = offset + elems * l.dtype.size();
            if end + 4 > map.len() {
                return Err(fmt(format!("truncated: needs {} bytes, has {}", end + 4, map.len())));
            }
            let s = Store::Mapped { map: map.clone(), offset, elems, dtype: l.dtype };
            offset = end;
            Ok(s)
        };
        let layers = (0..header.depth).map(|_| section(per_layer)).collect::<Result<Vec<_>, _>>()?;
        let values = (0..n_values).map(|_| section(per_layer)).collect::<Result<Vec<_>, _>>()?;
        let cls = section(l.len * l.dim)?;
        if map.len() != offset + 4 {
            return Err(fmt(format!("{} bytes, but its layout needs {}", map.len(), offset + 4)));
        }
        let stored = u32::from_le_bytes(map[offset..offset + 4].try_into().unwrap());
        if crc32fast::hash(&map[payload..offset]) != stored {
            return Err(fmt("the payload does not match its CRC-32 (damaged or overwritten): delete it or pass another path to rebuild".into()));
        }
        Ok(FeatureCache { layout: l, layers, values, cls, in_place: Default::default() })
    }

    /// Per layer, the whole stored keys and values as Flex tensors `[len, H, N, Dh]` (f32 or
    /// f16, as stored) sharing the stores' memory, or `None` (a `hidden` cache).
    fn in_place(&self) -> Option<&Vec<(Tensor<4>, Tensor<4>)>> {
        self.in_place
            .get_or_init(|| {
                let l = self.layout;
                if l.kind != CacheKind::Kv {
                    return None;
                }
                let device = Device::flex();
                let tensor = |store: &Store| -> Tensor<4> {
                    let (bytes, dtype) = store.shared();
                    let shared = burn::tensor::Bytes::from_shared(bytes, burn::tensor::AllocationProperty::Other);
                    let data = TensorData::from_bytes(shared, [l.len, l.heads, l.tokens, l.dim / l.heads], dtype);
                    Tensor::from_data(data, (&device, dtype))
                };
                Some(self.layers.iter().zip(&self.values).map(|(k, v)| (tensor(k), tensor(v))).collect())
            })
            .as_ref()
    }

    /// The trunk outputs of dataset rows `rows`, as plain (non-autodiff) tensors on `device`.
    /// For `hidden` caches, K/V are recomputed from the stored states with `vit`'s frozen blocks.
    ///
    /// On the `cpu` (Flex) backend at f32 precision (the device's default float dtype) a `kv`
    /// cache is not copied at all: the batch's [`TrunkKv`]
    /// holds every layer's whole keys and values (tensors sharing the cache's memory, in RAM or
    /// mapped, f32 or f16 as stored) with the batch's `rows` ([`TrunkKv::rows()`]), and the query
    /// side's attention reads each image's rows in place (an f16 cache widened head by head as it
    /// is read). Elsewhere (`hidden`, other backends or precisions, or [`use_gathered_batches`])
    /// the rows are gathered into batch tensors of the device's float dtype.
    pub fn batch(&self, vit: &Vit, rows: &[usize], device: &Device) -> TrunkKv {
        let l = self.layout;
        assert!(rows.iter().all(|&r| r < l.len), "cache row out of range");
        let device = device.clone().without_autodiff();
        let (b, n, d, h) = (rows.len(), l.tokens, l.dim, l.heads);
        // In place only where the query side runs in f32 (at another `--precision` the rows are
        // gathered into tensors of the device's float dtype).
        let f32_default = device.settings().float_dtype == burn::tensor::FloatDType::F32;
        if crate::ops::is_flex(&device) && f32_default && !GATHER.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(layers) = self.in_place() {
                let mut cls = Vec::with_capacity(b * d);
                self.cls.gather(rows, d, &mut cls);
                return TrunkKv { kv: layers.clone(), cls: Tensor::from_data(TensorData::new(cls, [b, d]), &device), rows: Some(std::sync::Arc::new(rows.to_vec())) };
            }
        }
        // Every stored tensor's rows are gathered across the threads first (a memory-bound copy:
        // 153 MB per step at ViT-S/14 112 px batch 128, 1.8 GB at ViT-B/16 224 px), then made
        // tensors in order.
        // (The buffers are allocated here, on the calling thread: allocated on rayon's threads
        // they came from the allocator's per-thread arenas as fresh pages every step, which made
        // the copy slower than the one-threaded one.)
        let stores: Vec<&Store> = self.layers.iter().chain(&self.values).collect();
        let mut firsts: Vec<Vec<f32>> = stores.iter().map(|_| Vec::with_capacity(b * n * d)).collect();
        firsts.par_iter_mut().zip(&stores).for_each(|(buf, store)| store.gather(rows, n * d, buf));
        let mut values = firsts.split_off(self.layers.len()).into_iter();
        let heads = |buf: Vec<f32>| Tensor::<4>::from_data(TensorData::new(buf, [b, h, n, d / h]), &device);
        let kv = firsts
            .into_iter()
            .zip(&vit.blocks)
            .map(|(buf, block)| match l.kind {
                CacheKind::Kv => (heads(buf), heads(values.next().expect("a value store per layer"))),
                CacheKind::Hidden => {
                    let z = Tensor::<3>::from_data(TensorData::new(buf, [b, n, d]), &device);
                    block.attn.kv(crate::ops::norm(&block.norm1, z))
                }
            })
            .collect();
        let mut cls = Vec::with_capacity(b * d);
        self.cls.gather(rows, d, &mut cls);
        TrunkKv { kv, cls: Tensor::from_data(TensorData::new(cls, [b, d]), &device), rows: None }
    }
}

static GATHER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For A/B measurements and tests (`vqt-bench step --cache-read gather`): `true` makes
/// [`FeatureCache::batch`] gather every batch's keys and values into batch tensors on the `cpu`
/// backend too, instead of handing the cache's layers over to be read in place, for the rest of
/// the process.
pub fn use_gathered_batches(on: bool) {
    GATHER.store(on, std::sync::atomic::Ordering::Relaxed);
}
