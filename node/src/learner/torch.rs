//! The LibTorch back-end (feature `torch`): the MNIST CNN of [`super::cnn`] trained through
//! `tch`, on the CPU or a CUDA GPU.
//!
//! Parameters cross the FL boundary by name: a [`CnnNet`]'s variables are named exactly as
//! the PyTorch module's `state_dict()` keys and travel as [`FLModel`] tensors in the dtype
//! the network uses, so a model trained here loads into PyTorch with
//! `load_state_dict(strict=True)` and back.
//!
//! CUDA without `LD_PRELOAD`: the linker drops `libtorch_cuda.so` from the binary's needed
//! libraries because nothing references it directly, and LibTorch then reports no GPU.
//! [`resolve_device`] loads it (once per process) from the directory of the
//! `libtorch_cpu.so` this process was started with, before the first CUDA query.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use flare_protocols::model::{DType, FLModel, MetaValue, ModelError, Tensor as FlTensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::cnn::{CnnHyper, DeviceSpec, OptimizerKind};
use super::{Learner, LearnerError, samples_meta};
use crate::data::Dataset;
use crate::data::mnist::PIXELS;

const MEAN: f64 = 0.1307;
const STD: f64 = 0.3081;

fn backend(e: impl std::fmt::Display) -> LearnerError {
    LearnerError::Backend(e.to_string())
}

/// The MNIST CNN as a LibTorch module (see [`super::cnn`] for the layers).
#[derive(Debug)]
pub struct CnnNet {
    vs: nn::VarStore,
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
    dropout: bool,
}

impl CnnNet {
    /// A network with LibTorch's default initialization on `device`.
    pub fn new(device: Device, dropout: bool) -> CnnNet {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let conv1 = nn::conv2d(&root / "conv1", 1, 32, 3, Default::default());
        let conv2 = nn::conv2d(&root / "conv2", 32, 64, 3, Default::default());
        let fc1 = nn::linear(&root / "fc1", 9216, 128, Default::default());
        let fc2 = nn::linear(&root / "fc2", 128, 10, Default::default());
        CnnNet {
            vs,
            conv1,
            conv2,
            fc1,
            fc2,
            dropout,
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Logits for a batch of normalized images `[b, 1, 28, 28]`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let drop = train && self.dropout;
        xs.apply(&self.conv1)
            .relu()
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .dropout(0.25, drop)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
            .dropout(0.5, drop)
            .apply(&self.fc2)
    }

    /// The variables by name, sorted.
    fn variables(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// Copies the weights of `model` in, checking names, shapes and dtypes.
    pub fn load(&mut self, model: &FLModel) -> Result<(), LearnerError> {
        let vars = self.variables();
        if let Some(extra) = model.params.keys().find(|k| !vars.contains_key(*k)) {
            return Err(ModelError::Incompatible {
                name: extra.clone(),
                reason: "unexpected tensor".into(),
            }
            .into());
        }
        for (name, mut var) in vars {
            let t = model
                .params
                .get(&name)
                .ok_or_else(|| ModelError::Incompatible {
                    name: name.clone(),
                    reason: "missing".into(),
                })?;
            let kind = var.kind();
            let want: Vec<usize> = var.size().iter().map(|&d| d as usize).collect();
            if t.shape() != want || Some(t.dtype()) != dtype_of(kind) {
                return Err(ModelError::Incompatible {
                    name,
                    reason: format!(
                        "expected {kind:?} {want:?}, got {:?} {:?}",
                        t.dtype(),
                        t.shape()
                    ),
                }
                .into());
            }
            let src = to_tch(t).map_err(backend)?;
            tch::no_grad(|| var.f_copy_(&src)).map_err(backend)?;
        }
        Ok(())
    }

    /// The weights as a model with full parameters, in the network's dtype.
    pub fn to_model(&self) -> Result<FLModel, LearnerError> {
        let params = self
            .variables()
            .into_iter()
            .map(|(name, var)| Ok((name, from_tch(&var).map_err(backend)?)))
            .collect::<Result<BTreeMap<_, _>, LearnerError>>()?;
        Ok(FLModel::from_params(params))
    }
}

/// The FL dtype of a LibTorch kind, when Flare carries it.
fn dtype_of(kind: Kind) -> Option<DType> {
    match kind {
        Kind::Float => Some(DType::F32),
        Kind::Half => Some(DType::F16),
        Kind::BFloat16 => Some(DType::BF16),
        Kind::Int64 => Some(DType::I64),
        _ => None,
    }
}

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I8 => Kind::Int8,
    }
}

/// A CPU LibTorch tensor with the same bytes (both little-endian on the hosts we build for).
fn to_tch(t: &FlTensor) -> Result<Tensor, tch::TchError> {
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(t.bytes(), &shape, kind_of(t.dtype()))
}

/// An FL tensor with the bytes of `t` (copied to the CPU first when it lives on a GPU).
fn from_tch(t: &Tensor) -> Result<FlTensor, tch::TchError> {
    let kind = t.f_kind()?;
    let dtype = dtype_of(kind)
        .ok_or_else(|| tch::TchError::Kind(format!("Flare does not carry {kind:?} tensors")))?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * dtype.size()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    FlTensor::from_bytes(dtype, shape, bytes).map_err(|e| tch::TchError::Shape(e.to_string()))
}

/// Normalized images `[n, 1, 28, 28]` and labels `[n]` of `data[indices]`, on `device`.
pub fn to_device(data: &Dataset, indices: &[usize], device: Device) -> (Tensor, Tensor) {
    let mut x = Vec::with_capacity(indices.len() * PIXELS);
    for &i in indices {
        x.extend(data.image(i).iter().map(|&p| f32::from(p) / 255.0));
    }
    let n = indices.len() as i64;
    let x = ((Tensor::from_slice(&x).view([n, 1, 28, 28]) - MEAN) / STD).to_device(device);
    let y: Vec<i64> = indices.iter().map(|&i| i64::from(data.labels[i])).collect();
    (x, Tensor::from_slice(&y).to_device(device))
}

/// Adadelta as in `torch.optim.Adadelta` (LibTorch's C++ API has no Adadelta).
#[derive(Debug)]
struct Adadelta {
    params: Vec<Tensor>,
    square_avg: Vec<Tensor>,
    acc_delta: Vec<Tensor>,
    lr: f64,
}

impl Adadelta {
    const RHO: f64 = 0.9;
    const EPS: f64 = 1e-6;

    fn new(params: Vec<Tensor>, lr: f64) -> Adadelta {
        let zeros = || params.iter().map(Tensor::zeros_like).collect::<Vec<_>>();
        Adadelta {
            square_avg: zeros(),
            acc_delta: zeros(),
            params,
            lr,
        }
    }

    fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    fn step(&mut self) {
        tch::no_grad(|| {
            for ((p, sq), acc) in self
                .params
                .iter_mut()
                .zip(&mut self.square_avg)
                .zip(&mut self.acc_delta)
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = sq.g_mul_scalar_(Self::RHO);
                let _ = sq.g_add_(&(&g * &g * (1.0 - Self::RHO)));
                let std = (&*sq + Self::EPS).sqrt();
                let delta = (&*acc + Self::EPS).sqrt() / std * &g;
                let _ = acc.g_mul_scalar_(Self::RHO);
                let _ = acc.g_add_(&(&delta * &delta * (1.0 - Self::RHO)));
                let _ = p.g_add_(&(delta * -self.lr));
            }
        });
    }
}

/// An optimizer over a [`CnnNet`]'s variables.
#[derive(Debug)]
enum Optim {
    Torch(nn::Optimizer),
    Adadelta(Adadelta),
}

/// The CNN with its optimizer: one training step at a time. Shared by the learner and by
/// `flare-node bench torch-step`, so the benchmark times exactly the step that FL runs.
#[derive(Debug)]
pub struct CnnTrainer {
    net: CnnNet,
    opt: Optim,
}

impl CnnTrainer {
    /// A network on `device` and its optimizer.
    pub fn new(device: Device, hyper: &CnnHyper) -> Result<CnnTrainer, LearnerError> {
        let net = CnnNet::new(device, hyper.dropout);
        let opt = match hyper.optimizer {
            OptimizerKind::Sgd => Optim::Torch(
                nn::sgd(0.0, 0.0, 0.0, false)
                    .build(&net.vs, hyper.lr)
                    .map_err(backend)?,
            ),
            OptimizerKind::Adam => Optim::Torch(
                nn::adam(0.9, 0.999, 0.0)
                    .build(&net.vs, hyper.lr)
                    .map_err(backend)?,
            ),
            OptimizerKind::Adadelta => {
                Optim::Adadelta(Adadelta::new(net.vs.trainable_variables(), hyper.lr))
            }
        };
        Ok(CnnTrainer { net, opt })
    }

    /// The network.
    pub fn net(&self) -> &CnnNet {
        &self.net
    }

    /// The network, to load weights into.
    pub fn net_mut(&mut self) -> &mut CnnNet {
        &mut self.net
    }

    /// One optimizer step on a batch; returns the batch's mean loss as a tensor on the
    /// device (reading it would wait for the GPU, so callers read it rarely).
    pub fn step(&mut self, x: &Tensor, y: &Tensor) -> Tensor {
        let loss = self.net.forward_t(x, true).cross_entropy_for_logits(y);
        match &mut self.opt {
            Optim::Torch(o) => o.backward_step(&loss),
            Optim::Adadelta(o) => {
                o.zero_grad();
                loss.backward();
                o.step();
            }
        }
        loss.detach()
    }

    /// Trains `epochs` over `(x, y)` in mini-batches of `batch_size`, shuffled by `rng`;
    /// returns the mean loss of the last epoch.
    pub fn train_epochs(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        hyper: &CnnHyper,
        rng: &mut ChaCha8Rng,
    ) -> Result<f64, LearnerError> {
        let n = y.size().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(LearnerError::NoData);
        }
        let device = self.net.device();
        let bs = hyper.batch_size.max(1) as i64;
        let mut order: Vec<i64> = (0..n).collect();
        let mut last = 0.0;
        for _ in 0..hyper.epochs.max(1) {
            order.shuffle(rng);
            let perm = Tensor::from_slice(&order).to_device(device);
            // Summed on the device: one read per epoch, not one GPU sync per step.
            let mut total = Tensor::zeros([], (Kind::Float, device));
            let mut start = 0;
            while start < n {
                let len = bs.min(n - start);
                let idx = perm.narrow(0, start, len);
                let loss = self.step(&x.index_select(0, &idx), &y.index_select(0, &idx));
                total += loss * (len as f64);
                start += len;
            }
            last = f64::try_from(total / (n as f64)).map_err(backend)?;
            if !last.is_finite() {
                return Err(LearnerError::Diverged(format!("loss is {last}")));
            }
        }
        Ok(last)
    }
}

/// Accuracy and mean loss of `net` on `(x, y)`.
pub fn evaluate(
    net: &CnnNet,
    x: &Tensor,
    y: &Tensor,
) -> Result<BTreeMap<String, f64>, LearnerError> {
    let n = y.size().first().copied().unwrap_or(0);
    let (correct, loss) = tch::no_grad(|| -> Result<(f64, f64), tch::TchError> {
        let mut correct = Tensor::zeros([], (Kind::Int64, net.device()));
        let mut loss = Tensor::zeros([], (Kind::Float, net.device()));
        let mut start = 0;
        while start < n {
            let len = 1000.min(n - start);
            let logits = net.forward_t(&x.narrow(0, start, len), false);
            let yb = y.narrow(0, start, len);
            correct += logits.argmax(-1, false).eq_tensor(&yb).sum(Kind::Int64);
            loss += logits.cross_entropy_for_logits(&yb) * (len as f64);
            start += len;
        }
        Ok((f64::try_from(correct)?, f64::try_from(loss)?))
    })
    .map_err(backend)?;
    let n = n.max(1) as f64;
    Ok(BTreeMap::from([
        ("accuracy".to_string(), correct / n),
        ("loss".to_string(), loss / n),
    ]))
}

/// Turns a configured device into a LibTorch device, loading LibTorch's CUDA back-end first
/// when a GPU may be used. `cuda` without a usable GPU is an error; `auto` falls back to the
/// CPU and says so in the log.
pub fn resolve_device(spec: DeviceSpec) -> Result<Device, LearnerError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(i) => {
            let lib = load_torch_cuda().map_err(|e| {
                LearnerError::Backend(format!(
                    "device {spec}: cannot load LibTorch's CUDA back-end: {e}"
                ))
            })?;
            let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
            if count == 0 {
                return Err(LearnerError::Backend(format!(
                    "device {spec}: no CUDA GPU is visible (LibTorch's CUDA back-end {} is loaded; check the driver and CUDA_VISIBLE_DEVICES, or use \"cpu\" or \"auto\")",
                    lib.display()
                )));
            }
            if i >= count {
                return Err(LearnerError::Backend(format!(
                    "device {spec}: only {count} CUDA GPU(s) are visible"
                )));
            }
            Ok(Device::Cuda(i))
        }
        DeviceSpec::Auto => match load_torch_cuda() {
            Ok(_) if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            Ok(lib) => {
                tracing::info!(cuda = %lib.display(), "device auto: no CUDA GPU is visible; training on the CPU");
                Ok(Device::Cpu)
            }
            Err(e) => {
                tracing::info!(reason = %e, "device auto: LibTorch's CUDA back-end is not usable; training on the CPU");
                Ok(Device::Cpu)
            }
        },
    }
}

/// Loads `libtorch_cuda.so` once per process and returns its path.
fn load_torch_cuda() -> Result<PathBuf, String> {
    static LOADED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let path = find_torch_cuda()?;
            dlopen_global(&path)?;
            tracing::debug!(path = %path.display(), "loaded LibTorch's CUDA back-end");
            Ok(path)
        })
        .clone()
}

/// Where `libtorch_cuda.so` is: next to the `libtorch_cpu.so` mapped into this process,
/// else in `$LIBTORCH/lib` or a directory of `$LD_LIBRARY_PATH`.
fn find_torch_cuda() -> Result<PathBuf, String> {
    const NAME: &str = "libtorch_cuda.so";
    let mut tried = Vec::new();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mapped = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(Path::new)
        .find(|p| p.file_name().is_some_and(|f| f == "libtorch_cpu.so"))
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let env_dirs = std::env::var_os("LIBTORCH")
        .map(|d| PathBuf::from(d).join("lib"))
        .into_iter()
        .chain(
            std::env::var_os("LD_LIBRARY_PATH")
                .map(|v| std::env::split_paths(&v).collect::<Vec<_>>())
                .unwrap_or_default(),
        );
    for dir in mapped.into_iter().chain(env_dirs) {
        let p = dir.join(NAME);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(dir.display().to_string());
    }
    Err(format!(
        "{NAME} not found (looked next to the loaded libtorch_cpu.so and in $LIBTORCH/lib and $LD_LIBRARY_PATH: {}); this LibTorch may be a CPU-only build",
        if tried.is_empty() {
            "nothing to look in".to_string()
        } else {
            tried.join(", ")
        }
    ))
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`, never closed: the library's static initializers
/// register LibTorch's CUDA hooks, which must stay loaded for the rest of the process.
#[allow(unsafe_code)]
fn dlopen_global(path: &Path) -> Result<(), String> {
    use std::ffi::{CStr, CString};
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call. Loading
    // libtorch_cuda runs its initializers, which only register CUDA support with the
    // libtorch already in this process (the same build, found next to it). The handle is
    // deliberately leaked, so the library's code stays mapped while anything may use it.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc, valid until
        // the next dl* call on this thread; it is copied out at once.
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown dlopen error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("dlopen {}: {msg}", path.display()));
    }
    Ok(())
}

/// A site's LibTorch CNN learner: its share of the training set and the validation set,
/// both kept on the training device, and an optimizer whose state persists across rounds.
#[derive(Debug)]
pub struct TorchCnnLearner {
    hyper: CnnHyper,
    trainer: CnnTrainer,
    train: (Tensor, Tensor),
    validation: (Tensor, Tensor),
    rng: ChaCha8Rng,
    site: usize,
    /// Seconds the last validation took; the `trained` log line reports it, so the time a
    /// site spends on a round beside the training step can be told from the time between
    /// sites.
    validate_s: f64,
}

impl TorchCnnLearner {
    /// A learner that trains on `train[indices]` and validates on `validation`, on
    /// `device`.
    pub fn new(
        hyper: CnnHyper,
        device: DeviceSpec,
        train: &Dataset,
        indices: &[usize],
        validation: &Arc<Dataset>,
        site: usize,
    ) -> Result<Self, LearnerError> {
        // The device first: loading the CUDA back-end must precede any other LibTorch call.
        let device = resolve_device(device)?;
        guarded(|| {
            tch::manual_seed(hyper.seed.wrapping_add(site as u64) as i64);
            let trainer = CnnTrainer::new(device, &hyper)?;
            let all: Vec<usize> = (0..validation.len()).collect();
            let learner = TorchCnnLearner {
                rng: ChaCha8Rng::seed_from_u64(hyper.seed ^ (site as u64).rotate_left(17)),
                train: to_device(train, indices, device),
                validation: to_device(validation, &all, device),
                hyper,
                trainer,
                site,
                validate_s: 0.0,
            };
            tracing::info!(
                site = site + 1,
                ?device,
                samples = indices.len(),
                "torch CNN learner ready"
            );
            Ok(learner)
        })
    }

    /// Number of local training examples.
    pub fn num_samples(&self) -> usize {
        self.train.1.size().first().map_or(0, |&n| n as usize)
    }
}

/// Runs `f`, turning a LibTorch error that `tch` raises as a panic (its non-`f_` methods,
/// for example on CUDA running out of memory) into a [`LearnerError`], so a failing step
/// fails the task instead of the node.
fn guarded<T>(f: impl FnOnce() -> Result<T, LearnerError>) -> Result<T, LearnerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown error".into());
        Err(LearnerError::Backend(format!("LibTorch: {msg}")))
    })
}

impl Learner for TorchCnnLearner {
    fn train(&mut self, global: &FLModel, round: u32) -> Result<FLModel, LearnerError> {
        guarded(|| self.train_round(global, round))
    }

    fn validate(&mut self, model: &FLModel) -> Result<BTreeMap<String, f64>, LearnerError> {
        let started = Instant::now();
        let metrics = guarded(|| {
            self.trainer.net_mut().load(model)?;
            evaluate(self.trainer.net(), &self.validation.0, &self.validation.1)
        });
        self.validate_s = started.elapsed().as_secs_f64();
        metrics
    }
}

impl TorchCnnLearner {
    fn train_round(&mut self, global: &FLModel, round: u32) -> Result<FLModel, LearnerError> {
        let started = Instant::now();
        self.trainer.net_mut().load(global)?;
        let loaded = Instant::now();
        let loss =
            self.trainer
                .train_epochs(&self.train.0, &self.train.1, &self.hyper, &mut self.rng)?;
        let trained = Instant::now();
        let mut out = self.trainer.net().to_model()?;
        let n = self.num_samples();
        let train_s = (trained - loaded).as_secs_f64();
        let samples_per_s = (n * self.hyper.epochs.max(1)) as f64 / train_s.max(1e-9);
        tracing::info!(
            site = self.site + 1,
            round,
            loss,
            train_s,
            samples_per_s,
            validate_s = self.validate_s,
            load_s = (loaded - started).as_secs_f64(),
            export_s = trained.elapsed().as_secs_f64(),
            "trained"
        );
        let (k, v) = samples_meta(n);
        out.meta.insert(k, v);
        out.meta.insert("train_loss".into(), MetaValue::Float(loss));
        out.meta
            .insert("train_seconds".into(), MetaValue::Float(train_s));
        out.meta.insert(
            "train_samples_per_s".into(),
            MetaValue::Float(samples_per_s),
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::cnn::{self, CNN_PARAMS};
    use super::*;

    fn mnist() -> (Dataset, Dataset) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        Dataset::load_mnist_test(&dir).unwrap().split(2_000, 0)
    }

    #[test]
    fn weights_round_trip_and_mismatches_name_the_tensor() {
        let mut net = CnnNet::new(Device::Cpu, true);
        let m = cnn::init(5);
        net.load(&m).unwrap();
        assert_eq!(net.to_model().unwrap(), m);

        let mut missing = m.clone();
        missing.params.remove("fc2.bias");
        let mut extra = m.clone();
        extra.params.insert(
            "fc3.weight".into(),
            FlTensor::zeros(DType::F32, vec![1]).unwrap(),
        );
        let mut shape = m.clone();
        shape.params.insert(
            "fc1.bias".into(),
            FlTensor::zeros(DType::F32, vec![64]).unwrap(),
        );
        let mut dtype = m.clone();
        dtype.params.insert(
            "conv1.bias".into(),
            FlTensor::zeros(DType::F16, vec![32]).unwrap(),
        );
        for (bad, want) in [
            (missing, "\"fc2.bias\": missing"),
            (extra, "\"fc3.weight\": unexpected tensor"),
            (shape, "\"fc1.bias\": expected Float [128], got F32 [64]"),
            (dtype, "\"conv1.bias\": expected Float [32], got F16 [32]"),
        ] {
            let err = net.load(&bad).unwrap_err();
            assert!(matches!(err, LearnerError::Incompatible(_)), "{err}");
            assert!(err.to_string().contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn libtorch_errors_become_learner_errors() {
        let r = guarded(|| {
            Ok(Tensor::zeros([2, 3], tch::kind::FLOAT_CPU)
                .matmul(&Tensor::zeros([2, 3], tch::kind::FLOAT_CPU)))
        });
        let err = r.unwrap_err().to_string();
        assert!(
            err.starts_with("LibTorch: ") && err.contains("shapes cannot be multiplied"),
            "{err}"
        );
    }

    #[test]
    fn cuda_is_an_error_without_a_gpu_and_auto_falls_back() {
        let cuda = resolve_device(DeviceSpec::Cuda(0));
        let auto = resolve_device(DeviceSpec::Auto).unwrap();
        if tch::Cuda::is_available() {
            assert_eq!(cuda.unwrap(), Device::Cuda(0));
            assert_eq!(auto, Device::Cuda(0));
        } else {
            let err = cuda.unwrap_err().to_string();
            assert!(
                err.starts_with("device cuda:0: ")
                    && (err.contains("no CUDA GPU is visible") || err.contains("cannot load")),
                "{err}"
            );
            assert_eq!(auto, Device::Cpu);
        }
        let err = resolve_device(DeviceSpec::Cuda(999))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("device cuda:999: "), "{err}");
        assert_eq!(resolve_device(DeviceSpec::Cpu).unwrap(), Device::Cpu);
    }

    /// Trains briefly on the CPU from the server's pure-Rust initial model and checks that
    /// held-out accuracy rises. Also writes what `tests/python/test_torch_interop.py` needs
    /// to check the model in PyTorch: the model, the held-out images and labels, and our
    /// logits, into `$FLARE_TORCH_INTEROP_DIR` when set.
    #[test]
    fn cpu_training_improves_accuracy_and_exports_for_pytorch() {
        let (train, held) = mnist();
        for optimizer in [
            OptimizerKind::Adam,
            OptimizerKind::Sgd,
            OptimizerKind::Adadelta,
        ] {
            let hyper = CnnHyper {
                optimizer,
                lr: match optimizer {
                    OptimizerKind::Adam => 1e-3,
                    OptimizerKind::Sgd => 0.1,
                    OptimizerKind::Adadelta => 1.0,
                },
                ..CnnHyper::default()
            };
            tch::manual_seed(0);
            let mut t = CnnTrainer::new(Device::Cpu, &hyper).unwrap();
            t.net_mut().load(&cnn::init(0)).unwrap();
            let all: Vec<usize> = (0..held.len()).collect();
            let (vx, vy) = to_device(&held, &all, Device::Cpu);
            let before = evaluate(t.net(), &vx, &vy).unwrap()["accuracy"];
            let n = if optimizer == OptimizerKind::Adam {
                3000
            } else {
                1000
            };
            let idx: Vec<usize> = (0..n).collect();
            let (x, y) = to_device(&train, &idx, Device::Cpu);
            let loss = t
                .train_epochs(&x, &y, &hyper, &mut ChaCha8Rng::seed_from_u64(0))
                .unwrap();
            let after = evaluate(t.net(), &vx, &vy).unwrap();
            let acc = after["accuracy"];
            assert!(before < 0.3, "{optimizer:?}: untrained accuracy {before}");
            // One short epoch: Adam on 3000 images reaches ~95%; SGD and Adadelta on 1000
            // images need only show that they learn.
            let floor = if optimizer == OptimizerKind::Adam {
                0.9
            } else {
                before + 0.3
            };
            assert!(acc > floor, "{optimizer:?}: accuracy {acc} (loss {loss})");
            if optimizer != OptimizerKind::Adam {
                continue;
            }
            let tmp = tempfile::tempdir().unwrap();
            let dir = match std::env::var_os("FLARE_TORCH_INTEROP_DIR") {
                Some(d) => PathBuf::from(d),
                None => tmp.path().to_path_buf(),
            };
            std::fs::create_dir_all(&dir).unwrap();
            let mut model = t.net().to_model().unwrap();
            model.meta.insert("accuracy".into(), MetaValue::Float(acc));
            crate::model_io::write(&dir.join("model.safetensors"), &model).unwrap();
            let logits = tch::no_grad(|| t.net().forward_t(&vx, false));
            let pixels: Vec<f32> = held.images.iter().map(|&p| f32::from(p)).collect();
            let labels: Vec<i64> = held.labels.iter().map(|&l| i64::from(l)).collect();
            let heldout = FLModel::from_params(BTreeMap::from([
                (
                    "images".to_string(),
                    FlTensor::from_f32(vec![held.len(), 1, 28, 28], &pixels).unwrap(),
                ),
                (
                    "labels".to_string(),
                    FlTensor::from_i64(vec![held.len()], &labels).unwrap(),
                ),
                ("logits".to_string(), from_tch(&logits).unwrap()),
            ]));
            crate::model_io::write(&dir.join("heldout.safetensors"), &heldout).unwrap();
            std::fs::write(dir.join("accuracy.txt"), format!("{acc}")).unwrap();
        }
    }

    #[test]
    fn variables_have_the_pytorch_names_and_shapes() {
        let net = CnnNet::new(Device::Cpu, true);
        let got: Vec<(String, Vec<usize>)> = net
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.size().iter().map(|&d| d as usize).collect()))
            .collect();
        let mut want: Vec<(String, Vec<usize>)> = CNN_PARAMS
            .iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect();
        want.sort();
        assert_eq!(got, want);
    }
}
