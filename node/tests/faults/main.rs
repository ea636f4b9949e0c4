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
//! | 5: a long scatter-and-gather job slows down and grows the server | `record.json` and the bytes the server writes a round stay the same from round 10 to round 140 | `long_runs::a_long_job_writes_the_same_at_its_last_rounds_as_at_its_first` |
//! | 7: a 57 MB `meta.json` read whole by the admin | refused by its length before reading, naming the file and the cap; the console's peak RSS stays small | `large_jobs::a_57_mb_meta_json_is_refused_before_it_is_read` |
//! | 7: a deploy map of a million names | refused at the admin by counting, naming `deploy_map` and the limit; the largest allowed job is taken | `large_jobs::a_deploy_map_of_too_many_names_is_refused_at_the_admin` |

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod large_jobs;
mod long_runs;
