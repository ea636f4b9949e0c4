//! The MNIST CNN as data, independent of any training back-end: its parameter names and
//! shapes (those of PyTorch's classic MNIST example module), its default initialization in
//! pure Rust (so the server's `MnistCnn` component needs no LibTorch), and the optimizer and
//! device choices a job config may name.
//!
//! ```text
//! conv1: Conv2d(1, 32, 3)  → ReLU
//! conv2: Conv2d(32, 64, 3) → ReLU → MaxPool2d(2) → Dropout(0.25) → flatten
//! fc1:   Linear(9216, 128) → ReLU → Dropout(0.5)
//! fc2:   Linear(128, 10)   → logits
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use flare_protocols::model::{FLModel, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

/// Parameter names and shapes, in the order of PyTorch's `state_dict()`.
pub const CNN_PARAMS: [(&str, &[usize]); 8] = [
    ("conv1.weight", &[32, 1, 3, 3]),
    ("conv1.bias", &[32]),
    ("conv2.weight", &[64, 32, 3, 3]),
    ("conv2.bias", &[64]),
    ("fc1.weight", &[128, 9216]),
    ("fc1.bias", &[128]),
    ("fc2.weight", &[10, 128]),
    ("fc2.bias", &[10]),
];

/// Fan-in of the layer a parameter belongs to (`in_channels × kernel` or `in_features`).
fn fan_in(name: &str) -> usize {
    match name.split('.').next() {
        Some("conv1") => 9,
        Some("conv2") => 32 * 9,
        Some("fc1") => 9216,
        _ => 128,
    }
}

/// Fresh weights drawn like PyTorch's defaults for `Conv2d` and `Linear`: weights from
/// `kaiming_uniform_(a = √5)` and biases from U(-1/√fan_in, 1/√fan_in), which are both
/// U(-1/√fan_in, 1/√fan_in). The same seed always gives the same model.
pub fn init(seed: u64) -> FLModel {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let params = CNN_PARAMS
        .iter()
        .map(|&(name, shape)| {
            let n: usize = shape.iter().product();
            let b = 1.0 / (fan_in(name) as f32).sqrt();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-b..b)).collect();
            let t = Tensor::from_f32(shape.to_vec(), &v)
                .expect("the values are drawn for exactly this shape");
            (name.to_string(), t)
        })
        .collect::<BTreeMap<_, _>>();
    FLModel::from_params(params)
}

/// The optimizer a job config names (`"sgd"`, `"adam"`, `"adadelta"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Plain stochastic gradient descent.
    Sgd,
    /// Adam with PyTorch's defaults (β = 0.9, 0.999; ε = 1e-8).
    #[default]
    Adam,
    /// Adadelta with PyTorch's defaults (ρ = 0.9, ε = 1e-6), as in PyTorch's MNIST example.
    Adadelta,
}

impl FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            "adadelta" => Ok(OptimizerKind::Adadelta),
            other => Err(format!(
                "unknown optimizer {other:?} (known: sgd, adam, adadelta)"
            )),
        }
    }
}

/// Where a site trains: `auto` (the first GPU if there is one, else the CPU), `cpu`, `cuda`
/// (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first CUDA GPU when one is usable, otherwise the CPU (with a log line).
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU number N; an error when there is none.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device {other:?} (use auto, cpu, cuda or cuda:N)")),
        }
    }
}

impl DeviceSpec {
    /// The device on a site that reserved `gpus` for the job (`None`: the site lends no GPUs,
    /// and the setting stands). As under `CUDA_VISIBLE_DEVICES`, `cuda:N` is the job's N-th
    /// GPU; `auto` is its first, or the CPU when it has none.
    pub fn within(self, gpus: Option<&[u32]>) -> Result<DeviceSpec, String> {
        let Some(gpus) = gpus else {
            return Ok(self);
        };
        match self {
            DeviceSpec::Cpu => Ok(DeviceSpec::Cpu),
            DeviceSpec::Auto => Ok(gpus
                .first()
                .map_or(DeviceSpec::Cpu, |&g| DeviceSpec::Cuda(g as usize))),
            DeviceSpec::Cuda(i) => gpus.get(i).map(|&g| DeviceSpec::Cuda(g as usize)).ok_or_else(|| {
                format!(
                    "device {self}: the site gave this job {} GPU(s) {gpus:?}; ask for more with num_of_gpus in meta.json's resource_spec",
                    gpus.len()
                )
            }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Training hyper-parameters of the CNN learner.
#[derive(Debug, Clone, PartialEq)]
pub struct CnnHyper {
    /// Learning rate.
    pub lr: f64,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Local epochs per round.
    pub epochs: usize,
    /// The optimizer; its state persists across rounds on a site, as in FLARE's PyTorch
    /// examples. SCAFFOLD assumes [`OptimizerKind::Sgd`]; with the others its controls use
    /// `lr` as if they were SGD (see the `torch` module).
    pub optimizer: OptimizerKind,
    /// Dropout after the pooling layer and after `fc1` while training.
    pub dropout: bool,
    /// Seed of the per-site shuffle and of LibTorch's dropout masks.
    pub seed: u64,
}

impl Default for CnnHyper {
    fn default() -> Self {
        CnnHyper {
            lr: 1e-3,
            batch_size: 64,
            epochs: 1,
            optimizer: OptimizerKind::Adam,
            dropout: true,
            seed: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_device_maps_onto_the_gpus_the_site_reserved() {
        use super::DeviceSpec::{Auto, Cpu, Cuda};
        assert_eq!(Cuda(1).within(None), Ok(Cuda(1)));
        assert_eq!(Auto.within(Some(&[2, 5])), Ok(Cuda(2)));
        assert_eq!(Cuda(1).within(Some(&[2, 5])), Ok(Cuda(5)));
        assert_eq!(Auto.within(Some(&[])), Ok(Cpu));
        assert_eq!(Cpu.within(Some(&[3])), Ok(Cpu));
        let e = Cuda(1).within(Some(&[3])).unwrap_err();
        assert!(
            e.contains("cuda:1") && e.contains("[3]") && e.contains("resource_spec"),
            "{e}"
        );
    }

    use flare_protocols::model::DType;

    use super::*;

    #[test]
    fn names_and_shapes_match_the_pytorch_module() {
        let m = init(0);
        let got: Vec<(&str, Vec<usize>)> = m
            .params
            .iter()
            .map(|(k, t)| (k.as_str(), t.shape().to_vec()))
            .collect();
        let mut want: Vec<(&str, Vec<usize>)> =
            CNN_PARAMS.iter().map(|(k, s)| (*k, s.to_vec())).collect();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(m.num_params(), 1_199_882);
        assert!(m.params.values().all(|t| t.dtype() == DType::F32));
    }

    #[test]
    fn init_is_seeded_and_within_pytorch_bounds() {
        assert_eq!(init(3), init(3));
        assert_ne!(init(3), init(4));
        let m = init(1);
        for (name, t) in m.params.iter().filter(|(_, t)| t.numel() >= 100) {
            let b = 1.0 / (fan_in(name) as f32).sqrt();
            let v = t.to_f32_vec();
            let max = v.iter().fold(0f32, |a, x| a.max(x.abs()));
            assert!(
                max <= b && max > 0.9 * b,
                "{name}: max |w| {max}, bound {b}"
            );
        }
    }

    #[test]
    fn device_specs_parse() {
        let cases = [
            ("auto", Ok(DeviceSpec::Auto)),
            ("cpu", Ok(DeviceSpec::Cpu)),
            ("cuda", Ok(DeviceSpec::Cuda(0))),
            ("cuda:0", Ok(DeviceSpec::Cuda(0))),
            ("cuda:3", Ok(DeviceSpec::Cuda(3))),
            ("cuda:", Err(())),
            ("cuda:-1", Err(())),
            ("cuda:+1", Err(())),
            ("gpu", Err(())),
            ("CPU", Err(())),
        ];
        for (s, want) in cases {
            let got = s.parse::<DeviceSpec>();
            assert_eq!(got.clone().map_err(|_| ()), want, "{s}");
            if let Ok(d) = got {
                assert_eq!(d.to_string().parse::<DeviceSpec>(), Ok(d));
            } else {
                assert!(got.unwrap_err().contains(s), "{s}");
            }
        }
        let d: DeviceSpec = serde_json::from_str("\"cuda:1\"").unwrap();
        assert_eq!(d, DeviceSpec::Cuda(1));
        let e = serde_json::from_str::<DeviceSpec>("\"tpu\"").unwrap_err();
        assert!(
            e.to_string().contains("use auto, cpu, cuda or cuda:N"),
            "{e}"
        );
    }

    #[test]
    fn optimizers_parse() {
        for (s, k) in [
            ("sgd", OptimizerKind::Sgd),
            ("adam", OptimizerKind::Adam),
            ("adadelta", OptimizerKind::Adadelta),
        ] {
            assert_eq!(s.parse::<OptimizerKind>(), Ok(k));
            let j: OptimizerKind = serde_json::from_str(&format!("\"{s}\"")).unwrap();
            assert_eq!(j, k);
        }
        assert!("rmsprop".parse::<OptimizerKind>().is_err());
    }
}
