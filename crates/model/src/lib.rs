//! Segment messages and the pure rules around them: validation, normalization
//! (messageId, receivedAt, clock-skew corrected timestamps), go-snakecase naming and
//! flattening for the warehouse. No I/O lives here.

pub mod backoff;
pub mod body;
pub mod duration;
pub mod flatten;
pub mod normalize;
pub mod snake;
pub mod splice;

pub use normalize::{CallType, NormalizeContext, Normalized, RejectCode, Rejection, normalize};
