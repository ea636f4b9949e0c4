//! Filters: pure transformations of a model on its way out of a site or into one, like
//! FLARE's task data and task result filters (`nvflare.apis.filter.Filter`).
//!
//! A [`Filter`] takes the model by value and returns the filtered model, so it can convert
//! tensor by tensor and drop each original as it goes: memory never holds two whole copies
//! of the model. On error the model is dropped with it; filters run on copies that are about
//! to be sent or have just been received, so there is nothing to keep.
//!
//! The filters:
//! - [`quantize::ModelQuantizer`] and [`quantize::ModelDequantizer`]: reduced-precision
//!   transfer (FLARE's `nvflare.app_opt.pt.quantization`);
//! - [`privacy`]: FLARE's `ExcludeVars`, `PercentilePrivacy` and `SVTPrivacy`
//!   (`nvflare.app_common.filters`) and Flower's `LocalDpMod`, on what a site sends. Those
//!   that only make sense on a diff say so through [`Filter::diff_only`] and pass full
//!   weights unchanged.

pub mod privacy;
pub mod quantize;

pub use privacy::{
    Exclude, ExcludeVars, LocalDp, LocalDpArgs, PercentilePrivacy, SvtArgs, SvtPrivacy,
};
pub use quantize::{ModelDequantizer, ModelQuantizer, QuantizationType};

use crate::model::{DType, FLModel};

/// A transformation applied to a whole model, for example quantizing it before it is sent.
pub trait Filter: Send + Sync + std::fmt::Debug {
    /// The filter's name as FLARE spells it (for example `ModelQuantizer`), used in errors
    /// and logs.
    fn name(&self) -> &'static str;

    /// Filters `model`. Consumes it so that each tensor can be converted and its original
    /// dropped before the next one is touched.
    fn apply(&self, model: FLModel) -> Result<FLModel, FilterError>;

    /// Whether the filter only transforms diffs ([`crate::model::ParamsType::Diff`]) and
    /// passes full weights unchanged, as FLARE's filters pass a data kind they do not
    /// filter. A node uses it to warn about, or refuse, a learner that sends full weights
    /// through a privacy filter that would then do nothing.
    fn diff_only(&self) -> bool {
        false
    }
}

/// Why a filter refused a model. Every message names the filter, and the tensor or
/// metadata key at fault.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FilterError {
    /// A tensor to be converted holds NaN or infinity.
    #[error("{filter}: tensor {tensor:?} holds a non-finite value at element {index}")]
    NonFinite {
        /// The filter that refused the model.
        filter: &'static str,
        /// The tensor.
        tensor: String,
        /// Index of the first non-finite element.
        index: usize,
    },
    /// A finite value does not fit the narrower dtype (float16 stops at 65504).
    #[error("{filter}: tensor {tensor:?}: value {value} at element {index} overflows {dtype:?}")]
    Overflow {
        /// The filter that refused the model.
        filter: &'static str,
        /// The tensor.
        tensor: String,
        /// Index of the first element that overflows.
        index: usize,
        /// Its value.
        value: f32,
        /// The dtype it does not fit.
        dtype: DType,
    },
    /// A tensor's name clashes with the names the filter writes (a scale tensor's suffix),
    /// or becomes too long with them.
    #[error("{filter}: tensor {tensor:?}: {reason}")]
    NameClash {
        /// The filter that refused the model.
        filter: &'static str,
        /// The tensor.
        tensor: String,
        /// What clashes.
        reason: String,
    },
    /// A filtered model is inconsistent at this tensor: a scale tensor missing or of the wrong
    /// length, a dtype that disagrees with the metadata, a code or scale out of range.
    #[error("{filter}: tensor {tensor:?}: {reason}")]
    Malformed {
        /// The filter that refused the model.
        filter: &'static str,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A model-level metadata entry is missing, malformed, or already present.
    #[error("{filter}: meta {key:?}: {reason}")]
    BadMeta {
        /// The filter that refused the model.
        filter: &'static str,
        /// The metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A constructor argument is out of range (a percentile above 100, a negative epsilon).
    #[error("{filter}: argument {arg}: {reason}")]
    BadArgument {
        /// The filter.
        filter: &'static str,
        /// The argument, by the name FLARE (or Flower) gives it.
        arg: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The filter's configuration is invalid (a block size of zero), or cannot work on this
    /// model (an SVT threshold no entry reaches).
    #[error("{filter}: invalid configuration: {reason}")]
    Config {
        /// The filter.
        filter: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A quantization type string that FLARE does not define.
    #[error(
        "ModelQuantizer: unknown quantization_type {0:?}; expected one of \"float16\" (or \"fp16\"), \"bfloat16\" (or \"bf16\"), \"blockwise8\""
    )]
    UnknownQuantizationType(String),
}
