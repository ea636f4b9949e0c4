//! The Rényi-DP (RDP) accountant of the sampled Gaussian mechanism, ported from Opacus
//! (`opacus/accountants/analysis/rdp.py`, `opacus/accountants/rdp.py`,
//! `opacus/accountants/utils.py`), which in turn follows TensorFlow Privacy.
//!
//! A mechanism that adds Gaussian noise of standard deviation `σ · sensitivity` to a sum over
//! a random subset (each record in with probability `q`) has, at order `α`, the RDP
//! `ln(A_α) / (α − 1)` (Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled
//! Gaussian Mechanism", arXiv:1908.10530, section 3.3): `A_α` is a binomial sum for an integer
//! `α` and a series of two erfc-weighted sums for a fractional one. With `q = 1` it is the
//! plain Gaussian mechanism, `α / (2σ²)`. RDP composes by addition, order by order, so `steps`
//! steps cost `steps` times one step and a history of different steps costs the sum.
//!
//! An RDP curve becomes `(ε, δ)`-DP by Balle et al. 2020 ("Hypothesis testing
//! interpretations and Rényi differential privacy", arXiv:1905.09982, Theorem 21):
//! `ε = rdp(α) − (ln δ + ln α)/(α − 1) + ln((α − 1)/α)`, minimised over the orders.
//!
//! [`get_noise_multiplier`] inverts this like Opacus: it doubles `σ` from 10 until the budget
//! holds, then bisects until the `ε` it reaches is within 0.01 of the target, and returns the
//! `σ` of that side (so the budget is never exceeded).
//!
//! `log_erfc`, which the fractional orders need far into the tail (`erfc(65)` is about
//! `e^−4225`, far below the smallest f64), is computed here; see [`log_erfc`] for the method.

/// The orders Opacus's `RDPAccountant` uses by default: `1.1, 1.2, …, 10.9`, then the
/// integers `12..=63`.
pub static DEFAULT_ALPHAS: [f64; 151] = default_alphas();

const fn default_alphas() -> [f64; 151] {
    let mut a = [0.0; 151];
    let mut x = 1;
    while x < 100 {
        // As Python computes `1 + x / 10.0`, so the orders are the same f64 values.
        a[x - 1] = 1.0 + x as f64 / 10.0;
        x += 1;
    }
    let mut k = 12;
    while k < 64 {
        a[99 + k - 12] = k as f64;
        k += 1;
    }
    a
}

/// Why an accounting question has no answer.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum AccountantError {
    /// A sampling rate outside `[0, 1]`.
    #[error("sample rate {0} is not in [0, 1]")]
    SampleRate(f64),
    /// A noise multiplier that is negative or not finite.
    #[error("noise multiplier {0} is not a finite number >= 0")]
    NoiseMultiplier(f64),
    /// A `δ` outside `(0, 1)`.
    #[error("delta {0} is not in (0, 1)")]
    Delta(f64),
    /// A target `ε` that is not a positive number.
    #[error("target epsilon {0} is not a finite number > 0")]
    Epsilon(f64),
    /// An order `α` that is not a finite number above 1.
    #[error("RDP order {0} is not a finite number > 1")]
    Order(f64),
    /// No noise multiplier up to 10⁶ meets the budget (Opacus's "The privacy budget is too
    /// low").
    #[error(
        "no noise multiplier up to 1e6 reaches epsilon {target} at delta {delta}: the privacy budget is too low"
    )]
    BudgetTooLow {
        /// The target `ε`.
        target: f64,
        /// The `δ`.
        delta: f64,
    },
}

/// `ln(eˣ + eʸ)`, with `−∞` standing for 0.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// `ln(eˣ − eʸ)` for `x ≥ y`; NaN when `x < y` (where Opacus raises), which makes the order
/// it belongs to drop out of the minimum.
fn log_sub(x: f64, y: f64) -> f64 {
    if x < y {
        return f64::NAN;
    }
    if y == f64::NEG_INFINITY {
        return x;
    }
    if x == y {
        return f64::NEG_INFINITY;
    }
    let d = x - y;
    // Where eᵈ − 1 overflows it equals eᵈ (Opacus's `OverflowError` branch).
    if d > 700.0 {
        return x;
    }
    d.exp_m1().ln() + y
}

/// `ln(erfc(x))`, accurate to a few ulps of the result for every finite `x` (checked against
/// SciPy's `log(2) + log_ndtr(−x·√2)`, which Opacus calls).
///
/// Method:
/// - `x < 0`: `erfc(x) = 2 − erfc(−x)`, a number in `(1, 2)`, so no digits are lost.
/// - `0 ≤ x < 1.5`: `erfc(x) = 1 − erf(x)` with `erf(x) = 2/√π · e^{−x²} ·
///   Σₙ 2ⁿ x^{2n+1} / (1·3·…·(2n+1))` (Abramowitz and Stegun 7.1.6), a series of positive
///   terms (no cancellation inside it; at most ~25 terms); `erfc(1.5) ≈ 0.034`, so the final
///   subtraction loses less than two digits.
/// - `x ≥ 1.5`: `erfc(x) = e^{−x²}/√π · K(x)` with the continued fraction
///   `K(x) = 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …))))` (A&S 7.1.14), evaluated by the
///   modified Lentz method, and `ln erfc(x) = −x² − ln √π + ln K(x)`: no underflow however
///   large `x` is. It takes fewer than 100 terms at 1.5 and about 10 at 10.
pub fn log_erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < 0.0 {
        return (2.0 - erfc_nonnegative(-x)).ln();
    }
    if x < 1.5 {
        return (-erf_series(x)).ln_1p();
    }
    if x == f64::INFINITY {
        return f64::NEG_INFINITY;
    }
    -x * x - 0.5 * std::f64::consts::PI.ln() + erfc_fraction(x).ln()
}

/// `erfc(x)` for `x ≥ 0` (0 where it underflows).
fn erfc_nonnegative(x: f64) -> f64 {
    if x == f64::INFINITY {
        0.0
    } else if x < 1.5 {
        1.0 - erf_series(x)
    } else {
        (-x * x).exp() / std::f64::consts::PI.sqrt() * erfc_fraction(x)
    }
}

/// `erf(x)` by A&S 7.1.6, for `0 ≤ x < 1.5`.
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let (mut term, mut sum) = (x, x);
    for n in 1..200 {
        term *= 2.0 * x2 / f64::from(2 * n + 1);
        sum += term;
        if term <= 1e-17 * sum {
            break;
        }
    }
    std::f64::consts::FRAC_2_SQRT_PI * (-x2).exp() * sum
}

/// `K(x)` of A&S 7.1.14 by the modified Lentz method, for `x ≥ 1.5`.
fn erfc_fraction(x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (mut f, mut c, mut d) = (x, x, 0.0f64);
    for k in 1..10_000 {
        let a = f64::from(k) / 2.0;
        d = x + a * d;
        d = if d == 0.0 { 1.0 / TINY } else { 1.0 / d };
        c = x + a / c;
        if c == 0.0 {
            c = TINY;
        }
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    1.0 / f
}

/// `ln |binom(α, i)|` and its sign, for every `i` in turn: `binom(α, 0) = 1`,
/// `binom(α, i) = binom(α, i − 1) · (α − i + 1)/i`.
#[derive(Debug)]
struct Binomials {
    alpha: f64,
    i: u32,
    log_abs: f64,
    positive: bool,
}

impl Binomials {
    fn new(alpha: f64) -> Self {
        Binomials {
            alpha,
            i: 0,
            log_abs: 0.0,
            positive: true,
        }
    }

    /// Moves to `i + 1`.
    fn advance(&mut self) {
        self.i += 1;
        let factor = self.alpha - f64::from(self.i) + 1.0;
        if factor == 0.0 {
            self.log_abs = f64::NEG_INFINITY;
        } else {
            self.log_abs += factor.abs().ln() - f64::from(self.i).ln();
            if factor < 0.0 {
                self.positive = !self.positive;
            }
        }
    }
}

/// `ln(A_α)` for an integer `α ≥ 2` and `0 < q < 1` (arXiv:1908.10530, section 3.3).
fn log_a_int(q: f64, sigma: f64, alpha: u32) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let mut binom = Binomials::new(f64::from(alpha));
    let (ln_q, ln_1q) = (q.ln(), (-q).ln_1p());
    for i in 0..=alpha {
        if i > 0 {
            binom.advance();
        }
        let (fi, fa) = (f64::from(i), f64::from(alpha));
        let log_coef = binom.log_abs + fi * ln_q + (fa - fi) * ln_1q;
        let s = log_coef + (fi * fi - fi) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

/// `ln(A_α)` for a fractional `α > 1` and `0 < q < 1`: the two erfc-weighted series of
/// arXiv:1908.10530, section 3.3, summed until both terms fall below `e^−30` (Opacus's
/// stopping rule; capped at a million terms).
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (ln_q, ln_1q) = (q.ln(), (-q).ln_1p());
    let half = 0.5f64.ln();
    let root2_sigma = std::f64::consts::SQRT_2 * sigma;
    let mut binom = Binomials::new(alpha);
    for i in 0..1_000_000u32 {
        if i > 0 {
            binom.advance();
        }
        let fi = f64::from(i);
        let j = alpha - fi;
        let log_t0 = binom.log_abs + fi * ln_q + j * ln_1q;
        let log_t1 = binom.log_abs + j * ln_q + fi * ln_1q;
        let log_e0 = half + log_erfc((fi - z0) / root2_sigma);
        let log_e1 = half + log_erfc((z0 - j) / root2_sigma);
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if binom.positive {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if log_s0.max(log_s1) < -30.0 || log_a0.is_nan() || log_a1.is_nan() {
            break;
        }
    }
    log_add(log_a0, log_a1)
}

fn check_step(q: f64, sigma: f64) -> Result<(), AccountantError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(AccountantError::SampleRate(q));
    }
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(AccountantError::NoiseMultiplier(sigma));
    }
    Ok(())
}

/// The RDP at order `alpha` of one step of the sampled Gaussian mechanism with sampling rate
/// `q` and noise multiplier `sigma` (unchecked: see [`compute_rdp`]); `+∞` without noise.
fn rdp_one(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    if alpha.is_infinite() {
        return f64::INFINITY;
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= f64::from(u32::MAX) {
        log_a_int(q, sigma, alpha as u32)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// The RDP of `steps` steps of the sampled Gaussian mechanism (sampling rate `q`, noise
/// multiplier `noise_multiplier`) at each of `orders` (Opacus's `compute_rdp`).
pub fn compute_rdp(
    q: f64,
    noise_multiplier: f64,
    steps: u64,
    orders: &[f64],
) -> Result<Vec<f64>, AccountantError> {
    check_step(q, noise_multiplier)?;
    if let Some(&a) = orders.iter().find(|a| !(a.is_finite() && **a > 1.0)) {
        return Err(AccountantError::Order(a));
    }
    Ok(orders
        .iter()
        .map(|&a| {
            let r = rdp_one(q, noise_multiplier, a);
            if r == 0.0 { 0.0 } else { r * steps as f64 }
        })
        .collect())
}

/// The `(ε, α)` of an RDP curve at `δ` (Opacus's `get_privacy_spent`): Balle et al.'s
/// conversion at every order, the smallest `ε` and the order that gives it. NaN orders are
/// skipped; when every one is NaN there is no guarantee, `(+∞, NaN)`. `rdp` and `orders`
/// pair up by index (a longer one's tail is ignored).
pub fn privacy_spent(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
) -> Result<(f64, f64), AccountantError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::Delta(delta));
    }
    let mut best: Option<(f64, f64)> = None;
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln();
        if eps.is_nan() {
            continue;
        }
        if best.is_none_or(|(e, _)| eps < e) {
            best = Some((eps, a));
        }
    }
    Ok(best.unwrap_or((f64::INFINITY, f64::NAN)))
}

/// `(ε, best α)` after `steps` steps of the sampled Gaussian mechanism at `δ`, over
/// [`DEFAULT_ALPHAS`].
pub fn epsilon(
    noise_multiplier: f64,
    sample_rate: f64,
    steps: u64,
    delta: f64,
) -> Result<(f64, f64), AccountantError> {
    let rdp = compute_rdp(sample_rate, noise_multiplier, steps, &DEFAULT_ALPHAS)?;
    privacy_spent(&DEFAULT_ALPHAS, &rdp, delta)
}

/// The noise multiplier that spends at most `target_epsilon` at `target_delta` over `steps`
/// steps at `sample_rate` (Opacus's `get_noise_multiplier` with its `epsilon_tolerance` of
/// 0.01): the returned `σ` reaches an `ε` in `[target − 0.01, target]`.
pub fn get_noise_multiplier(
    target_epsilon: f64,
    target_delta: f64,
    sample_rate: f64,
    steps: u64,
) -> Result<f64, AccountantError> {
    const MAX_SIGMA: f64 = 1e6;
    const TOLERANCE: f64 = 0.01;
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(AccountantError::Epsilon(target_epsilon));
    }
    check_step(sample_rate, 1.0)?;
    let eps = |sigma: f64| epsilon(sigma, sample_rate, steps, target_delta).map(|(e, _)| e);
    let (mut low, mut high) = (0.0f64, 10.0f64);
    let mut eps_high = f64::INFINITY;
    while eps_high > target_epsilon {
        high *= 2.0;
        eps_high = eps(high)?;
        if high > MAX_SIGMA {
            return Err(AccountantError::BudgetTooLow {
                target: target_epsilon,
                delta: target_delta,
            });
        }
    }
    // Bisection halves the interval each time: 200 halvings of 2·10⁶ reach below any f64
    // step, so the cap only guards against a non-monotone ε.
    for _ in 0..200 {
        if target_epsilon - eps_high <= TOLERANCE {
            break;
        }
        let mid = (low + high) / 2.0;
        let e = eps(mid)?;
        if e < target_epsilon {
            high = mid;
            eps_high = e;
        } else {
            low = mid;
        }
    }
    Ok(high)
}

/// One entry of an accountant's history: `steps` steps at one noise multiplier and
/// sampling rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// Noise standard deviation over sensitivity (`σ`, `z`).
    pub noise_multiplier: f64,
    /// Probability that a record is in a step (`q`).
    pub sample_rate: f64,
    /// How many such steps.
    pub steps: u64,
}

/// Opacus's `RDPAccountant`: the history of the mechanism's steps, and the `(ε, δ)` they
/// spent together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RdpAccountant {
    /// The steps so far; consecutive steps with the same parameters share an entry.
    pub history: Vec<Step>,
}

impl RdpAccountant {
    /// An accountant that has seen nothing.
    pub fn new() -> Self {
        RdpAccountant::default()
    }

    /// Records one step (merged into the last entry when its parameters are the same).
    pub fn step(&mut self, noise_multiplier: f64, sample_rate: f64) -> Result<(), AccountantError> {
        self.push(noise_multiplier, sample_rate, 1)
    }

    /// Records `steps` steps.
    pub fn push(
        &mut self,
        noise_multiplier: f64,
        sample_rate: f64,
        steps: u64,
    ) -> Result<(), AccountantError> {
        check_step(sample_rate, noise_multiplier)?;
        match self.history.last_mut() {
            Some(last)
                if last.noise_multiplier == noise_multiplier && last.sample_rate == sample_rate =>
            {
                last.steps += steps;
            }
            _ => self.history.push(Step {
                noise_multiplier,
                sample_rate,
                steps,
            }),
        }
        Ok(())
    }

    /// The composed RDP of the history at each of `orders`.
    pub fn rdp(&self, orders: &[f64]) -> Result<Vec<f64>, AccountantError> {
        let mut total = vec![0.0; orders.len()];
        for s in &self.history {
            let r = compute_rdp(s.sample_rate, s.noise_multiplier, s.steps, orders)?;
            for (t, x) in total.iter_mut().zip(r) {
                *t += x;
            }
        }
        Ok(total)
    }

    /// `(ε, best α)` spent so far at `delta`, over [`DEFAULT_ALPHAS`]; `(0, 0)` before the
    /// first step, as Opacus answers.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), AccountantError> {
        self.epsilon_at(delta, &DEFAULT_ALPHAS)
    }

    /// [`RdpAccountant::epsilon`] over the given orders.
    pub fn epsilon_at(&self, delta: f64, orders: &[f64]) -> Result<(f64, f64), AccountantError> {
        if self.history.is_empty() {
            if !(delta > 0.0 && delta < 1.0) {
                return Err(AccountantError::Delta(delta));
            }
            return Ok((0.0, 0.0));
        }
        privacy_spent(orders, &self.rdp(orders)?, delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, rel: f64) -> bool {
        (got - want).abs() <= rel * want.abs().max(1e-300)
    }

    /// SciPy 1.17.1's `log(2) + log_ndtr(−x·√2)` (Opacus's `_log_erfc`).
    const LOG_ERFC: [(f64, f64); 20] = [
        (-30.0, std::f64::consts::LN_2),
        (-5.0, 0.6931471805591766),
        (-1.0, 0.6112323176780705),
        (-0.1, 0.10657640058652262),
        (0.0, 0.0),
        (0.3, -0.39843005144008525),
        (0.5, -0.7350111298370848),
        (0.9, -1.5940972465793175),
        (1.0, -1.849605509933249),
        (1.5, -3.3844920895515536),
        (2.0, -5.36494126461664),
        (2.5, -7.806815272727267),
        (3.0, -10.720363041981116),
        (5.0, -27.200889545537446),
        (10.0, -102.87988902484493),
        (26.0, -679.8311997631946),
        (27.0, -732.8688865078977),
        (50.0, -2504.484587848452),
        (100.0, -10005.177585122668),
        (1000.0, -1000007.4801207221),
    ];

    #[test]
    fn log_erfc_matches_scipy_from_the_left_tail_to_far_past_underflow() {
        for (x, want) in LOG_ERFC {
            let got = log_erfc(x);
            assert!(
                (got - want).abs() <= 1e-14 * want.abs().max(1.0),
                "log_erfc({x}) = {got}, SciPy {want}"
            );
        }
        assert_eq!(log_erfc(f64::INFINITY), f64::NEG_INFINITY);
        assert!(close(log_erfc(f64::NEG_INFINITY), 2f64.ln(), 1e-15));
        assert!(log_erfc(f64::NAN).is_nan());
    }

    #[test]
    fn default_alphas_are_opacus_orders() {
        assert_eq!(DEFAULT_ALPHAS[0], 1.1);
        assert_eq!(DEFAULT_ALPHAS[8], 1.9);
        assert_eq!(DEFAULT_ALPHAS[9], 2.0);
        assert_eq!(DEFAULT_ALPHAS[98], 10.9);
        assert_eq!(DEFAULT_ALPHAS[99], 12.0);
        assert_eq!(DEFAULT_ALPHAS[150], 63.0);
        assert!(DEFAULT_ALPHAS.windows(2).all(|w| w[0] < w[1]));
    }

    /// Opacus's doctest in `analysis/rdp.py`.
    #[test]
    fn the_opacus_doctest_spends_0_336_at_order_23() {
        let orders: Vec<f64> = (2..=32).map(f64::from).collect();
        let mut acc = RdpAccountant::new();
        acc.push(1.0, 1e-5, 10).unwrap();
        acc.push(3.0, 1e-4, 4).unwrap();
        let (eps, alpha) = acc.epsilon_at(1e-5, &orders).unwrap();
        // Opacus 1.6.0 prints 0.33634406339259565.
        assert!(close(eps, 0.33634406339259565, 1e-9), "{eps}");
        assert_eq!(alpha, 23.0);
    }

    /// Single orders, integer and fractional, from Opacus 1.6.0's `compute_rdp`.
    #[test]
    fn one_step_rdp_matches_opacus_at_integer_and_fractional_orders() {
        let cases = [
            (0.01, 1.1, 1.5, 9.554528557684942e-05),
            (0.01, 1.1, 8.0, 0.0005840703355202467),
            (0.3, 0.8, 2.5, 0.48110303233109225),
            (0.3, 0.8, 32.0, 23.75718936327645),
            (0.001, 5.0, 1.1, 2.244511465935002e-08),
            (0.9, 2.0, 3.7, 0.3950762578762773),
            (0.5, 10.0, 63.0, 0.09320291114848815),
            (0.05, 0.5, 10.9, 18.5016685068951),
        ];
        for (q, sigma, alpha, want) in cases {
            let got = compute_rdp(q, sigma, 1, &[alpha]).unwrap()[0];
            assert!(
                close(got, want, 1e-9),
                "q {q} σ {sigma} α {alpha}: {got} vs {want}"
            );
        }
        // q = 1 is the Gaussian mechanism; q = 0 costs nothing; no noise, no privacy.
        assert_eq!(
            compute_rdp(1.0, 2.0, 3, &[4.0]).unwrap(),
            vec![3.0 * 4.0 / 8.0]
        );
        assert_eq!(compute_rdp(0.0, 2.0, 3, &[4.0]).unwrap(), vec![0.0]);
        assert_eq!(
            compute_rdp(0.5, 0.0, 3, &[4.0]).unwrap(),
            vec![f64::INFINITY]
        );
    }

    /// `RDPAccountant.get_privacy_spent` over the default orders, from Opacus 1.6.0.
    #[test]
    fn accountant_epsilons_match_opacus_over_the_default_orders() {
        type Case = (&'static [(f64, f64, u64)], f64, f64, f64);
        let cases: [Case; 6] = [
            (&[(1.1, 0.01, 1000)], 1e-5, 1.7117700912203435, 9.6),
            (&[(1.0, 1.0, 10)], 1e-5, 19.05359753163139, 2.5),
            (&[(0.8, 0.3, 50)], 1e-6, 27.039034071840913, 2.0),
            (&[(5.0, 0.001, 10000)], 1e-5, 0.11575515985424692, 63.0),
            (
                &[(1.0, 0.02, 300), (2.0, 0.5, 20), (15.0, 1.0, 30)],
                1e-5,
                6.95801005028124,
                3.9,
            ),
            (&[(20.0, 1.0, 30)], 1e-5, 1.1181505950444586, 16.0),
        ];
        for (history, delta, want, want_alpha) in cases {
            let mut acc = RdpAccountant::new();
            for &(z, q, steps) in history {
                acc.push(z, q, steps).unwrap();
            }
            let (eps, alpha) = acc.epsilon(delta).unwrap();
            assert!(close(eps, want, 1e-9), "{history:?}: {eps} vs {want}");
            assert_eq!(alpha, want_alpha, "{history:?}");
        }
    }

    /// `opacus.accountants.utils.get_noise_multiplier`, from Opacus 1.6.0: bisection lands on
    /// the same dyadic σ.
    #[test]
    fn noise_multipliers_match_opacus() {
        let cases = [
            (1.0, 1e-5, 1.0, 30, 22.1875),
            (8.0, 1e-5, 1.0, 30, 3.49609375),
            (1.0, 1e-5, 0.01, 1000, 1.5234375),
            (3.0, 1e-5, 0.25, 100, 3.935546875),
            (0.5, 1e-6, 1.0, 1, 8.75),
        ];
        for (eps, delta, q, steps, want) in cases {
            let z = get_noise_multiplier(eps, delta, q, steps).unwrap();
            assert_eq!(z, want, "ε {eps} δ {delta} q {q} steps {steps}");
            let (spent, _) = epsilon(z, q, steps, delta).unwrap();
            assert!(spent <= eps && spent >= eps - 0.01, "{spent}");
        }
        assert!(matches!(
            get_noise_multiplier(1e-9, 1e-5, 1.0, 1_000_000),
            Err(AccountantError::BudgetTooLow { .. })
        ));
    }

    #[test]
    fn steps_merge_and_bad_inputs_are_refused() {
        let mut acc = RdpAccountant::new();
        assert_eq!(acc.epsilon(1e-5).unwrap(), (0.0, 0.0));
        acc.step(1.0, 0.5).unwrap();
        acc.step(1.0, 0.5).unwrap();
        acc.step(2.0, 0.5).unwrap();
        assert_eq!(acc.history.len(), 2);
        assert_eq!(acc.history[0].steps, 2);
        // Composition: the history spends what its parts add up to, order by order.
        let sum: Vec<f64> = compute_rdp(0.5, 1.0, 2, &DEFAULT_ALPHAS)
            .unwrap()
            .iter()
            .zip(compute_rdp(0.5, 2.0, 1, &DEFAULT_ALPHAS).unwrap())
            .map(|(a, b)| a + b)
            .collect();
        assert_eq!(acc.rdp(&DEFAULT_ALPHAS).unwrap(), sum);
        assert_eq!(acc.step(1.0, 1.5), Err(AccountantError::SampleRate(1.5)));
        assert_eq!(
            acc.step(-1.0, 0.5),
            Err(AccountantError::NoiseMultiplier(-1.0))
        );
        assert_eq!(acc.epsilon(0.0), Err(AccountantError::Delta(0.0)));
        assert_eq!(
            compute_rdp(0.5, 1.0, 1, &[1.0]),
            Err(AccountantError::Order(1.0))
        );
        assert_eq!(
            get_noise_multiplier(-1.0, 1e-5, 1.0, 1),
            Err(AccountantError::Epsilon(-1.0))
        );
    }
}
