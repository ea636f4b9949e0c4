//! Workflow controllers as sans-IO state machines: inputs and time go in, tasks, timers and
//! events come out. The simulator and the real node drive the same machines.

pub mod ccwf;
pub mod scatter_gather;
pub mod swarm;

#[cfg(test)]
mod sim_tests;
