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
//!
//! # FedProx and SCAFFOLD
//!
//! [`TorchCnnLearner`] honours both as the MLP learner does (see [`super::mlp`] for the
//! contract and the shared checks), in LibTorch on the training device:
//!
//! - **FedProx**: `meta["fedprox_mu"]` > 0 adds `(mu/2)·Σ‖w − w_global‖²` to each batch's
//!   loss before `backward`, exactly as FLARE's `PTFedProxLoss` does, with `w_global` a
//!   detached copy of the weights as received. With any optimizer the gradient gains
//!   `mu·(w − w_global)`; `mu` absent or 0 runs the unchanged step.
//! - **SCAFFOLD**: with `scaffold_c_global.*` tensors the learner keeps `c_i` per variable on
//!   the device between rounds (zeros at first), subtracts `lr·(c − c_i)` from the weights
//!   after every optimizer step, and after the round's `K` steps returns
//!   `scaffold_c_diff.<p>` = `c_i⁺ − c_i` with `c_i⁺ = c_i − c + (w_global − w)/(K·lr)` and
//!   `NUM_STEPS_CURRENT_ROUND` = `K`. SCAFFOLD's option II assumes SGD, whose `K` steps of
//!   size `lr` make `(w_global − w)/(K·lr)` the mean gradient. With Adam or Adadelta it
//!   still runs, as FLARE's `PTScaffoldHelper` does with whatever optimizer it is given, with
//!   the configured `lr` in both formulas (logged once as a warning); the controls then
//!   estimate the mean step divided by `lr`, not a gradient. Optimizer state is not reset.
//!
//! Loading a model skips SCAFFOLD's control tensors; any other tensor the network lacks is
//! refused.
//!
//! # Full weights or differences
//!
//! With `params_transfer_type` `DIFF` ([`TorchCnnLearner::with_params_transfer`]) a train
//! result carries every variable of the network as trained minus received, on the device
//! before export, with `params_type` `Diff`; the rules are the MLP's (see [`super::mlp`]).
//! Every variable is a difference, as in FLARE's `numerical_params_diff` over the received
//! `state_dict`: this CNN has no buffers, and one with BatchNorm would send the change of its
//! running statistics too, which the aggregator adds back to the global ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use flare_protocols::aggregators::SCAFFOLD_C_DIFF;
use flare_protocols::model::{
    DType, FLModel, META_NUM_STEPS, MetaValue, ModelError, ParamsType, Tensor as FlTensor,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::algorithms::{check_scaffold_lr, fedprox_mu, is_control, scaffold_c_global};
use super::cnn::{CnnHyper, DeviceSpec, OptimizerKind};
use super::script::TransferType;
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

    /// Copies the weights of `model` in, checking names, shapes and dtypes. SCAFFOLD's
    /// control tensors are skipped; any other tensor the network lacks is refused.
    pub fn load(&mut self, model: &FLModel) -> Result<(), LearnerError> {
        let vars = self.variables();
        if let Some(extra) = model
            .params
            .keys()
            .find(|k| !vars.contains_key(*k) && !is_control(k))
        {
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

    /// The weights minus `base` (one tensor per variable, in [`CnnNet::variables`]' order,
    /// on this network's device), as a model of [`ParamsType::Diff`].
    fn diff_model(&self, base: &[Tensor]) -> Result<FLModel, LearnerError> {
        let vars = self.variables();
        if vars.len() != base.len() {
            return Err(LearnerError::Backend(format!(
                "{} base tensors for {} variables",
                base.len(),
                vars.len()
            )));
        }
        let params = vars
            .into_iter()
            .zip(base)
            .map(|((name, var), b)| {
                let d = tch::no_grad(|| var.detach() - b);
                Ok((name, from_tch(&d).map_err(backend)?))
            })
            .collect::<Result<BTreeMap<_, _>, LearnerError>>()?;
        Ok(FLModel {
            params_type: ParamsType::Diff,
            ..FLModel::from_params(params)
        })
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
        // A masked SecAgg input never reaches LibTorch; 32-bit ints keep its width.
        DType::U32 => Kind::Int,
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
        self.step_with(x, y, None)
    }

    /// [`CnnTrainer::step`], with FedProx's term added to the loss that is differentiated
    /// when `prox` is given; the returned loss is the cross-entropy alone.
    fn step_with(&mut self, x: &Tensor, y: &Tensor, prox: Option<&Prox>) -> Tensor {
        let loss = self.net.forward_t(x, true).cross_entropy_for_logits(y);
        let with_prox = prox.and_then(Prox::term).map(|t| &loss + t);
        let objective = with_prox.as_ref().unwrap_or(&loss);
        match &mut self.opt {
            Optim::Torch(o) => o.backward_step(objective),
            Optim::Adadelta(o) => {
                o.zero_grad();
                objective.backward();
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
        self.train_epochs_with(
            x,
            y,
            hyper,
            rng,
            &mut RoundTerms::default(),
            &mut |_, _, _| {},
        )
        .map(|(loss, _)| loss)
    }

    /// [`CnnTrainer::train_epochs`] with what the round's FL algorithm adds; returns the
    /// mean loss of the last epoch and the number of optimizer steps taken.
    fn train_epochs_with(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        hyper: &CnnHyper,
        rng: &mut ChaCha8Rng,
        terms: &mut RoundTerms,
        epoch_done: &mut dyn FnMut(usize, f64, f64),
    ) -> Result<(f64, usize), LearnerError> {
        let n = y.size().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(LearnerError::NoData);
        }
        let device = self.net.device();
        let bs = hyper.batch_size.max(1) as i64;
        let mut order: Vec<i64> = (0..n).collect();
        let mut last = 0.0;
        let mut steps = 0;
        for epoch in 0..hyper.epochs.max(1) {
            let started = Instant::now();
            order.shuffle(rng);
            let perm = Tensor::from_slice(&order).to_device(device);
            // Summed on the device: one read per epoch, not one GPU sync per step.
            let mut total = Tensor::zeros([], (Kind::Float, device));
            let mut start = 0;
            while start < n {
                let len = bs.min(n - start);
                let idx = perm.narrow(0, start, len);
                let loss = self.step_with(
                    &x.index_select(0, &idx),
                    &y.index_select(0, &idx),
                    terms.prox.as_ref(),
                );
                if let Some(correction) = &mut terms.scaffold {
                    tch::no_grad(|| {
                        for (var, d) in correction.iter_mut() {
                            let _ = var.f_sub_(d).map_err(backend)?;
                        }
                        Ok::<_, LearnerError>(())
                    })?;
                }
                steps += 1;
                total += loss * (len as f64);
                start += len;
            }
            last = f64::try_from(total / (n as f64)).map_err(backend)?;
            if !last.is_finite() {
                return Err(LearnerError::Diverged(format!("loss is {last}")));
            }
            epoch_done(
                epoch,
                last,
                n as f64 / started.elapsed().as_secs_f64().max(1e-9),
            );
        }
        Ok((last, steps))
    }
}

/// FedProx's proximal term in a round.
#[derive(Debug)]
struct Prox {
    /// `mu` (positive).
    mu: f64,
    /// Each variable (sharing its storage and gradient with the network) with its value
    /// as received, detached and frozen for the round.
    pairs: Vec<(Tensor, Tensor)>,
}

impl Prox {
    /// `(mu/2)·Σ‖w − w_global‖²`, differentiable in the variables (FLARE's
    /// `PTFedProxLoss`); `None` for a network without variables.
    fn term(&self) -> Option<Tensor> {
        self.pairs
            .iter()
            .map(|(w, g)| (w - g).square().sum(Kind::Float))
            .reduce(|a, b| a + b)
            .map(|sq| sq * (self.mu / 2.0))
    }
}

/// What an FL algorithm adds to a round of local training; the default adds nothing.
#[derive(Debug, Default)]
struct RoundTerms {
    /// FedProx's pull towards the global weights.
    prox: Option<Prox>,
    /// SCAFFOLD: each variable (sharing its storage with the network) with its correction
    /// `lr·(c − c_i)`, subtracted after every optimizer step.
    scaffold: Option<Vec<(Tensor, Tensor)>>,
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
    /// SCAFFOLD's local control `c_i` by variable name, on the training device: `None`
    /// (zeros) until a SCAFFOLD round succeeds, then what the last one left. It lives as
    /// long as the learner, which is the rounds of one job at this site.
    c_local: Option<BTreeMap<String, Tensor>>,
    /// Whether the warning that SCAFFOLD assumes SGD was logged already.
    warned_scaffold_optimizer: bool,
    /// Whether train results carry the weights or their change (`params_transfer_type`).
    transfer: TransferType,
    /// Seconds the last validation took; the `trained` log line reports it, so the time a
    /// site spends on a round beside the training step can be told from the time between
    /// sites.
    validate_s: f64,
    /// Where the learner logs its metrics.
    tracker: crate::tracking::Tracker,
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
                c_local: None,
                warned_scaffold_optimizer: false,
                transfer: TransferType::Full,
                validate_s: 0.0,
                tracker: crate::tracking::Tracker::off(),
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

    /// A learner whose train results are `transfer`: the trained weights (`FULL`, the
    /// default) or the trained minus the received weights (`DIFF`); see the module doc.
    pub fn with_params_transfer(mut self, transfer: TransferType) -> Self {
        self.transfer = transfer;
        self
    }

    /// A learner that logs its metrics to `tracker`.
    pub fn with_tracker(mut self, tracker: crate::tracking::Tracker) -> Self {
        self.tracker = tracker;
        self
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

    fn tracker(&self) -> &crate::tracking::Tracker {
        &self.tracker
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
        let mu = fedprox_mu(global)?;
        let vars = self.trainer.net().variables();
        let shapes: Vec<Vec<usize>> = vars
            .values()
            .map(|v| v.size().iter().map(|&d| d as usize).collect())
            .collect();
        let params: Vec<(&str, &[usize])> = vars
            .keys()
            .zip(&shapes)
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        let c_global = scaffold_c_global(global, &params)?;
        if c_global.is_some() {
            check_scaffold_lr(self.hyper.lr)?;
            if self.hyper.optimizer != OptimizerKind::Sgd && !self.warned_scaffold_optimizer {
                self.warned_scaffold_optimizer = true;
                tracing::warn!(
                    site = self.site + 1,
                    optimizer = ?self.hyper.optimizer,
                    "SCAFFOLD assumes SGD; its controls use the configured lr with this optimizer"
                );
            }
        }
        self.trainer.net_mut().load(global)?;
        let device = self.trainer.net().device();
        let diff = self.transfer == TransferType::Diff;
        // The weights as received, frozen for the round: FedProx's anchor, SCAFFOLD's
        // w_global, DIFF's base.
        let w_global: Option<Vec<Tensor>> = (mu.is_some() || c_global.is_some() || diff)
            .then(|| tch::no_grad(|| vars.values().map(|v| v.detach().copy()).collect()));
        // SCAFFOLD's c on the device, c_i (zeros at first) and the correction lr·(c − c_i).
        let controls = match c_global {
            Some(tensors) => {
                let mut c = Vec::with_capacity(tensors.len());
                for ((name, var), t) in vars.iter().zip(tensors) {
                    let cg = to_tch(t).map_err(backend)?.to_device(device);
                    let cl = match self.c_local.as_ref().and_then(|c| c.get(name)) {
                        Some(cl) => cl.shallow_clone(),
                        None => tch::no_grad(|| var.detach().zeros_like()),
                    };
                    c.push((cg, cl));
                }
                Some(c)
            }
            None => None,
        };
        let mut terms = RoundTerms {
            prox: mu.zip(w_global.as_ref()).map(|(mu, wg)| Prox {
                mu,
                pairs: vars
                    .values()
                    .zip(wg)
                    .map(|(v, g)| (v.shallow_clone(), g.shallow_clone()))
                    .collect(),
            }),
            scaffold: controls.as_ref().map(|c| {
                tch::no_grad(|| {
                    vars.values()
                        .zip(c)
                        .map(|(v, (cg, cl))| (v.shallow_clone(), (cg - cl) * self.hyper.lr))
                        .collect()
                })
            }),
        };
        let loaded = Instant::now();
        let tracker = &self.tracker;
        let (lr, epochs) = (self.hyper.lr, self.hyper.epochs.max(1) as i64);
        let (loss, steps) = self.trainer.train_epochs_with(
            &self.train.0,
            &self.train.1,
            &self.hyper,
            &mut self.rng,
            &mut terms,
            &mut |epoch, loss, samples_per_sec| {
                crate::learner::mlp::log_epoch(
                    tracker,
                    i64::from(round) * epochs + epoch as i64,
                    loss,
                    lr,
                    samples_per_sec,
                );
            },
        )?;
        // The corrections and handles are done with: free them on the device before export.
        drop(terms);
        let trained = Instant::now();
        let mut out = match &w_global {
            Some(base) if diff => self.trainer.net().diff_model(base)?,
            _ => self.trainer.net().to_model()?,
        };
        if let (Some(controls), Some(w_global)) = (&controls, &w_global) {
            let k_lr = steps as f64 * self.hyper.lr;
            let mut c_new = BTreeMap::new();
            for (((name, var), (cg, cl)), wg) in vars.iter().zip(controls).zip(w_global) {
                // c_i⁺ = c_i − c + (w_global − w)/(K·lr), as FLARE's helper computes it.
                let (new, diff) = tch::no_grad(|| {
                    let new = (cl - cg) + (wg - var.detach()) / k_lr;
                    let diff = &new - cl;
                    (new, diff)
                });
                let diff = from_tch(&diff).map_err(backend)?;
                if !diff.to_f32_vec().iter().all(|v| v.is_finite()) {
                    return Err(LearnerError::Diverged(format!(
                        "SCAFFOLD control of {name:?} is not finite"
                    )));
                }
                out.params.insert(format!("{SCAFFOLD_C_DIFF}{name}"), diff);
                c_new.insert(name.clone(), new);
            }
            out.meta
                .insert(META_NUM_STEPS.into(), MetaValue::Int(steps as i64));
            self.c_local = Some(c_new);
        }
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

    use flare_protocols::aggregators::{META_FEDPROX_MU, SCAFFOLD_C_GLOBAL};

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

    /// A small CPU site for the algorithm tests: SGD without dropout (no LibTorch
    /// randomness), 256 examples in batches of 64, so 4 steps a round.
    fn small_site(train: &Dataset, held: &Arc<Dataset>) -> TorchCnnLearner {
        let hyper = CnnHyper {
            lr: 0.05,
            batch_size: 64,
            epochs: 1,
            optimizer: OptimizerKind::Sgd,
            dropout: false,
            seed: 3,
        };
        let idx: Vec<usize> = (0..256).collect();
        TorchCnnLearner::new(hyper, DeviceSpec::Cpu, train, &idx, held, 0).unwrap()
    }

    fn small_data() -> (Dataset, Arc<Dataset>) {
        let (train, held) = mnist();
        (train, Arc::new(held))
    }

    /// The weights of `m`, without control tensors.
    fn weights(m: &FLModel) -> BTreeMap<String, FlTensor> {
        m.params
            .iter()
            .filter(|(k, _)| !is_control(k))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect()
    }

    /// `model` with SCAFFOLD's global control `c` (by parameter name) added.
    fn with_c_global(model: &FLModel, c: &BTreeMap<String, FlTensor>) -> FLModel {
        let mut m = model.clone();
        for (name, t) in c {
            m.params
                .insert(format!("{SCAFFOLD_C_GLOBAL}{name}"), t.clone());
        }
        m
    }

    fn zero_controls() -> BTreeMap<String, FlTensor> {
        CNN_PARAMS
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    FlTensor::zeros(DType::F32, s.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    /// `c_diff.<p> ≈ (w_global − w)/(K·lr) − offset.<p>` for every parameter.
    fn assert_c_diff(
        out: &FLModel,
        start: &FLModel,
        k_lr: f64,
        offset: &BTreeMap<String, FlTensor>,
    ) {
        for (name, _) in CNN_PARAMS {
            let diff = out.params[&format!("{SCAFFOLD_C_DIFF}{name}")].to_f32_vec();
            let (wg, w) = (
                start.params[name].to_f32_vec(),
                out.params[name].to_f32_vec(),
            );
            let off = offset[name].to_f32_vec();
            for i in 0..diff.len() {
                let want = (f64::from(wg[i]) - f64::from(w[i])) / k_lr - f64::from(off[i]);
                assert!(
                    (f64::from(diff[i]) - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{name}[{i}]: {} != {want}",
                    diff[i]
                );
            }
        }
    }

    #[test]
    fn diff_transfer_plus_the_received_model_is_the_full_result() {
        let (train, held) = small_data();
        let g0 = cnn::init(0);
        let mut fedprox = g0.clone();
        fedprox
            .meta
            .insert(META_FEDPROX_MU.into(), MetaValue::Float(0.5));
        let cases = [
            ("plain", g0.clone()),
            ("fedprox", fedprox),
            ("scaffold", with_c_global(&g0, &zero_controls())),
        ];
        for (what, mut global) in cases {
            let mut full = small_site(&train, &held);
            let mut diff = small_site(&train, &held).with_params_transfer(TransferType::Diff);
            // Two rounds, so that SCAFFOLD's second one runs on the stored c_i.
            for round in 0..2 {
                let f = full.train(&global, round).unwrap();
                let d = diff.train(&global, round).unwrap();
                assert_eq!(f.params_type, ParamsType::Full, "{what}");
                assert_eq!(d.params_type, ParamsType::Diff, "{what}");
                assert!(d.params.keys().eq(f.params.keys()), "{what}");
                for (name, t) in &d.params {
                    let (d, f) = (t.to_f32_vec(), f.params[name].to_f32_vec());
                    if is_control(name) {
                        assert_eq!(d, f, "{what} round {round}: {name}");
                        continue;
                    }
                    let g = global.params[name].to_f32_vec();
                    assert!(d.iter().any(|v| v.abs() > 1e-5), "{what}: {name} moved");
                    for (i, ((d, g), f)) in d.iter().zip(&g).zip(&f).enumerate() {
                        assert!(
                            (d + g - f).abs() <= 1e-6,
                            "{what} round {round}: {name}[{i}]: {d} + {g} != {f}"
                        );
                    }
                }
                for (name, _) in CNN_PARAMS {
                    global
                        .params
                        .insert(name.to_string(), f.params[name].clone());
                }
            }
        }
    }

    #[test]
    fn fedprox_off_and_a_first_scaffold_round_train_exactly_as_plain() {
        let (train, held) = small_data();
        let global = cnn::init(0);
        let plain = small_site(&train, &held).train(&global, 0).unwrap();
        let mut zero_mu = global.clone();
        zero_mu
            .meta
            .insert(META_FEDPROX_MU.into(), MetaValue::Float(0.0));
        let out = small_site(&train, &held).train(&zero_mu, 0).unwrap();
        assert_eq!(out.params, plain.params, "mu = 0");

        let mut site = small_site(&train, &held);
        let out = site
            .train(&with_c_global(&global, &zero_controls()), 0)
            .unwrap();
        assert_eq!(weights(&out), plain.params, "SCAFFOLD with zero controls");
        assert_eq!(out.params.len(), 2 * CNN_PARAMS.len());
        assert!(out.params.keys().all(|k| !k.starts_with(SCAFFOLD_C_GLOBAL)));
        assert_eq!(out.meta.get(META_NUM_STEPS), Some(&MetaValue::Int(4)));
        assert_eq!(plain.meta.get(META_NUM_STEPS), None);
        assert_c_diff(&out, &global, 4.0 * 0.05, &zero_controls());
        let moved = out.params["scaffold_c_diff.fc1.weight"]
            .to_f32_vec()
            .iter()
            .any(|v| v.abs() > 1e-3);
        assert!(moved, "c_diff is all but zero");
    }

    #[test]
    fn fedprox_adds_mu_times_the_drift_to_the_gradient() {
        let (train, _) = mnist();
        let hyper = CnnHyper {
            lr: 0.01,
            optimizer: OptimizerKind::Sgd,
            dropout: false,
            ..CnnHyper::default()
        };
        let idx: Vec<usize> = (0..16).collect();
        let (x, y) = to_device(&train, &idx, Device::Cpu);
        let trainer = || {
            let mut t = CnnTrainer::new(Device::Cpu, &hyper).unwrap();
            t.net_mut().load(&cnn::init(0)).unwrap();
            t
        };
        let (mut plain, mut proxed) = (trainer(), trainer());
        let far = cnn::init(1);
        let mu = 0.5;
        let prox = Prox {
            mu,
            pairs: proxed
                .net()
                .variables()
                .into_iter()
                .map(|(n, v)| (v, to_tch(&far.params[&n]).unwrap()))
                .collect(),
        };
        // The term by hand, in f64.
        let start = cnn::init(0);
        let sq: f64 = CNN_PARAMS
            .iter()
            .flat_map(|(n, _)| {
                start.params[*n]
                    .to_f32_vec()
                    .into_iter()
                    .zip(far.params[*n].to_f32_vec())
            })
            .map(|(w, g)| (f64::from(w) - f64::from(g)).powi(2))
            .sum();
        let term = f64::try_from(prox.term().unwrap()).unwrap();
        assert!(
            (term - mu / 2.0 * sq).abs() < 1e-4 * term,
            "{term} != {}",
            mu / 2.0 * sq
        );
        // One step with the term moves each weight by a further −lr·mu·(w − w_global).
        let _ = plain.step(&x, &y);
        let _ = proxed.step_with(&x, &y, Some(&prox));
        let (a, b) = (
            plain.net().to_model().unwrap(),
            proxed.net().to_model().unwrap(),
        );
        for (name, _) in CNN_PARAMS {
            let (w0, g) = (
                start.params[name].to_f32_vec(),
                far.params[name].to_f32_vec(),
            );
            let (a, b) = (a.params[name].to_f32_vec(), b.params[name].to_f32_vec());
            for i in 0..a.len() {
                let want = 0.01 * mu as f32 * (w0[i] - g[i]);
                assert!(
                    (a[i] - b[i] - want).abs() < 1e-6,
                    "{name}[{i}]: {} != {want}",
                    a[i] - b[i]
                );
            }
        }
    }

    #[test]
    fn fedprox_keeps_the_cnn_closer_to_the_global_one() {
        let (train, held) = small_data();
        let global = cnn::init(0);
        let distance = |m: &FLModel| {
            CNN_PARAMS
                .iter()
                .flat_map(|(n, _)| {
                    m.params[*n]
                        .to_f32_vec()
                        .into_iter()
                        .zip(global.params[*n].to_f32_vec())
                })
                .map(|(a, b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let plain = small_site(&train, &held).train(&global, 0).unwrap();
        let mut g = global.clone();
        g.meta.insert(META_FEDPROX_MU.into(), MetaValue::Float(5.0));
        let prox = small_site(&train, &held).train(&g, 0).unwrap();
        let (d_plain, d_prox) = (distance(&plain), distance(&prox));
        assert!(
            d_prox > 0.0 && d_prox < 0.9 * d_plain,
            "mu 5: {d_prox}, mu 0: {d_plain}"
        );
    }

    #[test]
    fn scaffold_second_round_uses_the_stored_local_control() {
        let (train, held) = small_data();
        let global = cnn::init(0);
        let mut site = small_site(&train, &held);
        let first = site
            .train(&with_c_global(&global, &zero_controls()), 0)
            .unwrap();
        let c1: BTreeMap<String, FlTensor> = site
            .c_local
            .as_ref()
            .unwrap()
            .iter()
            .map(|(n, t)| (n.clone(), from_tch(t).unwrap()))
            .collect();
        let start = FLModel::from_params(weights(&first));
        // With c = c_i the correction lr·(c − c_i) vanishes: round 2 trains as plain SGD
        // from the same state ...
        let mut plain_site = small_site(&train, &held);
        plain_site.train(&global, 0).unwrap();
        let plain = plain_site.train(&start, 1).unwrap();
        let out = site.train(&with_c_global(&start, &c1), 1).unwrap();
        assert_eq!(weights(&out), plain.params);
        // ... which a learner that forgot c_i (zeros) would not.
        let mut forgot = small_site(&train, &held);
        forgot.train(&global, 0).unwrap();
        let moved = forgot.train(&with_c_global(&start, &c1), 1).unwrap();
        assert_ne!(weights(&moved), plain.params);
        // c_diff = −c + (w_global − w)/(K·lr), off the first round's formula by c_i here.
        assert_c_diff(&out, &start, 4.0 * 0.05, &c1);
    }

    #[test]
    fn scaffold_refuses_bad_controls_and_validation_skips_them() {
        let (train, held) = small_data();
        let global = cnn::init(0);
        let good = with_c_global(&global, &zero_controls());
        let mut site = small_site(&train, &held);
        assert_eq!(
            site.validate(&good).unwrap(),
            site.validate(&global).unwrap()
        );
        let mut misshaped = good.clone();
        misshaped.params.insert(
            "scaffold_c_global.conv1.bias".into(),
            FlTensor::zeros(DType::F32, vec![31]).unwrap(),
        );
        let mut missing = good.clone();
        missing.params.remove("scaffold_c_global.fc2.weight");
        for (bad, want) in [
            (
                misshaped,
                "\"scaffold_c_global.conv1.bias\": SCAFFOLD control: expected F32 [32], got F32 [31]",
            ),
            (missing, "\"scaffold_c_global.fc2.weight\": missing"),
        ] {
            let err = site.train(&bad, 0).unwrap_err();
            assert!(matches!(err, LearnerError::Incompatible(_)), "{err}");
            assert!(err.to_string().contains(want), "{err} lacks {want}");
            assert!(site.c_local.is_none());
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
