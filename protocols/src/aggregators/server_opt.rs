//! Server-side optimizers on the pseudo-gradient (Reddi et al., ICLR 2021): the round's
//! aggregate `a` and the global model `w` give `Δ = a − w`, and the optimizer moves `w` with
//! `Δ` instead of replacing it by `a`.
//!
//! - [`ServerOpt::Sgd`] is FLARE's `FedOpt` (torch `SGD` on `grad = −Δ`, momentum without
//!   dampening, optional cosine schedule: `buf = μ·buf + grad`, the first step `buf = grad`;
//!   `w −= lr·buf`) and Flower's `FedAvgM` (`v = μ·v + (w − a)`, `w −= η·v`), which are the
//!   same rule. With lr 1 and momentum 0 it gives back `a`, bit for bit (the step is taken
//!   in `f64`, where `w + (a − w)` is exact for the values a model holds).
//! - [`ServerOpt::Adam`], [`ServerOpt::Yogi`] and [`ServerOpt::Adagrad`] follow Flower's
//!   `FedAdam`, `FedYogi` and `FedAdagrad`: `m = β₁m + (1−β₁)Δ`; Adam `v = β₂v + (1−β₂)Δ²`,
//!   Yogi `v = v − (1−β₂)Δ²·sign(v − Δ²)`, Adagrad `v = v + Δ²`; `w += η·m/(√v + τ)`. Adam
//!   alone corrects its bias, with `η·√(1−β₂ᵗ)/(1−β₁ᵗ)` at step `t` (1 at the first round).
//!   Flower's legacy strategy raises β to `server_round + 1` instead, one step late.
//!
//! Only f32 tensors are optimized; other dtypes (integer counters, f16 buffers) take the
//! aggregate as it is, as FLARE's FedOpt gives buffers the FedAvg update. The state (`m`,
//! `v`, the step count) is kept per tensor in f32 and lives as long as the run.

use std::collections::BTreeMap;

/// A cosine learning-rate schedule (torch `CosineAnnealingLR`, closed form): at step `t`
/// (0 for the first round) `lr_t = eta_min + (lr − eta_min)·(1 + cos(π·t/t_max))/2`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cosine {
    /// Steps of a half period.
    pub t_max: u32,
    /// The learning rate at `t_max`.
    pub eta_min: f64,
}

/// The server optimizer of an aggregator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOpt {
    /// SGD with momentum, optionally on a cosine schedule.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum (0: none).
        momentum: f64,
        /// The schedule of `lr`, if any.
        cosine: Option<Cosine>,
    },
    /// Adam with bias correction.
    Adam {
        /// Server learning rate.
        eta: f64,
        /// First-moment decay.
        beta_1: f64,
        /// Second-moment decay.
        beta_2: f64,
        /// Adaptivity.
        tau: f64,
    },
    /// Yogi.
    Yogi {
        /// Server learning rate.
        eta: f64,
        /// First-moment decay.
        beta_1: f64,
        /// Second-moment decay.
        beta_2: f64,
        /// Adaptivity.
        tau: f64,
    },
    /// Adagrad.
    Adagrad {
        /// Server learning rate.
        eta: f64,
        /// First-moment decay (Flower's default 0: `m = Δ`).
        beta_1: f64,
        /// Adaptivity.
        tau: f64,
    },
}

/// The optimizer's state across rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptState {
    /// Steps taken so far.
    pub steps: u64,
    /// First moment (or momentum buffer) per tensor.
    pub m: BTreeMap<String, Vec<f32>>,
    /// Second moment per tensor.
    pub v: BTreeMap<String, Vec<f32>>,
}

/// One step's scalar factors, fixed before the tensors are walked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    opt: ServerOpt,
    /// The learning rate of this step (scheduled, bias-corrected).
    rate: f64,
    first: bool,
}

impl ServerOpt {
    /// The factors of the next step of `state`, counting it.
    pub(crate) fn step(&self, state: &mut OptState) -> Step {
        let t = state.steps;
        state.steps += 1;
        let rate = match *self {
            ServerOpt::Sgd { lr, cosine, .. } => match cosine {
                Some(Cosine { t_max, eta_min }) if t_max > 0 => {
                    eta_min
                        + (lr - eta_min)
                            * (1.0 + (std::f64::consts::PI * t as f64 / f64::from(t_max)).cos())
                            / 2.0
                }
                _ => lr,
            },
            ServerOpt::Adam {
                eta,
                beta_1,
                beta_2,
                ..
            } => {
                let k = (t + 1) as i32;
                eta * (1.0 - beta_2.powi(k)).sqrt() / (1.0 - beta_1.powi(k))
            }
            ServerOpt::Yogi { eta, .. } | ServerOpt::Adagrad { eta, .. } => eta,
        };
        Step {
            opt: *self,
            rate,
            first: t == 0,
        }
    }
}

impl Step {
    /// The new value of one coordinate: `w` the global, `a` the aggregate, `m` and `v` its
    /// state (updated).
    pub(crate) fn apply(&self, w: f32, a: f32, m: &mut f32, v: &mut f32) -> f32 {
        let (w64, d) = (f64::from(w), f64::from(a) - f64::from(w));
        let new = match self.opt {
            ServerOpt::Sgd { momentum, .. } => {
                let grad = -d;
                let buf = if self.first {
                    grad
                } else {
                    momentum * f64::from(*m) + grad
                };
                *m = buf as f32;
                w64 - self.rate * buf
            }
            ServerOpt::Adam {
                beta_1,
                beta_2,
                tau,
                ..
            } => {
                let m1 = beta_1 * f64::from(*m) + (1.0 - beta_1) * d;
                let v1 = beta_2 * f64::from(*v) + (1.0 - beta_2) * d * d;
                *m = m1 as f32;
                *v = v1 as f32;
                w64 + self.rate * m1 / (v1.sqrt() + tau)
            }
            ServerOpt::Yogi {
                beta_1,
                beta_2,
                tau,
                ..
            } => {
                let m1 = beta_1 * f64::from(*m) + (1.0 - beta_1) * d;
                let v0 = f64::from(*v);
                let d2 = d * d;
                let v1 = v0 - (1.0 - beta_2) * d2 * (v0 - d2).signum_or_zero();
                *m = m1 as f32;
                *v = v1 as f32;
                w64 + self.rate * m1 / (v1.max(0.0).sqrt() + tau)
            }
            ServerOpt::Adagrad { beta_1, tau, .. } => {
                let m1 = beta_1 * f64::from(*m) + (1.0 - beta_1) * d;
                let v1 = f64::from(*v) + d * d;
                *m = m1 as f32;
                *v = v1 as f32;
                w64 + self.rate * m1 / (v1.sqrt() + tau)
            }
        };
        new as f32
    }
}

/// numpy's `sign`: 0 at 0.
trait SignumOrZero {
    fn signum_or_zero(self) -> f64;
}

impl SignumOrZero for f64 {
    fn signum_or_zero(self) -> f64 {
        if self == 0.0 { 0.0 } else { self.signum() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(opt: ServerOpt, w: f32, aggregates: &[f32]) -> Vec<f32> {
        let mut st = OptState::default();
        let (mut m, mut v, mut w) = (0.0f32, 0.0f32, w);
        aggregates
            .iter()
            .map(|&a| {
                let s = opt.step(&mut st);
                w = s.apply(w, a, &mut m, &mut v);
                w
            })
            .collect()
    }

    #[test]
    fn sgd_with_lr_one_and_no_momentum_is_fedavg_bit_for_bit() {
        let opt = ServerOpt::Sgd {
            lr: 1.0,
            momentum: 0.0,
            cosine: None,
        };
        let mut st = OptState::default();
        let s = opt.step(&mut st);
        for (w, a) in [
            (0.1f32, 0.3f32),
            (-1.7e-3, 2.5e-2),
            (12.5, -3.0e-7),
            (1e-30, 0.7),
        ] {
            let (mut m, mut v) = (0.0, 0.0);
            assert_eq!(s.apply(w, a, &mut m, &mut v).to_bits(), a.to_bits());
        }
    }

    #[test]
    fn sgd_momentum_and_the_cosine_schedule_by_hand() {
        // w = 0, aggregates 1 then 1: Δ = 1 then 0.5 (w moved to 0.5 with lr 0.5).
        // Step 1: buf = −1, w = 0 + 0.5 = 0.5. Step 2 (lr at t = 1 of t_max 2:
        // 0.1 + 0.4·(1 + cos(π/2))/2 = 0.3): buf = 0.6·(−1) − 0.5 = −1.1, w = 0.5 + 0.33.
        let opt = ServerOpt::Sgd {
            lr: 0.5,
            momentum: 0.6,
            cosine: Some(Cosine {
                t_max: 2,
                eta_min: 0.1,
            }),
        };
        let got = run(opt, 0.0, &[1.0, 1.0]);
        assert!((got[0] - 0.5).abs() < 1e-7, "{got:?}");
        assert!((got[1] - 0.83).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn adam_corrects_its_bias() {
        // Step 1, Δ = 1: m = 0.1, v = 0.01; rate = η·√(1 − 0.99)/(1 − 0.9) = η; so
        // w += η·0.1/(0.1 + τ).
        let (eta, tau) = (0.1, 1e-3);
        let opt = ServerOpt::Adam {
            eta,
            beta_1: 0.9,
            beta_2: 0.99,
            tau,
        };
        let got = run(opt, 0.0, &[1.0, 1.0]);
        let first = eta * 0.1 / (0.1 + tau);
        assert!((f64::from(got[0]) - first).abs() < 1e-7, "{got:?}");
        // Step 2, Δ = 1 − w₁: m = 0.09 + 0.1Δ, v = 0.0099 + 0.01Δ²,
        // rate = η·√(1 − 0.99²)/(1 − 0.9²).
        let d = 1.0 - first;
        let (m, v) = (0.09 + 0.1 * d, 0.0099 + 0.01 * d * d);
        let rate = eta * (1.0f64 - 0.99 * 0.99).sqrt() / (1.0 - 0.81);
        let second = first + rate * m / (v.sqrt() + tau);
        assert!((f64::from(got[1]) - second).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn yogi_and_adagrad_by_hand() {
        // Yogi, one step with Δ = 2: m = 0.2, v = 0 − 0.01·4·sign(0 − 4) = 0.04,
        // w = 0.01·0.2/(0.2 + 0.001).
        let yogi = ServerOpt::Yogi {
            eta: 0.01,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-3,
        };
        let got = run(yogi, 0.0, &[2.0]);
        assert!(
            (f64::from(got[0]) - 0.01 * 0.2 / 0.201).abs() < 1e-8,
            "{got:?}"
        );
        // Adagrad, Δ = 2: m = 2, v = 4, w = 0.1·2/(2 + 0.001).
        let ada = ServerOpt::Adagrad {
            eta: 0.1,
            beta_1: 0.0,
            tau: 1e-3,
        };
        let got = run(ada, 0.0, &[2.0]);
        assert!((f64::from(got[0]) - 0.2 / 2.001).abs() < 1e-7, "{got:?}");
    }
}
