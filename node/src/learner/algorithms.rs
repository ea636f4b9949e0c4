//! The client side of the aggregation algorithms that need one, shared by the learners that
//! implement it (the MLP of [`super::mlp`] and the LibTorch CNN): FedProx's `mu` from the
//! global model's metadata, SCAFFOLD's global control from its `scaffold_c_global.*`
//! tensors, and SCAFFOLD's option-II control update. The rules are in `super::mlp`'s
//! module doc; the server side is `flare_protocols::aggregators`.

use flare_protocols::aggregators::{META_FEDPROX_MU, SCAFFOLD_C_DIFF, SCAFFOLD_C_GLOBAL};
use flare_protocols::model::{DType, FLModel, MetaValue, ModelError, Tensor};

use super::LearnerError;

/// Whether `name` is one of SCAFFOLD's control tensors (`scaffold_c_global.*`,
/// `scaffold_c_diff.*`), which ride along with a model's weights but are none of them.
pub(crate) fn is_control(name: &str) -> bool {
    name.starts_with(SCAFFOLD_C_GLOBAL) || name.starts_with(SCAFFOLD_C_DIFF)
}

/// FedProx's `mu` from the global model's metadata: `None` when absent or 0 (plain
/// training), an error naming the key when it is not a finite number ≥ 0.
pub(crate) fn fedprox_mu(global: &FLModel) -> Result<Option<f64>, LearnerError> {
    let mu = match global.meta.get(META_FEDPROX_MU) {
        None => return Ok(None),
        Some(MetaValue::Float(mu)) => *mu,
        Some(MetaValue::Int(mu)) => *mu as f64,
        Some(other) => {
            return Err(LearnerError::Backend(format!(
                "FedProx: meta {META_FEDPROX_MU:?} must be a number, got {other:?}"
            )));
        }
    };
    if !(mu.is_finite() && mu >= 0.0) {
        return Err(LearnerError::Backend(format!(
            "FedProx: meta {META_FEDPROX_MU:?} must be finite and >= 0, got {mu}"
        )));
    }
    Ok((mu > 0.0).then_some(mu))
}

/// SCAFFOLD's global control from the global model: `None` when it holds no
/// `scaffold_c_global.*` tensor (no SCAFFOLD), else one checked tensor per parameter of
/// `params` (`(name, shape)`), in that order. A missing, extra, non-F32, misshaped or
/// non-finite control is an error naming it.
pub(crate) fn scaffold_c_global<'m>(
    global: &'m FLModel,
    params: &[(&str, &[usize])],
) -> Result<Option<Vec<&'m Tensor>>, LearnerError> {
    let refuse = |name: &str, reason: String| {
        LearnerError::Incompatible(ModelError::Incompatible {
            name: name.to_string(),
            reason,
        })
    };
    let mut any = false;
    for name in global.params.keys() {
        if let Some(p) = name.strip_prefix(SCAFFOLD_C_GLOBAL) {
            any = true;
            if !params.iter().any(|(n, _)| *n == p) {
                return Err(refuse(
                    name,
                    "unexpected SCAFFOLD control: the network has no such parameter".into(),
                ));
            }
        }
    }
    if !any {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(params.len());
    for (p, shape) in params {
        let name = format!("{SCAFFOLD_C_GLOBAL}{p}");
        let Some(t) = global.params.get(&name) else {
            return Err(refuse(&name, "missing SCAFFOLD control".into()));
        };
        if t.dtype() != DType::F32 || t.shape() != *shape {
            return Err(refuse(
                &name,
                format!(
                    "SCAFFOLD control: expected F32 {shape:?}, got {:?} {:?}",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        let finite = t
            .bytes()
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite());
        if !finite {
            return Err(refuse(
                &name,
                "SCAFFOLD control holds a non-finite value".into(),
            ));
        }
        out.push(t);
    }
    Ok(Some(out))
}

/// Refuses SCAFFOLD with a learning rate its control update cannot divide by.
pub(crate) fn check_scaffold_lr(lr: f64) -> Result<(), LearnerError> {
    if lr.is_finite() && lr > 0.0 {
        Ok(())
    } else {
        Err(LearnerError::Backend(format!(
            "SCAFFOLD needs a positive finite learning rate, got {lr}"
        )))
    }
}

/// SCAFFOLD's new local control of one parameter, option II:
/// `c_i⁺ = c_i − c + (w_global − w)/(K·lr)`, in f64 and rounded to f32 once. A non-finite
/// result (a round that moved too far) is an error naming the parameter.
pub(crate) fn scaffold_c_new(
    name: &str,
    c_local: &[f32],
    c_global: &[f32],
    w_global: &[f32],
    w: &[f32],
    k_lr: f64,
) -> Result<Vec<f32>, LearnerError> {
    let new: Vec<f32> = c_local
        .iter()
        .zip(c_global)
        .zip(w_global.iter().zip(w))
        .map(|((&cl, &cg), (&wg, &w))| {
            (f64::from(cl) - f64::from(cg) + (f64::from(wg) - f64::from(w)) / k_lr) as f32
        })
        .collect();
    if new.iter().all(|v| v.is_finite()) {
        Ok(new)
    } else {
        Err(LearnerError::Diverged(format!(
            "SCAFFOLD control of {name:?} is not finite"
        )))
    }
}
