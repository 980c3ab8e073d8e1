//! The scheduler: where tasks go (a pure placement function) and how apps converge to their
//! definitions (scaling, backoff, rolling deployments).

mod orchestrator;
mod placement;

pub use self::orchestrator::DEPLOYMENT_FAILURE_LIMIT;
pub(crate) use self::orchestrator::Orchestrator;
pub use self::placement::{Placement, Placements, place, place_resident};
