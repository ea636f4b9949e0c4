//! The fault suite: every fault a hostile-environment test found, and the ones covered
//! elsewhere, each with the behaviour its test proves. Every test here runs real `flare-node`
//! processes from POC kits (see `../common/mod.rs`) and fails without the fix it names.
//!
//! | fault | behaviour proved | test |
//! | --- | --- | --- |
//! | (covered in `federation.rs`) a site killed mid-job | scatter-and-gather goes on with `min_clients` | `federation::a_dead_site_and_a_server_restart_lose_nothing` |
//! | (covered in `federation.rs`) a swarm's aggregator and the server killed mid-run | re-election, history complete | `federation::swarm_survives_its_aggregator_and_the_server` |
//! | (covered in `netns.rs`) sites with no route to each other | relayed, no model byte in the clear | `netns::swarm_through_the_relay_leaks_no_model_bytes` |
//! | (covered in `federation.rs`) a tampered kit, a bad job | refused, naming the file or key | `federation::bad_jobs_and_kits_are_refused_with_the_reason` |
//! | a copy of a site's kit started while the site ran was admitted and split a job | the server refuses the second process (it exits, saying why; `admin sites` counts it); the job finishes on the real site; a restarted site is admitted | `identity::a_copy_of_a_site_kit_is_refused_and_the_job_runs_on_the_real_site` |
//! | two nodes started on one participant folder | the second stops at once, naming `node.lock` and the pid holding it | `identity::a_second_start_on_the_same_folder_is_refused_by_the_lock` |
//! | an admin kit from another CA: "cannot reach the server" after 15 s | exit 3 within seconds, saying the certificate was refused; a down server within seconds | `console::a_kit_from_another_ca_is_told_why_and_a_down_server_is_reported_fast` |
//! | `admin … \| head -1` panicked (exit 101); versions sorted as strings | a closed stdout ends the output quietly; VERSION column and JSON `metrics` keys in numeric order | `console::console_output_survives_a_closed_pipe_and_sorts_versions_as_numbers` |

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod console;
mod identity;
