//! Models whose tensor bytes need not be in memory ([`ModelRef`]).
//!
//! A large global model lives in a file on the server, and a result is spooled to a file as it
//! arrives; neither is ever read into memory whole. This crate does no IO, so a
//! [`StoredModel`] names its tensors and reads their bytes, a chunk at a time, through a
//! [`TensorSource`] the driver hands in (the node's is a safetensors file read with positional
//! reads; tests use memory). Everything that reads a model here (aggregation, loading) goes
//! through [`ModelRef::for_each_chunk`], so a stored model costs one chunk buffer, whatever
//! its size.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::{DType, FLModel, MetaValue, ModelError, ParamsType, Tensor, numel};

/// Bytes read per chunk from a stored model.
pub const READ_CHUNK: usize = 1 << 20;

/// The name, dtype and shape of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (row-major).
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// The tensor's size in bytes, or `None` on overflow.
    pub fn byte_len(&self) -> Option<usize> {
        numel(&self.shape)?.checked_mul(self.dtype.size())
    }
}

/// Why a stored model's bytes could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("reading tensor {tensor:?}: {reason}")]
pub struct SourceError {
    /// The tensor being read.
    pub tensor: String,
    /// What went wrong (the driver's IO error, with its file).
    pub reason: String,
}

/// Where a stored model's tensor bytes are: implemented by drivers (a file), and by tests.
pub trait TensorSource: Send + Sync + std::fmt::Debug {
    /// Fills `buf` with the bytes of tensor number `index` (in [`StoredModel::tensors`]
    /// order) from byte `offset` of that tensor on. The caller never reads past the tensor.
    fn read_at(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// A model whose tensors are read through a [`TensorSource`].
#[derive(Debug, Clone)]
pub struct StoredModel {
    /// The tensors, sorted by name (the order of [`FLModel::params`]).
    pub tensors: Vec<TensorInfo>,
    /// Full weights or a diff.
    pub params_type: ParamsType,
    /// Metrics reported with the model.
    pub metrics: BTreeMap<String, f64>,
    /// Metadata.
    pub meta: BTreeMap<String, MetaValue>,
    /// The round this model belongs to, when known.
    pub current_round: Option<u32>,
    /// The planned number of rounds, when known.
    pub total_rounds: Option<u32>,
    /// Where the bytes are.
    pub source: Arc<dyn TensorSource>,
}

impl StoredModel {
    /// A stored model; refuses tensors out of name order, repeated, badly named, or whose
    /// size overflows.
    pub fn new(
        tensors: Vec<TensorInfo>,
        source: Arc<dyn TensorSource>,
    ) -> Result<StoredModel, ModelError> {
        for t in &tensors {
            if t.name.is_empty() || t.name.len() > crate::model::MAX_NAME_LEN {
                return Err(ModelError::BadName(t.name.clone()));
            }
            if t.byte_len().is_none() {
                return Err(ModelError::ShapeOverflow {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                });
            }
        }
        if let Some(w) = tensors.windows(2).find(|w| w[0].name >= w[1].name) {
            return Err(ModelError::Incompatible {
                name: w[1].name.clone(),
                reason: "tensors out of order or repeated".into(),
            });
        }
        Ok(StoredModel {
            tensors,
            params_type: ParamsType::Full,
            metrics: BTreeMap::new(),
            meta: BTreeMap::new(),
            current_round: None,
            total_rounds: None,
            source,
        })
    }
}

/// A model in memory or stored: what the scatter-and-gather controller holds as its global
/// model and takes as results.
#[derive(Debug, Clone)]
pub enum ModelRef {
    /// Tensors in memory, shared.
    Memory(Arc<FLModel>),
    /// Tensors read on demand.
    Stored(Arc<StoredModel>),
}

impl PartialEq for ModelRef {
    /// Memory models compare by value; stored ones by identity.
    fn eq(&self, other: &ModelRef) -> bool {
        match (self, other) {
            (ModelRef::Memory(a), ModelRef::Memory(b)) => a == b,
            (ModelRef::Stored(a), ModelRef::Stored(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl From<FLModel> for ModelRef {
    fn from(m: FLModel) -> ModelRef {
        ModelRef::Memory(Arc::new(m))
    }
}

impl From<Arc<FLModel>> for ModelRef {
    fn from(m: Arc<FLModel>) -> ModelRef {
        ModelRef::Memory(m)
    }
}

impl ModelRef {
    /// The model, when it is in memory.
    pub fn in_memory(&self) -> Option<&Arc<FLModel>> {
        match self {
            ModelRef::Memory(m) => Some(m),
            ModelRef::Stored(_) => None,
        }
    }

    /// The address of the shared copy: two live models have the same identity exactly when
    /// they are the same shared model.
    pub fn identity(&self) -> usize {
        match self {
            ModelRef::Memory(m) => Arc::as_ptr(m) as usize,
            ModelRef::Stored(s) => Arc::as_ptr(s) as usize,
        }
    }

    /// Whether `self` and `other` are the same shared model (not merely equal ones).
    pub fn same(&self, other: &ModelRef) -> bool {
        self.identity() == other.identity()
    }

    /// The model with its round numbers set. A stored model shares its tensors with `self`;
    /// a model in memory is copied only when it is shared.
    pub fn with_rounds(self, current: Option<u32>, total: Option<u32>) -> ModelRef {
        match self {
            ModelRef::Memory(m) => {
                let mut m = Arc::unwrap_or_clone(m);
                m.current_round = current;
                m.total_rounds = total;
                ModelRef::Memory(Arc::new(m))
            }
            ModelRef::Stored(s) => {
                let mut s = Arc::unwrap_or_clone(s);
                s.current_round = current;
                s.total_rounds = total;
                ModelRef::Stored(Arc::new(s))
            }
        }
    }

    /// A view of some of the tensors, renamed: `rename` maps a tensor's name to its name in
    /// the view, or to `None` to leave it out; the view must keep name order (keeping names,
    /// or stripping one common prefix, does). When every tensor is kept under its own name
    /// the view is `self`. A stored model's view reads the same source; a memory model's
    /// copies the tensors it keeps. `params_type` overrides the type of the view.
    pub fn select(
        &self,
        rename: impl Fn(&str) -> Option<String>,
        params_type: Option<ParamsType>,
    ) -> Result<ModelRef, ModelError> {
        let infos = self.tensors();
        let kept: Vec<(usize, String)> = infos
            .iter()
            .enumerate()
            .filter_map(|(i, t)| rename(&t.name).map(|n| (i, n)))
            .collect();
        let same = kept.len() == infos.len() && kept.iter().all(|(i, n)| infos[*i].name == *n);
        if same && params_type.is_none_or(|p| p == self.params_type()) {
            return Ok(self.clone());
        }
        let params_type = params_type.unwrap_or(self.params_type());
        match self {
            ModelRef::Memory(m) => {
                let mut params = BTreeMap::new();
                for (i, name) in kept {
                    if let Some(t) = m.params.get(&infos[i].name) {
                        params.insert(name, t.clone());
                    }
                }
                Ok(ModelRef::from(FLModel {
                    params,
                    params_type,
                    metrics: m.metrics.clone(),
                    meta: m.meta.clone(),
                    current_round: m.current_round,
                    total_rounds: m.total_rounds,
                }))
            }
            ModelRef::Stored(s) => {
                let tensors = kept
                    .iter()
                    .map(|(i, name)| TensorInfo {
                        name: name.clone(),
                        ..infos[*i].clone()
                    })
                    .collect();
                let source = Arc::new(SubsetSource {
                    inner: Arc::clone(&s.source),
                    index: kept.iter().map(|(i, _)| *i).collect(),
                });
                let mut view = StoredModel::new(tensors, source)?;
                view.params_type = params_type;
                view.metrics = s.metrics.clone();
                view.meta = s.meta.clone();
                view.current_round = s.current_round;
                view.total_rounds = s.total_rounds;
                Ok(ModelRef::Stored(Arc::new(view)))
            }
        }
    }

    /// The tensors' names, dtypes and shapes, in name order.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        match self {
            ModelRef::Memory(m) => layout_of(m),
            ModelRef::Stored(s) => s.tensors.clone(),
        }
    }

    /// Full weights or a diff.
    pub fn params_type(&self) -> ParamsType {
        match self {
            ModelRef::Memory(m) => m.params_type,
            ModelRef::Stored(s) => s.params_type,
        }
    }

    /// Metrics reported with the model.
    pub fn metrics(&self) -> &BTreeMap<String, f64> {
        match self {
            ModelRef::Memory(m) => &m.metrics,
            ModelRef::Stored(s) => &s.metrics,
        }
    }

    /// Metadata.
    pub fn meta(&self) -> &BTreeMap<String, MetaValue> {
        match self {
            ModelRef::Memory(m) => &m.meta,
            ModelRef::Stored(s) => &s.meta,
        }
    }

    /// The round the model belongs to, when known.
    pub fn current_round(&self) -> Option<u32> {
        match self {
            ModelRef::Memory(m) => m.current_round,
            ModelRef::Stored(s) => s.current_round,
        }
    }

    /// The planned number of rounds, when known.
    pub fn total_rounds(&self) -> Option<u32> {
        match self {
            ModelRef::Memory(m) => m.total_rounds,
            ModelRef::Stored(s) => s.total_rounds,
        }
    }

    /// Total size of all tensors in bytes.
    pub fn num_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|t| t.byte_len().unwrap_or(0) as u64)
            .sum()
    }

    /// An integer metadata value, if present and integral.
    pub fn meta_int(&self, key: &str) -> Option<i64> {
        match self.meta().get(key)? {
            MetaValue::Int(v) => Some(*v),
            MetaValue::Float(f) if f.fract() == 0.0 => Some(*f as i64),
            _ => None,
        }
    }

    /// Checks that `other` has the same tensor names, shapes and dtypes as `self`.
    pub fn check_compatible(&self, other: &ModelRef) -> Result<(), ModelError> {
        check_layout(&self.tensors(), &other.tensors())
    }

    /// Calls `f(index, info, byte_offset, bytes)` for every tensor in name order, with its
    /// bytes in pieces of at most [`READ_CHUNK`] (a memory model's in place, a stored one's
    /// read into one reused buffer). A tensor of no bytes gets one call with an empty slice.
    /// Stops at the first error `f` returns.
    pub fn for_each_chunk<E: From<SourceError>>(
        &self,
        mut f: impl FnMut(usize, &TensorInfo, usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            ModelRef::Memory(m) => memory_chunks(m, f),
            ModelRef::Stored(s) => {
                let mut buf = Vec::new();
                for (i, info) in s.tensors.iter().enumerate() {
                    let len = info.byte_len().unwrap_or(0);
                    if len == 0 {
                        f(i, info, 0, &[])?;
                    }
                    let mut at = 0;
                    while at < len {
                        let n = (len - at).min(READ_CHUNK);
                        buf.resize(n, 0);
                        s.source
                            .read_at(i, at as u64, &mut buf[..n])
                            .map_err(|reason| SourceError {
                                tensor: info.name.clone(),
                                reason,
                            })?;
                        f(i, info, at, &buf[..n])?;
                        at += n;
                    }
                }
                Ok(())
            }
        }
    }

    /// The model in memory: the shared one itself, or a stored one read tensor by tensor
    /// (one copy, each tensor allocated at its size).
    pub fn load(&self) -> Result<Arc<FLModel>, LoadError> {
        let s = match self {
            ModelRef::Memory(m) => return Ok(Arc::clone(m)),
            ModelRef::Stored(s) => s,
        };
        let mut params = BTreeMap::new();
        let mut filling: Vec<u8> = Vec::new();
        self.for_each_chunk(|i, info, at, bytes| -> Result<(), LoadError> {
            let len = info.byte_len().unwrap_or(0);
            if at == 0 {
                filling = Vec::with_capacity(len);
            }
            filling.extend_from_slice(bytes);
            if filling.len() == len {
                let t = Tensor::from_bytes(
                    info.dtype,
                    info.shape.clone(),
                    std::mem::take(&mut filling),
                )?;
                params.insert(s.tensors[i].name.clone(), t);
            }
            Ok(())
        })?;
        Ok(Arc::new(FLModel {
            params,
            params_type: s.params_type,
            metrics: s.metrics.clone(),
            meta: s.meta.clone(),
            current_round: s.current_round,
            total_rounds: s.total_rounds,
        }))
    }
}

/// Some tensors of another source, by their index there ([`ModelRef::select`]).
#[derive(Debug)]
struct SubsetSource {
    inner: Arc<dyn TensorSource>,
    index: Vec<usize>,
}

impl TensorSource for SubsetSource {
    fn read_at(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let Some(&i) = self.index.get(index) else {
            return Err(format!("no tensor number {index} in the view"));
        };
        self.inner.read_at(i, offset, buf)
    }
}

/// The names, dtypes and shapes of a model in memory, in name order.
pub fn layout_of(m: &FLModel) -> Vec<TensorInfo> {
    m.params
        .iter()
        .map(|(name, t)| TensorInfo {
            name: name.clone(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        })
        .collect()
}

/// [`ModelRef::for_each_chunk`] over a model in memory: its tensors' bytes where they are.
pub(crate) fn memory_chunks<E>(
    m: &FLModel,
    mut f: impl FnMut(usize, &TensorInfo, usize, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    for (i, (name, t)) in m.params.iter().enumerate() {
        let info = TensorInfo {
            name: name.clone(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        };
        if t.bytes().is_empty() {
            f(i, &info, 0, &[])?;
        }
        for (k, piece) in t.bytes().chunks(READ_CHUNK).enumerate() {
            f(i, &info, k * READ_CHUNK, piece)?;
        }
    }
    Ok(())
}

/// Checks that `theirs` has exactly the tensors of `mine`, with the same dtypes and shapes;
/// the error names the first tensor that differs.
pub fn check_layout(mine: &[TensorInfo], theirs: &[TensorInfo]) -> Result<(), ModelError> {
    let by_name: BTreeMap<&str, &TensorInfo> =
        theirs.iter().map(|t| (t.name.as_str(), t)).collect();
    for t in mine {
        let Some(o) = by_name.get(t.name.as_str()) else {
            return Err(ModelError::Incompatible {
                name: t.name.clone(),
                reason: "missing".into(),
            });
        };
        if o.shape != t.shape || o.dtype != t.dtype {
            return Err(ModelError::Incompatible {
                name: t.name.clone(),
                reason: format!(
                    "expected {:?} {:?}, got {:?} {:?}",
                    t.dtype, t.shape, o.dtype, o.shape
                ),
            });
        }
    }
    let names: std::collections::BTreeSet<&str> = mine.iter().map(|t| t.name.as_str()).collect();
    if let Some(extra) = theirs.iter().find(|t| !names.contains(t.name.as_str())) {
        return Err(ModelError::Incompatible {
            name: extra.name.clone(),
            reason: "unexpected tensor".into(),
        });
    }
    Ok(())
}

/// Why a stored model could not be loaded into memory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    /// Reading failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The bytes did not make a tensor.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A [`TensorSource`] over tensors in memory, for tests and simulations.
#[derive(Debug)]
pub struct MemorySource(pub Vec<Vec<u8>>);

impl TensorSource for MemorySource {
    fn read_at(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let t = self.0.get(index).ok_or("no such tensor")?;
        let start = usize::try_from(offset).map_err(|_| "offset too large")?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| t.get(start..end))
            .ok_or("read past the tensor")?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl StoredModel {
    /// `model` as a stored model over a [`MemorySource`] (tests and simulations).
    pub fn from_memory(model: &FLModel) -> StoredModel {
        let tensors =
            ModelRef::Memory(Arc::new(FLModel::from_params(model.params.clone()))).tensors();
        let bytes = model.params.values().map(|t| t.bytes().to_vec()).collect();
        StoredModel {
            tensors,
            params_type: model.params_type,
            metrics: model.metrics.clone(),
            meta: model.meta.clone(),
            current_round: model.current_round,
            total_rounds: model.total_rounds,
            source: Arc::new(MemorySource(bytes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> FLModel {
        let big: Vec<f32> = (0..(READ_CHUNK / 4 * 2 + 3)).map(|i| i as f32).collect();
        let mut m = FLModel::from_params(BTreeMap::from([
            (
                "a".to_string(),
                Tensor::from_f32(vec![big.len()], &big).unwrap(),
            ),
            ("b".to_string(), Tensor::zeros(DType::F32, vec![0]).unwrap()),
            (
                "c".to_string(),
                Tensor::from_i64(vec![2], &[7, -8]).unwrap(),
            ),
        ]));
        m.metrics.insert("accuracy".into(), 0.5);
        m.current_round = Some(2);
        m
    }

    #[test]
    fn a_stored_model_loads_back_equal_and_reads_in_chunks() {
        let m = model();
        let stored = ModelRef::Stored(Arc::new(StoredModel::from_memory(&m)));
        assert_eq!(*stored.load().unwrap(), m);
        let mut pieces = Vec::new();
        stored
            .for_each_chunk(|i, _, at, b| -> Result<(), SourceError> {
                pieces.push((i, at, b.len()));
                Ok(())
            })
            .unwrap();
        assert_eq!(pieces.len(), 3 + 1 + 1, "{pieces:?}");
        assert!(pieces.iter().all(|p| p.2 <= READ_CHUNK));
        assert_eq!(stored.num_bytes(), m.num_bytes() as u64);
        let mem = ModelRef::from(m);
        assert!(mem.check_compatible(&stored).is_ok());
    }

    #[test]
    fn a_failing_source_names_the_tensor() {
        #[derive(Debug)]
        struct Broken;
        impl TensorSource for Broken {
            fn read_at(&self, _: usize, _: u64, _: &mut [u8]) -> Result<(), String> {
                Err("disk gone".into())
            }
        }
        let info = TensorInfo {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![4],
        };
        let s = ModelRef::Stored(Arc::new(
            StoredModel::new(vec![info], Arc::new(Broken)).unwrap(),
        ));
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("\"w\"") && err.contains("disk gone"), "{err}");
    }

    #[test]
    fn out_of_order_or_oversized_layouts_are_refused() {
        let t = |n: &str, shape: Vec<usize>| TensorInfo {
            name: n.into(),
            dtype: DType::F32,
            shape,
        };
        let src: Arc<dyn TensorSource> = Arc::new(MemorySource(vec![]));
        assert!(StoredModel::new(vec![t("b", vec![1]), t("a", vec![1])], src.clone()).is_err());
        assert!(StoredModel::new(vec![t("a", vec![usize::MAX, 8])], src.clone()).is_err());
        assert!(StoredModel::new(vec![t("", vec![1])], src).is_err());
    }
}
