//! Workflow controllers as sans-IO state machines: inputs and time go in, tasks, timers and
//! events come out. The simulator and the real node drive the same machines.

pub mod ccwf;
#[cfg(test)]
pub(crate) mod ccwf_sim;
pub mod cse;
pub mod cyclic;
pub mod scatter_gather;
pub mod statistics;
pub mod swarm;
pub mod tiered;

#[cfg(test)]
mod algorithm_sims;
#[cfg(test)]
mod cse_sims;
#[cfg(test)]
mod cyclic_sims;

#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod statistics_sims;
#[cfg(test)]
mod swarm_secagg_sims;
#[cfg(test)]
mod swarm_sims;
