//! Differential privacy in the aggregation: central DP-FedAvg with fixed or adaptive
//! clipping (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
//! Models", arXiv:1710.06963; Andrew et al. 2021, "Differentially Private Learning with
//! Adaptive Clipping", arXiv:1905.03871), and the RDP accountant that says what a run spent
//! ([`accountant`]). The aggregator that applies it to models is
//! [`crate::aggregators::dp`]; this module holds the arithmetic and the configuration.
//!
//! # The mechanism, one round
//!
//! For each of the round's `m` results the update `Δᵢ` is the result minus the global model
//! (or the result itself when it carries a diff). Its flat L2 norm over every float weight
//! tensor is clipped to `C`: `Δᵢ · min(1, C/‖Δᵢ‖)` ([`clip_scale`]). The clipped updates are
//! averaged with **equal weights**, not by sample count: one client changes the mean by at
//! most `C/m` (in L2, replacing its update), which is the sensitivity the noise is scaled to;
//! weighting by sample counts would let a client that claims many samples move the mean
//! further than the noise hides. Gaussian noise of standard deviation `z · C/m` is added to
//! every coordinate of the mean, and the next global model is the global plus the noisy mean.
//!
//! **Adaptive clipping** (Andrew et al.) moves `C` towards the `γ` quantile of the update
//! norms: each client contributes the bit `bᵢ = 1` iff `‖Δᵢ‖ ≤ C` (its update was *not*
//! clipped), the noisy fraction is `b̃ = (Σ bᵢ + N(0, σ_b²))/m`, and
//! `C ← C · exp(−η (b̃ − γ))` ([`next_clip_norm`]): too many unclipped updates shrink `C`, too
//! few grow it, and the fixed point is the norm that `γ` of the updates stay under. (Flower's
//! `DifferentialPrivacyServerSideAdaptiveClipping` feeds the fraction that *was* clipped into
//! the same rule, which turns the fixed point into a repeller; a test here shows it running
//! away.) Releasing the count costs privacy too: the model's noise multiplier becomes
//! `z_Δ = (z⁻² − (2σ_b)⁻²)^−½` ([`adaptive_model_noise`]), so that the pair (model sum,
//! count) is as private as one Gaussian mechanism with multiplier `z` (their Theorem 1).
//! The accountant is therefore always given `z`, the multiplier the job names.
//!
//! # Accounting
//!
//! Each round is one step of the sampled Gaussian mechanism with noise multiplier `z` and
//! sampling rate `q = m/N` (`N` the run's clients, 1 when unknown). RDP composes by
//! addition, so the global model carries the RDP spent so far at every order of
//! [`accountant::DEFAULT_ALPHAS`] and each round adds its own; `(ε, δ)` is read off that curve.
//! `q < 1` claims privacy amplification by sampling, which assumes the round's clients are a
//! uniformly random subset: Flare's workflows take the clients that answer, so with fewer
//! than all answering the reported `ε` holds only as far as who answers is independent of
//! the data. With every client in every round `q = 1` and nothing is claimed.
//!
//! # Noise randomness
//!
//! The noise comes from a ChaCha20 stream keyed by a 32-byte [`NoiseSeed`], one stream per
//! round (the stream id is the round number, [`noise_rng`]). The seed is secret: whoever
//! knows it can regenerate the noise and subtract it from the released model, undoing the
//! privacy. So it must never be derived from the job (every participant, and whoever reads
//! the job, knows the job's seed); the node draws it from the OS random source when it loads
//! the job, so in a swarm every aggregating site noises with its own secret. This crate
//! never touches the OS random source: the seed is handed in.

pub mod accountant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The secret seed of the DP noise. It prints as `NoiseSeed(..)` and compares in constant
/// time; it is `Copy` because the aggregator specification that carries it is.
#[derive(Clone, Copy)]
pub struct NoiseSeed(pub [u8; 32]);

impl std::fmt::Debug for NoiseSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseSeed(..)")
    }
}

impl PartialEq for NoiseSeed {
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(&other.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// How updates are clipped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clipping {
    /// A fixed L2 bound `C` (Flower's `DifferentialPrivacyServerSideFixedClipping`).
    Fixed {
        /// `C`.
        norm: f64,
    },
    /// A bound that follows a quantile of the update norms (Andrew et al.; Flower's
    /// `DifferentialPrivacyServerSideAdaptiveClipping`).
    Adaptive(AdaptiveClipping),
}

/// The settings of adaptive clipping, with Flower's names in the docs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClipping {
    /// `C` of the first round (`initial_clipping_norm`, 0.1).
    pub initial_norm: f64,
    /// `γ`: the fraction of updates that should stay unclipped (`target_clipped_quantile`,
    /// 0.5).
    pub target_quantile: f64,
    /// `η`, the geometric step of `C` (`clip_norm_lr`, 0.2).
    pub lr: f64,
    /// `σ_b`, the noise on the count of unclipped updates (`clipped_count_stddev`); `None`:
    /// `m/20` of each round's `m` results (Flower's default is `num_sampled_clients/20`).
    pub count_stddev: Option<f64>,
}

impl AdaptiveClipping {
    /// Flower's defaults: `C₀` 0.1, `γ` 0.5, `η` 0.2, `σ_b = m/20`.
    pub const DEFAULT: AdaptiveClipping = AdaptiveClipping {
        initial_norm: 0.1,
        target_quantile: 0.5,
        lr: 0.2,
        count_stddev: None,
    };

    /// `σ_b` for a round of `m` results.
    pub fn count_stddev_for(&self, m: usize) -> f64 {
        self.count_stddev.unwrap_or(m as f64 / 20.0)
    }
}

/// Central DP-FedAvg as a job configures it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSpec {
    /// `z`: the noise multiplier of the whole mechanism, the one the accountant sees. Under
    /// adaptive clipping the model gets the larger [`adaptive_model_noise`].
    pub noise_multiplier: f64,
    /// How updates are clipped.
    pub clipping: Clipping,
    /// The `δ` at which `ε` is reported.
    pub target_delta: f64,
    /// The secret seed of the noise (see the module doc: never derived from the job).
    pub noise_seed: NoiseSeed,
}

impl DpSpec {
    /// `C` of the first round.
    pub fn initial_clip(&self) -> f64 {
        match self.clipping {
            Clipping::Fixed { norm } => norm,
            Clipping::Adaptive(a) => a.initial_norm,
        }
    }
}

/// Why DP settings cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DpError {
    /// Adaptive clipping's count noise takes more than the whole budget (Flower raises the
    /// same).
    #[error(
        "noise_multiplier {z} must be below 2 × clipped_count_stddev ({}) for adaptive clipping",
        2.0 * sigma_b
    )]
    CountNoiseTooSmall {
        /// `z`.
        z: f64,
        /// `σ_b`.
        sigma_b: f64,
    },
    /// An accounting question had no answer.
    #[error(transparent)]
    Accountant(#[from] accountant::AccountantError),
}

/// The factor that clips an update of L2 norm `norm` to `clip`: `min(1, clip/norm)` (1 for
/// a zero update).
pub fn clip_scale(norm: f64, clip: f64) -> f64 {
    if norm > clip { clip / norm } else { 1.0 }
}

/// The model's noise multiplier under adaptive clipping, `z_Δ = (z⁻² − (2σ_b)⁻²)^−½`
/// (Andrew et al., Theorem 1): what is left for the model once the count of unclipped
/// updates has taken its share. `z = 0` (no noise) stays 0.
pub fn adaptive_model_noise(z: f64, count_stddev: f64) -> Result<f64, DpError> {
    if z == 0.0 {
        return Ok(0.0);
    }
    if z >= 2.0 * count_stddev {
        return Err(DpError::CountNoiseTooSmall {
            z,
            sigma_b: count_stddev,
        });
    }
    Ok((z.powi(-2) - (2.0 * count_stddev).powi(-2)).powf(-0.5))
}

/// The next clipping norm, `clip · exp(−lr · (unclipped − target))`, from the noisy fraction
/// of updates that were **not** clipped (Andrew et al.'s rule).
pub fn next_clip_norm(clip: f64, unclipped_fraction: f64, target_quantile: f64, lr: f64) -> f64 {
    clip * (-lr * (unclipped_fraction - target_quantile)).exp()
}

/// The noise stream of `round`: ChaCha20 keyed by `seed`, stream id `round`, so every round
/// draws fresh noise and whoever aggregates a round with the same seed draws the same.
pub fn noise_rng(seed: &NoiseSeed, round: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::from_seed(seed.0);
    rng.set_stream(round);
    rng
}

/// Standard normal draws from a uniform source (Box–Muller: two uniforms make two
/// independent normals, the second kept for the next call).
#[derive(Debug)]
pub struct Gaussian<R> {
    rng: R,
    spare: Option<f64>,
}

impl<R: Rng> Gaussian<R> {
    /// Normal draws from `rng`.
    pub fn new(rng: R) -> Self {
        Gaussian { rng, spare: None }
    }

    /// One draw of `N(0, 1)`.
    pub fn sample(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        // 1 − U is in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.rng.random::<f64>();
        let u2 = self.rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_scales_long_updates_only() {
        assert_eq!(clip_scale(5.0, 1.0), 0.2);
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert_eq!(clip_scale(1.0, 1.0), 1.0);
        assert_eq!(clip_scale(0.0, 1.0), 1.0);
    }

    #[test]
    fn the_model_gets_what_the_count_leaves_of_the_noise() {
        // z⁻² = z_Δ⁻² + (2σ_b)⁻²: with z = 1 and σ_b = 1, z_Δ = (1 − 1/4)^−½.
        let z = adaptive_model_noise(1.0, 1.0).unwrap();
        assert!((z - (0.75f64).powf(-0.5)).abs() < 1e-15);
        assert!((z.powi(-2) + 0.25 - 1.0).abs() < 1e-12);
        assert_eq!(
            adaptive_model_noise(2.0, 1.0),
            Err(DpError::CountNoiseTooSmall {
                z: 2.0,
                sigma_b: 1.0
            })
        );
        assert_eq!(adaptive_model_noise(0.0, 0.5), Ok(0.0));
    }

    #[test]
    fn the_seed_never_prints() {
        let s = NoiseSeed([7; 32]);
        assert_eq!(format!("{s:?}"), "NoiseSeed(..)");
        assert_eq!(s, NoiseSeed([7; 32]));
        assert_ne!(s, NoiseSeed([8; 32]));
    }

    #[test]
    fn streams_differ_by_round_and_repeat_by_seed() {
        let seed = NoiseSeed([1; 32]);
        let draw = |round| {
            let mut g = Gaussian::new(noise_rng(&seed, round));
            (0..4).map(|_| g.sample()).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn box_muller_draws_are_standard_normal() {
        let mut g = Gaussian::new(noise_rng(&NoiseSeed([2; 32]), 0));
        let n = 200_000;
        let v: Vec<f64> = (0..n).map(|_| g.sample()).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let within_1 = v.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.01, "{var}");
        // Φ(1) − Φ(−1) = 0.6827.
        assert!((within_1 - 0.6827).abs() < 0.005, "{within_1}");
    }

    /// Norms of a run's updates: lognormal with median 1 and log-sd 0.5.
    fn lognormal(g: &mut Gaussian<ChaCha20Rng>) -> f64 {
        (0.5 * g.sample()).exp()
    }

    /// Quantile `p` of that lognormal: `exp(0.5 · Φ⁻¹(p))`.
    fn lognormal_quantile(p: f64) -> f64 {
        let probit: f64 = match p {
            0.5 => 0.0,
            0.8 => 0.841_621_233_572_914_3,
            _ => unreachable!("only 0.5 and 0.8 are tabulated"),
        };
        (0.5 * probit).exp()
    }

    /// `rounds` rounds of `m` updates with the clipping rule fed `bit(norm, C)`; `C` averaged
    /// (geometrically) over the last 50 rounds.
    fn run_clip(target: f64, bit: impl Fn(f64, f64) -> f64, rounds: usize) -> f64 {
        let m = 100;
        let a = AdaptiveClipping {
            target_quantile: target,
            ..AdaptiveClipping::DEFAULT
        };
        let sigma_b = a.count_stddev_for(m);
        let mut g = Gaussian::new(noise_rng(&NoiseSeed([9; 32]), 0));
        let mut clip = a.initial_norm;
        let mut log_sum = 0.0;
        for r in 0..rounds {
            let count: f64 = (0..m).map(|_| bit(lognormal(&mut g), clip)).sum();
            let noisy = (count + sigma_b * g.sample()) / m as f64;
            clip = next_clip_norm(clip, noisy, a.target_quantile, a.lr);
            if r >= rounds - 50 {
                log_sum += clip.ln();
            }
        }
        (log_sum / 50.0).exp()
    }

    /// Andrew et al.'s rule (fed the unclipped fraction) settles on the target quantile of
    /// the norms from Flower's initial 0.1, a decade below it.
    #[test]
    fn adaptive_clipping_converges_to_the_target_quantile() {
        let unclipped = |norm: f64, clip: f64| f64::from(u8::from(norm <= clip));
        for target in [0.5, 0.8] {
            let clip = run_clip(target, unclipped, 250);
            let want = lognormal_quantile(target);
            assert!(
                (clip / want - 1.0).abs() < 0.03,
                "γ {target}: C {clip}, quantile {want}"
            );
        }
    }

    /// Flower's feed (the fraction that *was* clipped) runs away from the quantile: at γ 0.5
    /// the fixed point repels, and at γ 0.8 the rule heads for the 0.2 quantile's repeller
    /// and falls away from it.
    #[test]
    fn the_inverted_rule_runs_away_from_the_quantile() {
        let clipped = |norm: f64, clip: f64| f64::from(u8::from(norm > clip));
        for target in [0.5, 0.8] {
            let clip = run_clip(target, clipped, 250);
            let want = lognormal_quantile(target);
            assert!(
                clip < want / 10.0 || clip > want * 10.0,
                "γ {target}: C {clip}, quantile {want}"
            );
        }
    }
}
